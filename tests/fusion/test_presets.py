"""Presets: every field reaches the config it decides, and the cpu preset builds a model without weights."""

from __future__ import annotations

import pytest
import torch

from fusion.presets import CPU, GPU, with_changes
from streams.model import build_stream_model


@pytest.mark.parametrize("preset", [CPU, GPU], ids=["cpu", "gpu"])
def test_run_config_carries_every_training_decision(preset):
    cfg = preset.run_config(seed=3)
    train, model, optim = cfg.train, cfg.model, cfg.optim
    assert (train.stage, train.epochs, train.finetune_epochs, train.steps, train.size) == (
        preset.stage, preset.epochs, preset.finetune_epochs, preset.steps, preset.clip_size)
    assert (train.views, train.minority_views, train.batch_size, train.patience, train.metric, train.seed) == (
        preset.views, preset.minority_views, preset.batch_size, preset.patience, preset.metric, 3)
    assert (model.backbone, model.head, model.flow_stack, model.lstm_layers, model.lstm_hidden) == (
        preset.backbone, preset.head, preset.flow_stack, preset.lstm_layers, preset.lstm_hidden)
    assert model.dense_units == preset.dense_units and model.attention_heads == preset.attention_heads
    assert (optim.lr, optim.weight_decay) == (preset.lr, preset.weight_decay)


def test_changed_fields_reach_the_config_and_none_keeps_the_preset():
    changed = with_changes(CPU, metric="accuracy", weight_decay=0.5, epochs=None)
    cfg = changed.run_config()
    assert cfg.train.metric == "accuracy" and cfg.optim.weight_decay == 0.5 and cfg.train.epochs == CPU.epochs


def test_an_unknown_metric_is_a_clear_error():
    with pytest.raises(ValueError, match="metric"):
        with_changes(CPU, metric="speed").run_config()


def test_the_cpu_preset_needs_no_weights_and_gives_one_logit_per_clip_for_both_streams():
    cfg = CPU.run_config().model
    assert not cfg.pretrained and cfg.weights_path is None
    side = CPU.clip_size or CPU.size
    for stream in ("rgb", "flow"):
        model = build_stream_model(cfg, stream).eval()
        clips = torch.randn(2, 3, cfg.in_channels(stream), side, side) * 0.05
        with torch.inference_mode():
            assert model(clips).shape == (2,)
