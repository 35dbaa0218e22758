import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import fusion.oof as oof
from data.clips import video_ids_for_split
from data.store import Store, StoreWriter
from fusion.oof import check_inner_folds, inner_folds, out_of_fold, train_inner_head
from fusion.predictions import Predictions, load_split, read_predictions
from streams.config import ModelConfig, OptimConfig
from streams.features import FeatureDataset, features_path
from streams.launch import train_stream
from streams.rundir import RunConfig, RunDir
from streams.train import TrainConfig, parse_fold
from tests.fusion.test_pipeline import fake_fold_training
from tests.streams.test_train import features_attrs

STEPS, DIM = 4, 16
TINY = ModelConfig(lstm_layers=1, lstm_hidden=8, attention_heads=2, dense_units=(8,), dropout=0.0, lstm_dropout=0.0)
RECORDINGS, PER_RECORDING = 12, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _label(i: int) -> int:
    """Recordings 0-7 hold both classes; 8-9 only violent, 10-11 only non-violent videos."""
    rec, j = divmod(i, PER_RECORDING)
    return j % 2 if rec < 8 else int(rec < 10)


def make_store(folder: Path, seed: int = 0) -> Path:
    """A store of 48 videos from 12 recordings, and per stream a features file with separable classes."""
    folder.mkdir(parents=True, exist_ok=True)
    store = folder / "s.h5"
    n = RECORDINGS * PER_RECORDING
    ids, labels = [f"v{i:02d}" for i in range(n)], [_label(i) for i in range(n)]
    with StoreWriter(store, flow_codec="float16", root_attrs={"flow_method": "synthetic"}, threads=1) as w:
        for i, (vid, label) in enumerate(zip(ids, labels, strict=True)):
            w.write(vid, np.full((3, 16, 16, 3), 40 * label, np.uint8), np.zeros((2, 16, 16, 2), np.float32),
                    dict(label=label, group=f"rec{i // PER_RECORDING:02d}", source_path=f"/v/{vid}.mp4",
                         source_fps=10.0, source_size=[16, 16], flow_method="synthetic"))
    rng = np.random.default_rng(seed)
    for stream in ("rgb", "flow"):
        with h5py.File(features_path(store, stream, "vgg19"), "w") as f:
            f.attrs.update(features_attrs(store, stream, 2))
            videos = f.create_group("videos")
            for vid, label in zip(ids, labels, strict=True):
                x = rng.normal(size=(2, STEPS, DIM)).astype(np.float32)
                x[..., :4] += 1.0 * label
                g = videos.create_group(vid)
                g.create_dataset("features", data=x.astype(np.float16))
                g.create_dataset("index", data=np.zeros((2, STEPS), np.int64))
                g.attrs["label"] = label
                g.attrs["views"] = 2
    return store


def tiny_config(fold: str = "0/3", seed: int = 0) -> RunConfig:
    train = TrainConfig(stage="head", epochs=5, batch_size=8, steps=STEPS, num_workers=0, patience=0, threads=1,
                        fold=fold, seed=seed, metric="loss")
    return RunConfig(train=train, model=TINY, optim=OptimConfig(lr=1e-2, warmup_fraction=0.0))


@pytest.fixture(scope="module")
def fold_run(tmp_path_factory):
    """A store and one outer fold (0 of 3) with both streams' heads trained as `cross_validate` trains them."""
    root = tmp_path_factory.mktemp("oof")
    store = make_store(root)
    for stream in ("rgb", "flow"):
        train_stream(store, stream, root / "fold0", tiny_config(), "cpu")
    return store, root / "fold0"


def _group(video_id: str) -> str:
    return f"rec{int(video_id[1:]) // PER_RECORDING:02d}"


@pytest.mark.parametrize("k, ok", [(0, True), (2, True), (7, True), (1, False), (-2, False), (True, False), (2.0, False)])
def test_inner_fold_count(k, ok):
    if ok:
        assert check_inner_folds(k) == k
    else:
        with pytest.raises(ValueError, match="--inner-folds must be 0 .off. or at least 2"):
            check_inner_folds(k)


