import os
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as tmp_mp
from torch import nn

import streams.features as features_mod
import streams.model as model_mod
from data.clips import ClipConfig, ClipDataset, clip_inputs
from fusion.predictions import load_split
from streams.backbones import Backbone
from streams.checkpoint import load_checkpoint
from streams.config import ModelConfig
from streams.launch import init_distributed, parse_devices, split_ids, train_stream
from streams.rundir import (
    RunConfig,
    RunDir,
    dumps_toml,
    load_stream_model,
    read_toml,
    resolve_run_config,
)
from streams.train import TrainConfig
from tests.streams.test_train import STEPS, make_data, tiny_config

# --- DDP ----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, store: str, out: str, cfg: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    train_stream(store, "rgb", out, RunConfig.from_dict(cfg), "cpu")


def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    store = make_data(tmp_path / "data", n=32, streams=("rgb",))
    # Same global batch (8) both ways; plain shuffling and no dropout, so only the split of work differs.
    # float32: bfloat16 rounds a gradient summed over 8 clips differently from two summed over 4.
    cfg = tiny_config(epochs=3, batch_size=8, sampler="shuffle", amp="off")
    one = train_stream(store, "rgb", tmp_path / "one", cfg, "cpu")
    # fork, not spawn: the children need not import torch and the project again (seconds each).
    tmp_mp.start_processes(_ddp_rank, args=(2, _free_port(), str(store), str(tmp_path / "ddp"), cfg.to_dict()),
                           nprocs=2, start_method="fork")
    ddp = tmp_path / "ddp" / "rgb"
    a, b = load_checkpoint(one / "last.pt"), load_checkpoint(ddp / "last.pt")
    assert a["step"] == b["step"] == 3 * 2  # 16 training videos / 8 per step
    for key, value in a["model"].items():
        # Adam turns float noise in gradients that are zero in exact arithmetic (attention key biases)
        # into steps of ~1e-5; a real DDP mistake (wrong averaging or order) moves weights by ~1e-2.
        torch.testing.assert_close(b["model"][key], value, atol=1e-4, rtol=1e-4)
    assert read_toml(ddp / "config.toml")["run"]["world_size"] == 2
    ra, rb = RunDir(one.parent, "rgb").read_metrics(), RunDir(ddp.parent, "rgb").read_metrics()
    assert len(rb) == 3  # written once, by rank 0
    np.testing.assert_allclose([r["train_loss"] for r in rb], [r["train_loss"] for r in ra], rtol=1e-4)
    pa, pb = load_split(one, "val"), load_split(ddp, "val")  # gathered from both ranks, each video once
    assert list(pb.video_ids) == list(pa.video_ids)
    np.testing.assert_allclose(pb.logits, pa.logits, atol=1e-4)


def test_two_process_ddp_fits_the_same_closed_form_head(tmp_path):
    store = make_data(tmp_path / "data", n=32, streams=("rgb",))
    cfg = tiny_config(amp="off")
    cfg = replace(cfg, model=replace(cfg.model, head="logistic"))
    one = train_stream(store, "rgb", tmp_path / "one", cfg, "cpu")
    tmp_mp.start_processes(_ddp_rank, args=(2, _free_port(), str(store), str(tmp_path / "ddp"), cfg.to_dict()),
                           nprocs=2, start_method="fork")
    ddp = tmp_path / "ddp" / "rgb"
    a, b = load_checkpoint(one / "best.pt"), load_checkpoint(ddp / "best.pt")
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value)
    assert len(RunDir(ddp.parent, "rgb").read_metrics()) == 1  # written once, by rank 0
    pa, pb = load_split(one, "test"), load_split(ddp, "test")
    assert list(pb.video_ids) == list(pa.video_ids)
    np.testing.assert_allclose(pb.logits, pa.logits, atol=1e-5)


