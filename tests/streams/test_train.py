import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from data.augment import AugmentConfig
from data.clips import ClipConfig
from data.store import Store, StoreWriter, store_identity
from streams.checkpoint import load_checkpoint
from streams.config import ModelConfig, OptimConfig
from streams.features import FeatureDataset, features_path
from streams.heads import build_head
from streams.launch import train_stream
from streams.rundir import RunConfig, RunDir, read_toml
from streams.train import (
    EpochSampler,
    FeatureBank,
    NonFiniteLossError,
    Precision,
    TrainConfig,
    epoch_order,
    evaluate,
    fit_stage,
    parse_fold,
    resolve_precision,
    train_one_epoch,
    use_fused_lstm,
)

STEPS, DIM = 4, 16
TINY = ModelConfig(lstm_layers=1, lstm_hidden=8, attention_heads=2, dense_units=(8,), dropout=0.0, lstm_dropout=0.0)


# --- shared test data: a tiny store and features files that `train_stream` uses as they are ----------


def features_attrs(store: Path, stream: str, views: int) -> dict:
    """The attrs `cache_features` records, for a features file made by hand on `store`: a default
    run's clip and augment settings, seed 0, no pretrained weights, and the store's identity."""
    with Store(store) as s:
        identity = store_identity(s.root_attrs)
    return {"stream": stream, "backbone": "vgg19", "views": views, "minority_views": views, "minority_label": 0,
            "clip": json.dumps(ClipConfig(steps=STEPS, flow_stack=ModelConfig().flow_stack).to_dict(), sort_keys=True),
            "augment": json.dumps(AugmentConfig().to_dict(), sort_keys=True), "seed": 0, "pretrained": False,
            "weights_path": "", "store": str(store.resolve()), "store_id": identity, "store_flow": "{}",
            "schema_version": 1, "feature_dim": DIM}