def test_inner_folds_split_the_non_test_part_by_recording(tmp_path):
    store = make_store(tmp_path)
    cfg = tiny_config("1/3").train
    ids = video_ids_for_split(store, fold=parse_fold(cfg.fold), seed=cfg.seed)
    split = inner_folds(store, cfg, 3)
    assert sorted(split.video_ids) == sorted(ids["train"] + ids["val"])  # every non-test video once
    assert not set(split.video_ids) & set(ids["test"])
    assert split.k == 3 and set(split.folds) == {0, 1, 2}
    for g in np.unique(split.groups):
        assert len(set(split.folds[split.groups == g])) == 1, g  # a recording in one inner fold only
    assert all(split.groups[i] == _group(v) for i, v in enumerate(split.video_ids))
    for f in range(3):  # each inner training part holds both classes
        assert set(split.labels[split.folds != f]) == {0, 1}


def test_more_inner_folds_than_recordings_of_a_class(tmp_path):
    store = make_store(tmp_path)
    cfg = tiny_config("0/3").train
    split = inner_folds(store, cfg, 2)
    n_violent = len(np.unique(split.groups[split.labels == 1]))
    n_calm = len(np.unique(split.groups[split.labels == 0]))
    k = min(n_violent, n_calm) + 1
    assert oof.max_inner_folds(store, cfg) == k - 1 and inner_folds(store, cfg, k - 1).k == k - 1
    with pytest.raises(ValueError, match=rf"--inner-folds {k} is more than the \d+ recordings with .*fold 0's "
                                         rf"non-test part; use at most {k - 1}"):
        inner_folds(store, cfg, k)


def test_out_of_fold_predictions_cover_the_non_test_part_once(fold_run, monkeypatch):
    store, fold_dir = fold_run
    calls = []
    real = oof.train_inner_head

    def spy(features, cfg, train_ids, predict_ids, epoch, device):
        z = real(features, cfg, train_ids, predict_ids, epoch, device)
        calls.append((Path(features), list(train_ids), list(predict_ids), epoch, z))
        return z

    monkeypatch.setattr(oof, "train_inner_head", spy)
    preds = out_of_fold(store, fold_dir, 3, ("cpu", "cpu"))
    ids = video_ids_for_split(store, fold=(0, 3), seed=0)
    non_test, test = set(ids["train"] + ids["val"]), set(ids["test"])
    assert len(calls) == 2 * 3  # K heads per stream
    for stream in ("rgb", "flow"):
        p = preds.fit[stream]
        assert sorted(p.video_ids) == sorted(non_test)
        with Store(store) as s:
            assert list(p.labels) == [s.label(v) for v in p.video_ids]
        assert read_predictions(fold_dir / stream / "predictions_oof.csv").video_ids.tolist() == p.video_ids.tolist()
        # The test videos are scored by the mean logit of the K inner heads.
        t = preds.test[stream]
        assert t.video_ids.tolist() == sorted(test)
        heads = [c[4][-len(test):] for c in (calls[:3] if stream == "rgb" else calls[3:])]
        np.testing.assert_allclose(t.logits, np.mean(heads, axis=0))
    held_out = []
    for i, (_, train_ids, predict_ids, epoch, _) in enumerate(calls):  # rgb's K heads, then flow's
        heldout_ids = predict_ids[: len(predict_ids) - len(test)]
        assert predict_ids[len(heldout_ids):] == sorted(test)
        assert not (set(train_ids) | set(heldout_ids)) & test  # the test videos never enter an inner fold
        assert set(train_ids) | set(heldout_ids) == non_test and not set(train_ids) & set(heldout_ids)
        assert not {_group(v) for v in train_ids} & {_group(v) for v in heldout_ids}
        held_out.append(frozenset(heldout_ids))
        stream = "rgb" if i < 3 else "flow"
        assert epoch == RunDir(fold_dir, stream).load_checkpoint("best")["epoch"]
    rgb_parts = held_out[:3]
    assert sorted(v for part in rgb_parts for v in part) == sorted(non_test) and held_out[3:] == rgb_parts
    meta = json.loads((fold_dir / "oof.json").read_text())
    assert meta["inner_folds"] == 3 and set(meta["fold_of"]) == non_test

    # A second call reuses the files instead of training again.
    monkeypatch.setattr(oof, "train_inner_head", lambda *a: pytest.fail("retrained"))
    again = out_of_fold(store, fold_dir, 3, ("cpu", "cpu"))
    assert np.array_equal(again.fit["rgb"].logits, preds.fit["rgb"].logits)
    assert np.array_equal(again.test["flow"].logits, preds.test["flow"].logits)