def test_outside_torchrun_one_process_on_the_asked_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info, created = init_distributed("cpu")
    assert (info.rank, info.world, info.device.type, created) == (0, 1, "cpu", False)


# --- both stages end to end, with a small stand-in backbone -------------------------------------


def _conv_backbone(name, in_channels=3, pretrained=False, weights_path=None, image_size=224):
    """A trainable 4-d frame encoder standing in for VGG19 (built from the same seeded generator)."""
    net = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(net, 4, in_channels, name)


@pytest.fixture()
def small_backbone(monkeypatch):
    monkeypatch.setattr(features_mod, "build_backbone", _conv_backbone)
    monkeypatch.setattr(model_mod, "build_backbone", _conv_backbone)


def _small_config(**train) -> RunConfig:
    t = dict(stage="both", epochs=2, finetune_epochs=2, batch_size=4, finetune_batch_size=4, steps=3, views=1,
             minority_views=2, num_workers=0, patience=0, threads=1)
    t.update(train)
    model = ModelConfig(lstm_layers=1, lstm_hidden=4, attention_heads=2, dense_units=(4,), dropout=0.0,
                        lstm_dropout=0.0, flow_stack=1)
    return RunConfig(train=TrainConfig(**t), model=model)


@pytest.mark.parametrize("stream", ["rgb", "flow"])
def test_both_stages_cache_features_then_fine_tune(tmp_path, small_backbone, stream):
    store = make_data(tmp_path / "data", n=12, streams=())  # no features file yet: the run caches them
    run = train_stream(store, stream, tmp_path / "run", _small_config(), "cpu")
    stages = [(r["stage"], r["epoch"]) for r in RunDir(run.parent, stream).read_metrics()]
    assert stages == [("head", 0), ("head", 1), ("finetune", 0), ("finetune", 1)]
    assert features_mod.features_path(store, stream, "vgg19").is_file()
    last = load_checkpoint(run / "last.pt")
    assert last["module"] == "model" and any(k.startswith("backbone.") for k in last["model"])
    assert last["stage"] == 2 and last["stage_finished"]
    for split in ("val", "test"):
        assert len(load_split(run, split)) == 3
    cfg = RunConfig.from_dict(read_toml(run / "config.toml"))
    assert (cfg.train.views, cfg.train.minority_views) == (1, 2)


def test_a_closed_form_head_is_fine_tuned_end_to_end_from_its_fit(tmp_path, small_backbone):
    store = make_data(tmp_path / "data", n=12, streams=())
    base = _small_config()
    cfg = replace(base, model=replace(base.model, head="logistic"))
    run = train_stream(store, "flow", tmp_path / "run", cfg, "cpu")
    stages = [(r["stage"], r["epoch"]) for r in RunDir(run.parent, "flow").read_metrics()]
    assert stages == [("head", 0), ("finetune", 0), ("finetune", 1)]  # one closed-form fit, then epochs
    last = load_checkpoint(run / "last.pt")
    assert last["module"] == "model" and last["stage"] == 2 and last["stage_finished"]
    assert len(load_split(run, "test")) == 3


def test_a_stage_one_model_reloads_with_the_backbone_its_features_came_from(tmp_path, small_backbone):
    store = make_data(tmp_path / "data", n=12, streams=())
    run = train_stream(store, "rgb", tmp_path / "run", _small_config(stage="head"), "cpu")
    model, cfg, info = load_stream_model(run)
    assert info["module"] == "head" and info["stage"] == 1
    saved = load_split(run, "val")
    ds = ClipDataset(store, list(saved.video_ids), "rgb", ClipConfig(steps=3, flow_stack=1))
    with torch.inference_mode():
        logits = model(clip_inputs(torch.utils.data.default_collate([ds[i] for i in range(len(ds))]), "cpu")).numpy()
    # The features were stored as float16, so the rebuilt model agrees to that precision.
    np.testing.assert_allclose(logits, saved.logits, atol=5e-3)


