import random
from dataclasses import replace

import numpy as np
import pytest
import torch

import streams.checkpoint as ckpt_mod
from streams.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from streams.launch import train_stream
from streams.rundir import RunDir
from tests.streams.test_train import TINY, make_data, tiny_config


def _state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"stage": 1, "module": "head", "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": {}, "step": 7, "epoch": 2, "stage_finished": False,
            "best": {"value": 0.5, "epoch": 1, "stage": 1}, "stage_best": None, "bad_epochs": 1,
            "rng": rng_state(), "config": {"train": {"epochs": 3, "fold": "0/5"}}, "metrics": {"val_auc": None}}


def test_checkpoint_loads_with_weights_only(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "last.pt", state)
    raw = torch.load(path, weights_only=True)  # no pickled objects: the safe loader reads it all
    assert raw["format"] == "twostream-checkpoint" and raw["step"] == 7 and raw["config"] == state["config"]
    assert torch.equal(raw["model"]["weight"], state["model"]["weight"])
    assert torch.equal(raw["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert load_checkpoint(path)["best"] == state["best"]


def test_rng_state_round_trips():
    state = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(_roundtrip(state), weights_only=True))
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {**_state(), "epoch": 1})

    def dies_half_way(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {**_state(), "epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_bad_files_raise_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable twostream checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a twostream checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class _Kill(Exception):
    pass


@pytest.mark.parametrize("native_bf16", [False, True])  # amp "auto": float32, or bfloat16 projections
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, native_bf16):
    # Dropout, a weighted sampler and random view draws all consume randomness: resuming must restore it.
    monkeypatch.setattr("streams.train.cpu_has_native_bf16", lambda: native_bf16)
    store = make_data(tmp_path / "data", n=24, streams=("rgb",), views=3)
    cfg = replace(tiny_config(epochs=5, sampler="weighted", batch_size=4),
                  model=replace(TINY, dropout=0.3))
    full = train_stream(store, "rgb", tmp_path / "full", cfg, "cpu")

    def kill_after_epoch_2(event):
        if event["event"] == "epoch" and event["epoch"] == 2:
            raise _Kill

    with pytest.raises(_Kill):
        train_stream(store, "rgb", tmp_path / "cut", cfg, "cpu", on_event=kill_after_epoch_2)
    assert load_checkpoint(tmp_path / "cut" / "rgb" / "last.pt")["epoch"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        train_stream(store, "rgb", tmp_path / "cut", cfg, "cpu")
    resumed = train_stream(store, "rgb", tmp_path / "cut", cfg, "cpu", resume=True)

    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=1e-6, rtol=1e-5)
    epochs = [r["epoch"] for r in RunDir(tmp_path / "cut", "rgb").read_metrics()]
    assert epochs == [0, 1, 2, 3, 4]  # each epoch logged once across the two runs
    assert (resumed / "predictions_test.csv").read_text() == (full / "predictions_test.csv").read_text()


def test_resume_refuses_changed_settings_and_missing_runs(tmp_path):
    store = make_data(tmp_path / "data", n=12, streams=("rgb",))
    cfg = tiny_config(epochs=1)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_stream(store, "rgb", tmp_path / "run", cfg, "cpu", resume=True)
    train_stream(store, "rgb", tmp_path / "run", cfg, "cpu")
    with pytest.raises(ValueError, match=r"train.epochs \(1 -> 3\)"):
        train_stream(store, "rgb", tmp_path / "run", tiny_config(epochs=3), "cpu", resume=True)