def test_an_inner_head_repeats_the_final_heads_training(fold_run):
    """Trained on the final head's own training part and taken at its best epoch, it gives that head's predictions."""
    store, fold_dir = fold_run
    run = RunDir(fold_dir, "flow")
    cfg, info = run.read_config()
    ids = video_ids_for_split(store, fold=(0, 3), seed=0)
    epoch = run.load_checkpoint("best")["epoch"]
    logits = train_inner_head(Path(info["features"]), cfg, ids["train"], ids["test"], epoch, torch.device("cpu"))
    final = load_split(fold_dir / "flow", "test")  # sorted by video id
    assert final.video_ids.tolist() == sorted(ids["test"])
    np.testing.assert_allclose(np.asarray(logits)[np.argsort(ids["test"])], final.logits, atol=1e-5)


def test_out_of_fold_refuses_a_fine_tuned_run(fold_run, tmp_path):
    import shutil

    store, fold_dir = fold_run
    copy = tmp_path / "fold"
    shutil.copytree(fold_dir, copy)
    (copy / "oof.json").unlink(missing_ok=True)
    rd = RunDir(copy, "rgb")
    best = rd.load_checkpoint("best")
    rd.save_checkpoint("best", {**best, "module": "model"})
    with pytest.raises(ValueError, match="stage = head"):
        out_of_fold(store, copy, 3)


def test_out_of_fold_refuses_features_made_again_for_another_seed(fold_run, tmp_path):
    import shutil

    store, fold_dir = fold_run
    root = tmp_path / "copy"
    shutil.copytree(store.parent, root)  # the store, its features and the fold, away from the shared fixture
    copy, moved = root / "fold0", root / store.name
    (copy / "oof.json").unlink(missing_ok=True)
    features = Path(RunDir(copy, "rgb").read_config()[1]["features"])
    features = root / features.name  # the copied features file, as the copied run is to use it
    for stream in ("rgb", "flow"):
        rd = RunDir(copy, stream)
        cfg, info = rd.read_config()
        rd.write_config(cfg, {**info, "store": str(moved), "features": str(root / Path(info["features"]).name)})
    with h5py.File(features, "a") as f:  # another seed's training remade the shared file since
        f.attrs["seed"] = 1
    with pytest.raises(ValueError, match=r"was made again by a backbone drawn with seed 1 \(the run's is 0\)"):
        out_of_fold(moved, copy, 3)


# --- cross-validation with inner folds ----------------------------------------------------------


def _fake_train(store_path, out, cfg, devices, on_event=None):
    return fake_fold_training(store_path, out, cfg)


def _fake_oof(seen):
    def fake(store, fold_dir, k, devices=("cpu", "cpu"), tta=1):
        """Out-of-fold predictions over the real inner split, logits following the labels."""
        fold = int(Path(fold_dir).name.removeprefix("fold"))
        split = inner_folds(store, TrainConfig(fold=f"{fold}/3", seed=0), k)
        seen.append((fold, k, set(split.video_ids)))
        rng = np.random.default_rng(fold)
        fit = {s: Predictions(split.video_ids, split.labels,
                              (2 * split.labels - 1) * (1 + j) + rng.normal(0, 1.5, len(split.labels)))
               for j, s in enumerate(("rgb", "flow"))}
        test = video_ids_for_split(store, fold=(fold, 3), seed=0)["test"]
        y = np.array([_label(int(v[1:])) for v in test])
        return oof.OutOfFold(fit, {s: Predictions(test, y, (2 * y - 1) * (3 + j)) for j, s in enumerate(("rgb", "flow"))})

    return fake