def test_a_training_process_stops_when_its_parent_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    child = ("import os, sys, time; from streams.launch import _exit_with_parent; "
             "_exit_with_parent(int(sys.argv[1]), 0.05); print('watching', flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())], stdout=subprocess.PIPE, text=True); "
        "print(p.pid, p.stdout.readline().strip(), flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    pid, state = parent.stdout.readline().split()
    pid = int(pid)
    assert state == "watching"
    os.kill(parent.pid, signal.SIGKILL)  # as `kill -9` of the command: no signal reaches the child
    parent.wait()

    def running() -> bool:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state not in ("Z", "X")  # a zombie has exited; only its parent's reaping is left

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running()


def test_a_checkpoint_of_another_model_version_is_a_one_line_error(tmp_path, small_backbone):
    store = make_data(tmp_path / "data", n=12, streams=())
    run = train_stream(store, "rgb", tmp_path / "run", _small_config(stage="head"), "cpu")
    ckpt = load_checkpoint(run / "best.pt")
    ckpt["model"] = {k: torch.cat([v, v]) if v.ndim else v for k, v in ckpt["model"].items()}  # as if features grew
    torch.save(ckpt, run / "best.pt")
    with pytest.raises(ValueError, match=r"best\.pt does not fit the model this version builds .* retrain the stream") as err:
        load_stream_model(run)
    assert "\n" not in str(err.value)


def test_hoghof_features_of_another_descriptor_version_are_not_reused_for_training(tmp_path, monkeypatch):
    import streams.launch as launch

    store = make_data(tmp_path / "data", n=8, streams=())
    cfg = replace(_small_config(stage="head"), model=replace(_small_config().model, backbone="hoghof"))
    path, _ = launch.ensure_features(store, "flow", cfg, torch.device("cpu"))
    stamp = path.stat().st_mtime_ns
    assert launch.ensure_features(store, "flow", cfg, torch.device("cpu"))[0].stat().st_mtime_ns == stamp
    monkeypatch.setattr(features_mod, "HOGHOF_VERSION", features_mod.HOGHOF_VERSION + 1)
    launch.ensure_features(store, "flow", cfg, torch.device("cpu"))
    assert features_mod.features_attrs(path)["encoder_version"] == features_mod.HOGHOF_VERSION


def test_features_of_a_store_re_extracted_with_other_flow_settings_are_not_reused(tmp_path):
    import h5py

    import streams.launch as launch

    store = make_data(tmp_path / "data", n=8, streams=())
    cfg = replace(_small_config(stage="head"), model=replace(_small_config().model, backbone="hoghof"))
    path, _ = launch.ensure_features(store, "flow", cfg, torch.device("cpu"))
    stamp = path.stat().st_mtime_ns
    assert launch.ensure_features(store, "flow", cfg, torch.device("cpu"))[0].stat().st_mtime_ns == stamp
    with h5py.File(store, "a") as f:  # as if extracted again in place with another method
        f.attrs["flow_method"] = "tvl1" if f.attrs.get("flow_method") != "tvl1" else "farneback"
    launch.ensure_features(store, "flow", cfg, torch.device("cpu"))
    assert path.stat().st_mtime_ns != stamp


def _cached_labels(path):
    import h5py

    with h5py.File(path, "r") as f:
        return {v: int(g.attrs["label"]) for v, g in f["videos"].items()}


def test_features_of_a_store_extracted_again_at_the_same_path_are_not_reused(tmp_path, small_backbone):
    import streams.launch as launch
    from data.store import Store, store_identity

    cfg = _small_config(stage="head")
    store = make_data(tmp_path / "data", n=8, streams=())
    path, _ = launch.ensure_features(store, "rgb", cfg, torch.device("cpu"))
    labels = _cached_labels(path)
    store.unlink()  # deleted and extracted again, same settings, other labels; the features file stays
    make_data(tmp_path / "data", n=8, streams=(), labels=[1 - labels[f"v{i:02d}"] for i in range(8)])
    with Store(store) as s:
        identity, relabelled = store_identity(s.root_attrs), {v: s.label(v) for v in s.video_ids}
    assert launch.ensure_features(store, "rgb", cfg, torch.device("cpu"))[0] == path
    assert _cached_labels(path) == relabelled != labels  # stage 1 trains on the labels of the store it reads
    assert features_mod.features_attrs(path)["store_id"] == identity


def test_features_without_a_store_id_are_kept_for_their_store_and_labels_else_made_again(tmp_path, small_backbone):
    import h5py

    import streams.launch as launch

    cfg = _small_config(stage="head")
    store = make_data(tmp_path / "data", n=8, streams=())
    path, _ = launch.ensure_features(store, "rgb", cfg, torch.device("cpu"))
    stamp = path.stat().st_mtime_ns
    assert launch.ensure_features(store, "rgb", cfg, torch.device("cpu"))[0].stat().st_mtime_ns == stamp
    with h5py.File(path, "a") as f:  # as made before features recorded their store's id
        del f.attrs["store_id"]
    stamp = path.stat().st_mtime_ns
    launch.ensure_features(store, "rgb", cfg, torch.device("cpu"))  # this store's path and labels vouch for it
    assert path.stat().st_mtime_ns == stamp
    with h5py.File(path, "a") as f:  # ... but not when made from a store elsewhere
        f.attrs["store"] = str(tmp_path / "elsewhere.h5")
    launch.ensure_features(store, "rgb", cfg, torch.device("cpu"))
    assert path.stat().st_mtime_ns != stamp and "store_id" in features_mod.features_attrs(path)
    stamp = path.stat().st_mtime_ns
    with h5py.File(store, "a") as f:  # a label changed in place: the store keeps its identity
        f["videos"]["v00"].attrs["label"] = 1 - int(f["videos"]["v00"].attrs["label"])
        relabelled = int(f["videos"]["v00"].attrs["label"])
    launch.ensure_features(store, "rgb", cfg, torch.device("cpu"))
    assert path.stat().st_mtime_ns != stamp and _cached_labels(path)["v00"] == relabelled


@pytest.mark.parametrize(("pretrained", "reused"), [(False, False), (True, True)])
def test_features_of_a_random_backbone_are_made_again_for_another_seed(tmp_path, small_backbone, pretrained, reused):
    import h5py

    import streams.launch as launch

    store = make_data(tmp_path / "data", n=8, streams=())
    base = _small_config(stage="head", seed=0)
    cfg = replace(base, model=replace(base.model, pretrained=pretrained))
    path, _ = launch.ensure_features(store, "rgb", cfg, torch.device("cpu"))
    with h5py.File(path, "r") as f:
        before = f["videos"]["v00"]["features"][:]
    launch.ensure_features(store, "rgb", replace(cfg, train=replace(cfg.train, seed=1)), torch.device("cpu"))
    with h5py.File(path, "r") as f:
        after, seed = f["videos"]["v00"]["features"][:], int(f.attrs["seed"])
    # Without weights the backbone is what its seed draws, and stage 2 rebuilds it from the run's seed;
    # weights fix it whatever the seed, so its features are kept.
    assert seed == (0 if reused else 1)
    assert np.array_equal(before, after) == reused


@pytest.mark.parametrize(("minority_views", "reused"), [(2, False), (1, True)])
def test_augmented_views_are_made_again_for_other_augment_settings(tmp_path, small_backbone, minority_views, reused):
    import streams.launch as launch

    store = make_data(tmp_path / "data", n=8, streams=())
    cfg = _small_config(stage="head", views=1, minority_views=minority_views)
    path, _ = launch.ensure_features(store, "rgb", cfg, torch.device("cpu"))
    stamp = path.stat().st_mtime_ns
    other = replace(cfg, augment=replace(cfg.augment, hflip_p=0.0 if cfg.augment.hflip_p else 1.0))
    launch.ensure_features(store, "rgb", other, torch.device("cpu"))
    # Views 1.. are augmented draws; a file holding only view 0 (plain clips) does not depend on augment.
    assert (path.stat().st_mtime_ns == stamp) == reused


# --- configs and small helpers ------------------------------------------------------------------


def test_options_override_toml_which_overrides_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nepochs = 3\npatience = 7\n\n[model]\nhead = "gru_attention"\n\n[optim]\nlr = 0.01\n')
    cfg = resolve_run_config(path, {"train": {"epochs": 1, "seed": None}, "model": {"backbone": "resnet50"}})
    assert (cfg.train.epochs, cfg.train.patience, cfg.train.seed) == (1, 7, 0)
    assert (cfg.model.head, cfg.model.backbone, cfg.optim.lr) == ("gru_attention", "resnet50", 0.01)
    assert cfg.train.finetune_epochs == TrainConfig().finetune_epochs


@pytest.mark.parametrize(("text", "match"), [("[trian]\nepochs = 3\n", "unknown table"),
                                             ("[train]\nepoch = 3\n", "unknown setting"),
                                             ("[train]\nepochs = 'x'\n", "epochs must be int"),
                                             ("[train\n", "not valid TOML")])
def test_bad_config_files(tmp_path, text, match):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        resolve_run_config(path)


def test_saved_config_round_trips_through_toml(tmp_path):
    cfg = RunConfig(train=TrainConfig(fold="1/5", size=64, minority_share=0.5),
                    model=ModelConfig(dense_units=(32, 16), weights_path="/w/vgg 19 \"x\".pth"))
    path = tmp_path / "config.toml"
    path.write_text(dumps_toml({"run": {"stream": "rgb", "store": "/data/s.h5"}, **cfg.to_dict()}))
    assert RunConfig.from_dict(read_toml(path)) == cfg
    assert resolve_run_config(path) == cfg  # a saved config can be passed back with --config


def test_split_ids_store_auto_and_fold(tmp_path):
    store = make_data(tmp_path, n=40, streams=())
    stored = split_ids(store, TrainConfig())
    assert [len(stored[k]) for k in ("train", "val", "test")] == [20, 10, 10]
    auto = split_ids(store, TrainConfig(split="auto"))
    assert sorted(sum(auto.values(), [])) == sorted(sum(stored.values(), [])) and auto != stored
    folds = [split_ids(store, TrainConfig(fold=f"{k}/4"))["test"] for k in range(4)]
    assert sorted(sum(folds, [])) == sorted(sum(stored.values(), []))  # every video tested once


@pytest.mark.parametrize(("text", "expected"), [("cpu,cpu", ["cpu", "cpu"]), ("cpu", ["cpu", "cpu"]),
                                                (None, ["auto", "auto"])])
def test_parse_devices(text, expected):
    assert parse_devices(text) == expected


@pytest.mark.parametrize(("text", "match"), [("cpu,cpu,cpu", "2 comma-separated"), ("gpu,cpu", "unknown device")])
def test_parse_devices_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        parse_devices(text)


def test_stage_runs_from_a_saved_config_table():
    cfg = replace(tiny_config(), train=replace(tiny_config().train, stage="both"))
    assert cfg.train.stages == (1, 2) and STEPS == cfg.train.steps


def test_a_store_without_the_stream_names_the_command_that_makes_it(tmp_path):
    import h5py

    store = make_data(tmp_path, n=8, streams=("rgb", "flow"))
    with h5py.File(store, "a") as f:
        for video_id in f["videos"]:
            del f["videos"][video_id]["flow"]
    with pytest.raises(ValueError, match=r"has no flow data .* `twostream extract`"):
        train_stream(store, "flow", tmp_path / "run", tiny_config(), "cpu")