def make_data(folder: Path, n: int = 32, streams=("rgb", "flow"), views: int = 2, labels=None, splits=None,
              poison: dict | None = None, seed: int = 0) -> Path:
    """A store of n 3-frame videos and, per stream, a features file whose classes are separable.

    Video i: label (i // 4) % 2 (or labels[i]), split train/val/test by i % 4 (0, 1 train; 2 val;
    3 test) unless `splits` is given, so every split holds both labels. Features: N(0, 1) plus 1.5 * label on the first 4 dims, float16.
    `poison` {stream: value} fills that stream's features with the value (e.g. nan).
    """
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "s.h5"
    labels = [(i // 4) % 2 for i in range(n)] if labels is None else list(labels)
    splits = [("train", "train", "val", "test")[i % 4] for i in range(n)] if splits is None else list(splits)
    ids = [f"v{i:02d}" for i in range(n)]
    with StoreWriter(store, flow_codec="float16", root_attrs={"flow_method": "synthetic"}, threads=1) as w:
        for vid, label, split in zip(ids, labels, splits, strict=True):
            rgb = np.full((3, 32, 32, 3), 40 * label, np.uint8)
            flow = np.zeros((2, 32, 32, 2), np.float32)
            w.write(vid, rgb, flow, dict(label=label, group=vid, split=split, source_path=f"/v/{vid}.mp4",
                                         source_fps=10.0, source_size=[32, 32], flow_method="synthetic"))
    rng = np.random.default_rng(seed)
    for stream in streams:
        with h5py.File(features_path(store, stream, "vgg19"), "w") as f:
            f.attrs.update(features_attrs(store, stream, views))
            videos = f.create_group("videos")
            for vid, label in zip(ids, labels, strict=True):
                x = rng.normal(size=(views, STEPS, DIM)).astype(np.float32)
                x[..., :4] += 1.5 * label
                if poison and stream in poison:
                    x[:] = poison[stream]
                g = videos.create_group(vid)
                g.create_dataset("features", data=x.astype(np.float16))
                g.create_dataset("index", data=np.zeros((views, STEPS), np.int64))
                g.attrs["label"] = label
                g.attrs["views"] = views
    return store


def tiny_config(**train) -> RunConfig:
    """Stage 1 only, a tiny head, a few fast epochs."""
    t = dict(stage="head", epochs=6, batch_size=8, steps=STEPS, num_workers=0, patience=0, threads=1)
    t.update(train)
    return RunConfig(train=TrainConfig(**t), model=TINY, optim=OptimConfig(lr=1e-2, warmup_fraction=0.0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted head run on separable features, shared by the tests that read its folder."""
    folder = tmp_path_factory.mktemp("trained")
    store = make_data(folder, n=48, streams=("rgb",))
    events = []
    with pytest.MonkeyPatch.context() as mp:  # amp "auto" as on a CPU with native bfloat16, on any CPU
        mp.setattr("streams.train.cpu_has_native_bf16", lambda: True)
        path = train_stream(store, "rgb", folder / "run", tiny_config(epochs=8), "cpu", on_event=events.append)
    return path, events


# --- epoch order --------------------------------------------------------------------------------


def test_epoch_order_is_a_function_of_seed_and_epoch():
    labels = np.array([0] * 10 + [1] * 90)
    a, b = epoch_order(labels, 3, seed=1), epoch_order(labels, 3, seed=1)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, epoch_order(labels, 4, seed=1))
    assert not np.array_equal(a, epoch_order(labels, 3, seed=2))


@pytest.mark.parametrize(("minority", "share", "expected"), [(10, 0.4, 0.4), (10, 0.5, 0.5), (45, 0.4, 0.45)])
def test_weighted_order_oversamples_the_minority(minority, share, expected):
    labels = np.array([0] * minority + [1] * (100 - minority))
    drawn = np.concatenate([labels[epoch_order(labels, e, sampler="weighted", minority_share=share)]
                            for e in range(50)])
    assert abs((drawn == 0).mean() - expected) < 0.03


def test_shuffle_order_is_a_permutation():
    labels = np.arange(20) % 2
    assert sorted(epoch_order(labels, 0, sampler="shuffle").tolist()) == list(range(20))


def test_sampler_slices_the_global_order_per_process():
    labels = np.arange(11) % 2
    order = epoch_order(labels, 5, seed=3)
    parts = []
    for rank in range(3):
        s = EpochSampler(labels, seed=3, rank=rank, world=3)
        s.set_epoch(5)
        parts.append(s.indices())
        assert len(s) == len(parts[-1]) == 4
    padded = np.concatenate([order, order[:1]])  # DistributedSampler pads to a multiple of the world size
    assert np.array_equal(np.stack(parts, 1).reshape(-1), padded)


@pytest.mark.parametrize(("text", "expected"), [(None, None), ("0/5", (0, 5)), ("4/5", (4, 5))])
def test_parse_fold(text, expected):
    assert parse_fold(text) == expected


@pytest.mark.parametrize("text", ["5/5", "1", "a/b", "0/1"])
def test_parse_fold_rejects(text):
    with pytest.raises(ValueError, match="fold"):
        parse_fold(text)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="metric"):
        TrainConfig(metric="precision")
    with pytest.raises(ValueError, match="minority_share"):
        TrainConfig(minority_share=1.0)


# --- precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "native", "dtype", "projections_only"), [
    ("auto", False, None, False), ("auto", True, torch.bfloat16, True), ("off", True, None, False),
    ("bf16", False, torch.bfloat16, False), ("bf16", True, torch.bfloat16, False), ("fp16", True, torch.float16, False),
])
def test_precision_on_cpu(monkeypatch, mode, native, dtype, projections_only):
    monkeypatch.setattr("streams.train.cpu_has_native_bf16", lambda: native)
    p = resolve_precision(mode, torch.device("cpu"))
    assert (p.dtype, p.scale_loss, p.projections_only) == (dtype, False, projections_only)


def test_projection_precision_leaves_everything_else_in_float32():
    torch.manual_seed(0)
    head = build_head(TINY, DIM)
    use_fused_lstm(head)
    x = torch.randn(3, STEPS, DIM)
    ref = head(x)
    with Precision(torch.bfloat16, projections_only=True).autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert head.score[0](torch.randn(2, 16)).dtype == torch.float32
        out = head(x)
    assert out.dtype == torch.float32
    assert not torch.equal(out, ref)  # the projection did run in bfloat16 ...
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)  # ... to bfloat16's accuracy
    torch.testing.assert_close(head(x), ref, atol=0, rtol=0)  # and only inside the block


# --- stage-1 input ------------------------------------------------------------------------------


def test_feature_bank_serves_what_the_dataset_serves(tmp_path):
    store = make_data(tmp_path, n=8, streams=("rgb",), views=3)
    ds = FeatureDataset(features_path(store, "rgb", "vgg19"), [f"v{i:02d}" for i in range(8)], train=True, seed=4)
    bank = FeatureBank(ds)
    order = np.array([5, 2, 7, 0, 1])
    batches = list(bank.batches(order, 2, epoch=3))
    assert [len(b["video_id"]) for b in batches] == [2, 2, 1]
    ds.set_epoch(3)
    got = torch.cat([b["features"] for b in batches]).float()
    want = torch.stack([ds[int(i)]["features"] for i in order])
    assert torch.equal(got, want)
    assert sum((b["video_id"] for b in batches), []) == [ds.video_ids[i] for i in order]
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.tensor([ds.labels[i] for i in order]).float())


# --- one epoch, evaluation ----------------------------------------------------------------------


class _MeanScore(nn.Module):
    """A fixed 'head' whose logit is the mean of the first feature over time, minus a shift."""

    def __init__(self, shift: float = 0.75) -> None:
        super().__init__()
        self.shift = shift
        self.dropout = nn.Identity()
        self.w = nn.Parameter(torch.ones(1))

    def embed(self, x):
        return x[..., :1].mean(1)  # (N, 1)

    def out(self, e):
        return self.w * (e - self.shift)

    def forward(self, x):
        return self.out(self.embed(x)).squeeze(-1)


def test_evaluate_metrics_on_known_logits():
    x = torch.tensor([[[2.0]], [[0.0]], [[1.0]], [[0.5]]])  # logits 1.25, -0.75, 0.25, -0.25
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    batch = {"features": x, "label": labels, "video_id": ["a", "b", "c", "d"]}
    metrics, ids, lab, logits = evaluate(_MeanScore(), [batch], torch.device("cpu"))
    assert ids == ["a", "b", "c", "d"] and lab.tolist() == [1, 0, 0, 1]
    np.testing.assert_allclose(logits, [1.25, -0.75, 0.25, -0.25])
    assert metrics["accuracy"] == 0.5
    assert metrics["auc"] == 0.75
    assert math.isnan(metrics["loss"])


def test_train_one_epoch_follows_the_schedule_and_stops_on_nan():
    from streams.schedule import WarmupCosine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 1), nn.Flatten(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = WarmupCosine(opt, 4, 0.1, 0, 0.0)
    batches = [{"features": torch.randn(2, 1, 4), "label": torch.tensor([0.0, 1.0]), "video_id": ["a", "b"]}] * 2
    loss_fn = nn.BCEWithLogitsLoss()
    stats = train_one_epoch(model, batches, opt, loss_fn, 0, OptimConfig(), schedule=schedule,
                            device=torch.device("cpu"))
    assert stats["step"] == 2 and stats["clips"] == 4
    assert stats["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 3)))  # lr_at(1, 4)
    before = [p.detach().clone() for p in model.parameters()]
    bad = [{**batches[0], "features": torch.full((2, 1, 4), float("nan")), "video_id": ["x", "y"]}]
    with pytest.raises(NonFiniteLossError, match=r"epoch 7, step 2, batch of videos \[x, y\]"):
        train_one_epoch(model, bad, opt, loss_fn, 2, OptimConfig(), schedule=schedule, device=torch.device("cpu"),
                        epoch=7)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# --- whole runs ---------------------------------------------------------------------------------


def test_head_training_rises_well_above_chance(trained):
    path, events = trained
    records = RunDir(path.parent, "rgb").read_metrics()
    assert [r["epoch"] for r in records] == list(range(8))
    assert max(r["val_accuracy"] for r in records) >= 0.9  # chance is 0.5; 12 val videos, both labels
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert [e["event"] for e in events if e["event"] != "step"][-1] == "done"


def test_run_folder_holds_config_environment_and_predictions(trained):
    from fusion.predictions import load_split

    path, _ = trained
    cfg = read_toml(path / "config.toml")
    assert cfg["run"]["stream"] == "rgb" and cfg["train"]["epochs"] == 8 and cfg["model"]["lstm_hidden"] == 8
    assert RunConfig.from_dict(cfg).train.views == 2  # taken from the features file
    env = json.loads((path / "environment.json").read_text())
    assert {"python", "torch", "device", "hostname", "argv", "git_commit"} <= set(env)
    val, test = load_split(path, "val", embeddings=True), load_split(path, "test")
    assert len(val) == 12 and len(test) == 12 and set(val.labels) == {0, 1}
    assert val.embeddings.shape == (12, 8)
    assert ((val.logits > 0) == (val.labels == 1)).mean() >= 0.85
    best = load_checkpoint(path / "best.pt")
    records = RunDir(path.parent, "rgb").read_metrics()
    top = max(r["val_accuracy"] for r in records)
    assert best["metrics"]["val_accuracy"] == top and best["module"] == "head"


def test_nan_loss_stops_with_the_batch_named_and_keeps_the_last_good_checkpoint(tmp_path):
    store = make_data(tmp_path, n=16, streams=("rgb",))
    run = RunDir(tmp_path / "run", "rgb")
    run.prepare(resume=False)
    ds = FeatureDataset(features_path(store, "rgb", "vgg19"), [f"v{i:02d}" for i in range(16)], train=True)
    bank = FeatureBank(ds)
    head = build_head(TINY, DIM)
    opt = torch.optim.AdamW(head.parameters(), 1e-3)
    calls = []

    def loss_fn(logits, y):
        if torch.is_grad_enabled():  # training steps only, not evaluation
            calls.append(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y)
        return loss * float("nan") if len(calls) > 4 else loss  # two good epochs of 2 steps, then NaN

    cfg = TrainConfig(stage="head", epochs=4, batch_size=8, patience=0)
    with pytest.raises(NonFiniteLossError) as err:
        fit_stage(head, lambda e: bank.batches(np.arange(16), 8, e), lambda: bank.batches(np.arange(16), 8),
                  loss_fn, opt, stage=1, steps_per_epoch=2, cfg=cfg, optim=OptimConfig(),
                  device=torch.device("cpu"), run=run)
    msg = str(err.value)
    assert "epoch 2, step 4" in msg and "v00" in msg and str(run.checkpoint_path("last")) in msg
    last = torch.load(run.checkpoint_path("last"), weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1]


def test_single_class_training_split_is_refused(tmp_path):
    n = 12
    labels = [1 if i % 4 in (0, 1) else i % 2 for i in range(n)]  # every training video violent
    store = make_data(tmp_path, n=n, streams=("rgb",), labels=labels)
    with pytest.raises(ValueError, match="only label 1 .violent. videos"):
        train_stream(store, "rgb", tmp_path / "run", tiny_config(), "cpu")
    assert not (tmp_path / "run" / "rgb" / "last.pt").exists()


def test_fit_stage_stops_early_without_improvement(tmp_path):
    store = make_data(tmp_path, n=8, streams=("rgb",))
    ds = FeatureDataset(features_path(store, "rgb", "vgg19"), [f"v{i:02d}" for i in range(8)])
    bank = FeatureBank(ds)
    head = _MeanScore()
    opt = torch.optim.SGD(head.parameters(), lr=0.0)  # nothing changes, so nothing improves after epoch 0
    result = fit_stage(head, lambda e: bank.batches(np.arange(8), 4, e), lambda: bank.batches(np.arange(8), 4),
                       nn.BCEWithLogitsLoss(), opt, stage=1, steps_per_epoch=2,
                       cfg=TrainConfig(epochs=10, patience=3), optim=OptimConfig(grad_clip=0.0),
                       device=torch.device("cpu"), precision=Precision())
    assert result["stopped_early"] and result["epochs_run"] == 4
    assert result["best"]["epoch"] == 0


@pytest.mark.parametrize(("backbone", "recorded", "stale"), [
    ("hoghof", "current", False), ("hoghof", "older", True), ("hoghof", None, True),
    ("vgg19", None, False), ("vgg19", 0, False),
])
def test_a_stream_trained_on_other_descriptors_is_stale(tmp_path, backbone, recorded, stale):
    from dataclasses import replace

    from fusion.pipeline import check_run, train_run
    from streams.hoghof import VERSION
    from streams.rundir import load_stream_model

    run = RunDir(tmp_path, "rgb")
    info = {"stream": "rgb", "store": str(tmp_path / "s.h5")}
    if recorded is not None:
        info["encoder_version"] = {"current": VERSION, "older": VERSION - 1}.get(recorded, recorded)
    run.path.mkdir(parents=True)
    run.write_config(replace(tiny_config(), model=replace(TINY, backbone=backbone)), info)
    if not stale:
        run.check_encoder()
        return
    with pytest.raises(ValueError, match="predictions are stale") as caught:
        run.check_encoder()
    made = "an earlier version (unrecorded)" if recorded is None else f"version {VERSION - 1}"
    assert f"hoghof descriptors of {made}, and this twostream computes version {VERSION}" in str(caught.value)
    for split in ("val", "test"):  # a finished stream: fuse / evaluate refuse it, predict cannot load it
        (run.path / f"predictions_{split}.csv").write_text("video_id,label,logit\n")
    (tmp_path / "flow").mkdir()
    with pytest.raises(ValueError, match="stale"):
        check_run(tmp_path, streams=("rgb",))
    with pytest.raises(ValueError, match="stale"):
        load_stream_model(run.path)
    (run.path / "last.pt").write_bytes(b"")  # cut short: resuming it would carry on with other descriptors
    with pytest.raises(ValueError, match="stale"):
        train_run(tmp_path / "s.h5", tmp_path, tiny_config())
    with pytest.raises(ValueError, match="stale"):  # `twostream train --resume` alike
        train_stream(make_data(tmp_path / "data", n=8, streams=("rgb",)), "rgb", tmp_path, replace(tiny_config(), model=replace(TINY, backbone=backbone)),
                     "cpu", resume=True)


def test_a_stream_made_from_another_or_a_rebuilt_store_is_refused(tmp_path):
    import shutil

    from fusion.pipeline import check_run, train_run

    store = make_data(tmp_path / "data", n=8, streams=())
    with Store(store) as s:
        made_from = store_identity(s.root_attrs)
    assert made_from
    run = RunDir(tmp_path / "run", "rgb")
    run.path.mkdir(parents=True)
    run.write_config(tiny_config(), {"stream": "rgb", "store": str(store.resolve()), "store_id": made_from})
    for split in ("val", "test"):
        (run.path / f"predictions_{split}.csv").write_text("video_id,label,logit\n")
    (run.path / "best.pt").write_bytes(b"")
    run.check_store(store)  # the store it was made from passes
    check_run(tmp_path / "run", streams=("rgb",))
    elsewhere = make_data(tmp_path / "other", n=8, streams=())
    with pytest.raises(ValueError, match=r"was trained on the store .*, not .*other.*; choose another --out"):
        train_run(elsewhere, tmp_path / "run", tiny_config())
    with pytest.raises(ValueError, match=r"was trained on the store .*, not .*other"):  # `train --resume` alike
        (run.path / "last.pt").write_bytes(b"")
        train_stream(elsewhere, "rgb", tmp_path / "run", tiny_config(), "cpu", resume=True)
    (run.path / "last.pt").unlink()
    moved = tmp_path / "moved" / "s.h5"  # the same store at another path (its folder moved): the same store
    moved.parent.mkdir()
    shutil.copy(store, moved)
    run.check_store(moved)
    for path in (store, *store.parent.glob("*.features-*")):  # extracted again at the same path
        path.unlink()
    make_data(tmp_path / "data", n=8, streams=())
    with pytest.raises(ValueError, match="was extracted again after .* was trained on it"):
        check_run(tmp_path / "run", streams=("rgb",))
    with pytest.raises(ValueError, match="was extracted again"):
        train_run(store, tmp_path / "run", tiny_config())