def test_cross_validation_fits_fusion_and_thresholds_on_out_of_fold_predictions(tmp_path, monkeypatch):
    import fusion.crossval as crossval
    from fusion.presets import CPU

    store = make_store(tmp_path)
    seen = []
    monkeypatch.setattr(crossval, "train_run", _fake_train)
    monkeypatch.setattr(oof, "out_of_fold", _fake_oof(seen))
    doc = crossval.cross_validate(store, folds=3, out=tmp_path / "cv", preset=CPU, inner_folds=3)
    assert [(f, k) for f, k, _ in seen] == [(0, 3), (1, 3), (2, 3)]
    assert doc["inner_folds"] == 3
    for fold, _, non_test in seen:
        ids = video_ids_for_split(store, fold=(fold, 3), seed=0)
        assert not non_test & set(ids["test"])
        comparison = json.loads((tmp_path / "cv" / f"fold{fold}" / "fusion_comparison.json").read_text())
        assert comparison["fitted_on"] == "out-of-fold"
        # Fusion and every threshold were fitted on the out-of-fold set, not on the val part.
        assert comparison["val"]["rgb"]["n"] == comparison["val"]["fused"]["n"] == len(non_test)
        assert len(non_test) > len(ids["val"])
        assert comparison["test"]["fused"]["n"] == len(ids["test"])
        assert doc["rounds"][fold]["n_fit"] == len(non_test)
        assert doc["rounds"][fold]["fitted_on"] == comparison["fitted_on"]
        # The test fold is scored with the inner heads' predictions, not the final heads'.
        import csv

        with (tmp_path / "cv" / f"fold{fold}" / "eval" / "predictions.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert sorted(r["video_id"] for r in rows) == sorted(ids["test"])
        for r in rows:
            assert float(r["rgb_probability"]) == pytest.approx(1 / (1 + np.exp(-(2 * int(r["label"]) - 1) * 3)))
    assert "out-of-fold predictions" in (tmp_path / "cv" / "cv.md").read_text()


def test_zero_inner_folds_is_the_plain_cross_validation(tmp_path, monkeypatch):
    import fusion.crossval as crossval
    from fusion.presets import CPU, with_changes

    store = make_store(tmp_path)
    monkeypatch.setattr(crossval, "train_run", _fake_train)
    monkeypatch.setattr(oof, "out_of_fold", lambda *a, **k: pytest.fail("inner folds with K = 0"))
    plain = crossval.cross_validate(store, folds=3, out=tmp_path / "a", preset=with_changes(CPU, inner_folds=0))
    zero = crossval.cross_validate(store, folds=3, out=tmp_path / "b", preset=CPU, inner_folds=0)
    assert plain["summary"] == zero["summary"] and zero["inner_folds"] == 0
    for fold in range(3):
        ids = video_ids_for_split(store, fold=(fold, 3), seed=0)
        assert zero["rounds"][fold]["n_fit"] == len(ids["val"])
        assert zero["rounds"][fold]["fitted_on"] == "validation"
        comparison = json.loads((tmp_path / "b" / f"fold{fold}" / "fusion_comparison.json").read_text())
        assert comparison["fitted_on"] == "validation"


@pytest.mark.parametrize("options, message", [({"inner_folds": 1}, "at least 2"),
                                              ({"inner_folds": 9}, "recordings with")])
def test_cross_validation_refuses_bad_inner_folds_before_training(tmp_path, monkeypatch, options, message):
    import fusion.crossval as crossval
    from fusion.presets import CPU

    store = make_store(tmp_path)
    monkeypatch.setattr(crossval, "train_run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=message):
        crossval.cross_validate(store, folds=3, out=tmp_path / "cv", preset=CPU, **options)


def test_the_presets_inner_folds_adapt_to_the_data_and_settings(tmp_path, monkeypatch):
    # An asked-for K that does not fit is refused (above); the preset's own K is lowered to the
    # most every outer fold allows, and turned off where it cannot apply (fine-tuned runs).
    import fusion.crossval as crossval
    from fusion.presets import CPU, with_changes

    store = make_store(tmp_path)
    seen = []
    monkeypatch.setattr(crossval, "train_run", _fake_train)
    monkeypatch.setattr(oof, "out_of_fold", _fake_oof(seen))
    doc = crossval.cross_validate(store, folds=3, out=tmp_path / "cv", preset=with_changes(CPU, inner_folds=9))
    ks = {k for _, k, _ in seen}
    assert len(ks) == 1 and 2 <= doc["inner_folds"] == ks.pop() < 9
    with pytest.raises(ValueError, match="recordings with"):  # one more than that does not fit
        crossval.cross_validate(store, folds=3, out=tmp_path / "x", preset=CPU, inner_folds=doc["inner_folds"] + 1)

    # With test-time views too: the inner heads are scored over them (fusion.oof), not turned off.
    views = crossval.cross_validate(store, folds=3, out=tmp_path / "tta", preset=CPU, tta=2)
    assert views["inner_folds"] == min(CPU.inner_folds, doc["inner_folds"]) and views["tta"] == 2

    base = CPU.run_config()
    assert crossval._preset_inner_folds(store, base, 3, 4) == min(4, doc["inner_folds"])
    both = replace(base, train=replace(base.train, stage="both"))
    assert crossval._preset_inner_folds(store, both, 3, 4) == 0


# --- inner heads over test-time views ------------------------------------------------------------


@pytest.fixture(scope="module")
def hoghof_fold(tmp_path_factory):
    """A store of real frames and flow, and fold 0 of 3 trained with the training-free encoder."""
    root = tmp_path_factory.mktemp("oof_tta")
    store = root / "s.h5"
    rng = np.random.default_rng(1)
    with StoreWriter(store, flow_codec="float16", root_attrs={"flow_method": "synthetic"}, threads=1) as w:
        for i in range(RECORDINGS * PER_RECORDING):
            label = _label(i)
            rgb = rng.integers(0, 255, (6, 24, 24, 3), dtype=np.uint8)
            flow = rng.normal(0, 1 + 2 * label, (5, 24, 24, 2)).astype(np.float32)
            w.write(f"v{i:02d}", rgb, flow, dict(label=label, group=f"rec{i // PER_RECORDING:02d}",
                                                   source_path=f"/v/v{i:02d}.mp4", source_fps=10.0,
                                                   source_size=[24, 24], flow_method="synthetic"))
    model = ModelConfig(backbone="hoghof", flow_stack=2, lstm_layers=1, lstm_hidden=8, attention_heads=2,
                        dense_units=(8,), dropout=0.0, lstm_dropout=0.0)
    train = TrainConfig(stage="head", epochs=3, batch_size=8, steps=3, num_workers=0, patience=0, threads=1,
                        fold="0/3", seed=0, metric="loss", views=1, minority_views=1)
    cfg = RunConfig(train=train, model=model, optim=OptimConfig(lr=1e-2, warmup_fraction=0.0))
    for stream in ("rgb", "flow"):
        train_stream(store, stream, root / "fold0", cfg, "cpu")
    return store, root / "fold0"


def test_out_of_fold_over_views_averages_each_inner_head_over_them(hoghof_fold, monkeypatch):
    from fusion.pipeline import ViewModel

    store, fold_dir = hoghof_fold
    seen, loaded = [], []
    real = oof.view_logits

    def spy(views, head, video_ids, tta):
        z = real(views, head, video_ids, tta)
        seen.append((views.stream, head, list(video_ids), tta, z))
        return z

    class CountedViewModel(ViewModel):
        def __init__(self, *a):
            super().__init__(*a)
            loaded.append(self.stream)

    monkeypatch.setattr(oof, "view_logits", spy)
    monkeypatch.setattr(oof, "ViewModel", CountedViewModel)
    monkeypatch.setattr(oof, "train_inner_head", lambda *a: pytest.fail("the cached plain view was used"))
    preds = out_of_fold(store, fold_dir, 3, ("cpu", "cpu"), tta=2)
    assert [(s, t) for s, _, _, t, _ in seen] == [("rgb", 2)] * 3 + [("flow", 2)] * 3
    assert loaded == ["rgb", "flow"]  # each stream's model is loaded once, its head swapped per inner fold
    assert json.loads((fold_dir / "oof.json").read_text())["tta"] == 2
    ids = video_ids_for_split(store, fold=(0, 3), seed=0)
    test = sorted(ids["test"])
    flow_heads = [z[-len(test):] for s, _, _, _, z in seen if s == "flow"]
    np.testing.assert_allclose(preds.test["flow"].logits, np.mean(flow_heads, axis=0))

    stream, head, video_ids, _, z = seen[-1]
    views = ViewModel(fold_dir / stream, "cpu")
    features = Path(RunDir(fold_dir, stream).read_config()[1]["features"])
    # View 0 computed on the fly is the cached plain view (float16-rounded features) ...
    plain = real(views, head, video_ids, 1)
    from streams.train import FeatureBank, predict

    bank = FeatureBank(FeatureDataset(features, video_ids))
    got_ids, _, cached, _ = predict(head, bank.batches(np.arange(len(bank)), 8), torch.device("cpu"))
    assert got_ids == video_ids
    np.testing.assert_allclose(plain, cached, atol=1e-4)
    # ... the two-view mean differs from it (view 1 is mirrored), and the order follows the ids asked for.
    assert not np.allclose(z, plain)
    np.testing.assert_allclose(real(views, head, video_ids[::-1], 2), z[::-1], atol=1e-9)

    # One view is another set of predictions: not reused for it.
    monkeypatch.undo()
    single = out_of_fold(store, fold_dir, 3, ("cpu", "cpu"), tta=1)
    assert json.loads((fold_dir / "oof.json").read_text())["tta"] == 1
    assert not np.allclose(single.fit["flow"].logits, preds.fit["flow"].logits)


def test_an_interrupted_recompute_is_never_reused(hoghof_fold, monkeypatch):
    # A recompute for other settings rewrites rgb's files before flow's; stopped in between, the
    # next call must not take rgb's new files with flow's old ones as one set.
    store, fold_dir = hoghof_fold
    out_of_fold(store, fold_dir, 3, ("cpu", "cpu"), tta=1)
    calls = []
    real = oof.view_logits

    def stop_at_flow(views, head, video_ids, tta):
        calls.append(views.stream)
        if views.stream == "flow":
            raise KeyboardInterrupt
        return real(views, head, video_ids, tta)

    monkeypatch.setattr(oof, "view_logits", stop_at_flow)
    with pytest.raises(KeyboardInterrupt):
        out_of_fold(store, fold_dir, 3, ("cpu", "cpu"), tta=2)
    assert calls == ["rgb"] * 3 + ["flow"] and not (fold_dir / "oof.json").exists()
    monkeypatch.undo()
    again = out_of_fold(store, fold_dir, 3, ("cpu", "cpu"), tta=1)  # recomputed, both streams with one view
    meta = json.loads((fold_dir / "oof.json").read_text())
    assert meta["tta"] == 1
    single = train_inner_head(Path(RunDir(fold_dir, "rgb").read_config()[1]["features"]),
                              RunDir(fold_dir, "rgb").read_config()[0],
                              [v for v, f in meta["fold_of"].items() if f != 0],
                              [v for v, f in meta["fold_of"].items() if f == 0], meta["epoch"]["rgb"],
                              torch.device("cpu"))
    got = dict(zip(again.fit["rgb"].video_ids, again.fit["rgb"].logits, strict=True))
    np.testing.assert_allclose([got[v] for v, f in meta["fold_of"].items() if f == 0], single, atol=1e-6)


def test_logistic_inner_heads_are_fitted_in_closed_form(tmp_path):
    from streams.logistic import fit_logistic, view0_features

    store = make_store(tmp_path)
    cfg = tiny_config()
    cfg = RunConfig(train=cfg.train, model=ModelConfig(**{**TINY.__dict__, "head": "logistic"}), optim=cfg.optim)
    for stream in ("rgb", "flow"):
        train_stream(store, stream, tmp_path / "fold0", cfg, "cpu")
    preds = out_of_fold(store, tmp_path / "fold0", 3, ("cpu", "cpu"))
    split = inner_folds(store, cfg.train, 3)
    features = Path(RunDir(tmp_path / "fold0", "flow").read_config()[1]["features"])
    held = split.folds == 0
    from streams.heads import build_head

    ds = FeatureDataset(features, split.video_ids[~held].tolist())
    head = fit_logistic(build_head(cfg.model, ds.feature_dim), *view0_features(ds), cfg.model.logistic_c).eval()
    target = FeatureDataset(features, split.video_ids[held].tolist())
    with torch.no_grad():
        expected = head(torch.stack([target[i]["features"] for i in range(len(target))])).numpy()
    got = dict(zip(preds.fit["flow"].video_ids, preds.fit["flow"].logits, strict=True))
    np.testing.assert_allclose([got[v] for v in target.video_ids], expected, atol=1e-6)
