import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit

from data.clips import ClipConfig, ClipDataset, clip_inputs
from data.store import StoreWriter
from fusion import crossval
from fusion.crossval import cross_validate
from fusion.ensemble import load_ensemble
from fusion.late import load_fusion
from fusion.pipeline import (
    check_run,
    evaluate_run,
    fit_run,
    fuse_run,
    stream_predictions,
)
from fusion.predictions import write_predictions
from fusion.tta import tta_views
from streams.rundir import RunDir, build_model, resolve_run_config


def _ids(n, prefix):
    return [f"{prefix}{i:04d}" for i in range(n)]


def _complementary(n, seed):
    """Labels from a logistic model over two independent per-stream logits: each stream sees half the signal."""
    rng = np.random.default_rng(seed)
    rgb, flow = rng.normal(0, 2, n), rng.normal(0, 2, n)
    y = (rng.random(n) < expit(1.0 * rgb + 1.5 * flow)).astype(int)
    return y, {"rgb": rgb, "flow": flow}


def _perfect_and_noise(n, seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    return y, {"rgb": np.where(y == 1, 1.0, -1.0) * (6 + np.abs(rng.normal(0, 1, n))), "flow": rng.normal(0, 1, n)}


def _strong_and_noise(n, seed):
    """RGB ranks the videos well but not perfectly; flow is noise."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.6).astype(int)
    return y, {"rgb": (2 * y - 1) * 1.5 + rng.normal(0, 1, n), "flow": rng.normal(0, 1, n)}


def _noisy_copy(n, seed):
    """The labels of `_complementary` with its logits blurred: a weaker second run of the same videos."""
    y, logits = _complementary(n, seed)
    rng = np.random.default_rng(seed + 100)
    return y, {k: v + rng.normal(0, 3, n) for k, v in logits.items()}


def make_run(root: Path, make, n_val=400, n_test=600, seed=0, streams=("rgb", "flow")) -> Path:
    """A run folder holding only prediction CSVs, as `twostream train` writes them."""
    for split, n, s in (("val", n_val, seed), ("test", n_test, seed + 1)):
        y, logits = make(n, s)
        for stream in streams:
            write_predictions(root / stream / f"predictions_{split}.csv", _ids(n, f"{split}-"), y, logits[stream])
    return root


class TestFuse:
    def test_fused_beats_each_stream_on_complementary_streams(self, tmp_path):
        run = make_run(tmp_path / "run", _complementary)
        model = fuse_run(run)
        assert model.method == "learned" and model.fallback_reason is None
        assert load_fusion(run / "fusion.json") == model
        doc = json.loads((run / "fusion_comparison.json").read_text())
        test = doc["test"]
        assert set(test) == {"rgb", "flow", "average", "tsn", "fused"}
        assert test["fused"]["accuracy"] >= max(test["rgb"]["accuracy"], test["flow"]["accuracy"]) + 0.03
        assert set(doc["val"]) == set(test) and doc["tta"] == 1 and doc["fallback_reason"] is None

    def test_falls_back_to_the_better_stream_and_says_why(self, tmp_path):
        run = make_run(tmp_path / "run", _strong_and_noise, n_val=60, n_test=40)
        outcome = fit_run(run)
        assert outcome.model.method == "single" and outcome.model.selected == "rgb"
        assert "rgb alone" in outcome.fallback_reason
        doc = json.loads((run / "fusion_comparison.json").read_text())
        assert "rgb alone" in doc["fallback_reason"]
        assert doc["test"]["fused"]["accuracy"] == doc["test"]["rgb"]["accuracy"]

    def test_recall_floor_becomes_the_goal(self, tmp_path):
        run = make_run(tmp_path / "run", _complementary)
        model = fuse_run(run, min_recall=0.95)
        assert model.goal == "recall" and model.min_recall == 0.95

    def test_several_runs_give_a_simplex_ensemble_of_all_streams(self, tmp_path):
        a = make_run(tmp_path / "a", _complementary, seed=0)
        b = make_run(tmp_path / "b", _noisy_copy, seed=0)
        weights = fuse_run([a, b])
        assert load_ensemble(a / "ensemble.json") == weights
        assert set(weights.members) == {"a/rgb", "a/flow", "b/rgb", "b/flow"}
        assert sum(weights.weights) == pytest.approx(1.0) and min(weights.weights) >= 0

    def test_run_without_both_streams(self, tmp_path):
        run = make_run(tmp_path / "run", _complementary, streams=("rgb",))
        with pytest.raises(ValueError, match="no trained flow stream"):
            fuse_run(run)
        with pytest.raises(FileNotFoundError):
            check_run(tmp_path / "missing")

    def test_single_class_validation(self, tmp_path):
        def one_class(n, seed):
            return np.ones(n, int), {"rgb": np.linspace(-1, 1, n), "flow": np.linspace(1, -1, n)}

        run = make_run(tmp_path / "run", one_class, n_val=10, n_test=10)
        with pytest.raises(ValueError, match="only violent videos"):
            fuse_run(run)

    @pytest.mark.parametrize("k", [0, -2])
    def test_tta_below_one(self, tmp_path, k):
        run = make_run(tmp_path / "run", _complementary, n_val=20, n_test=20)
        with pytest.raises(ValueError, match="--tta must be at least 1"):
            fuse_run(run, tta=k)


def test_evaluate_writes_every_artefact(tmp_path):
    run = make_run(tmp_path / "run", _complementary)
    result = evaluate_run(run)
    eval_dir = run / "eval"
    for name in ("metrics.json", "report.md", "roc.png", "pr.png", "confusion.png", "predictions.csv"):
        assert (eval_dir / name).stat().st_size > 0, name
    doc = json.loads((eval_dir / "metrics.json").read_text())
    assert set(doc["models"]) == {"rgb", "flow", "fused"}
    assert doc["accuracy"] == doc["models"]["fused"]["accuracy"] == result["metrics"]["fused"]["accuracy"]
    assert doc["tta"] == 1 and "tsn" in doc["comparison"]["test"]
    assert doc["models"]["fused"]["threshold"] == pytest.approx(load_fusion(run / "fusion.json").threshold)
    header = (eval_dir / "predictions.csv").read_text().splitlines()[0]
    assert header == "video_id,label,rgb_probability,flow_probability,fused_probability,predicted"
    assert "fused" in (eval_dir / "report.md").read_text()
    # The fused model's calls against each stream's, on the same test videos.
    rows = (eval_dir / "predictions.csv").read_text().splitlines()[1:]
    right = {m: {} for m in ("rgb", "flow", "fused")}
    for row in rows:
        vid, label, *probs = row.split(",")[:5]
        for m, p in zip(("rgb", "flow", "fused"), probs, strict=True):
            right[m][vid] = (float(p) >= doc["models"][m]["threshold"]) == (label == "1")
    for s in ("rgb", "flow"):
        paired = doc["paired"][s]
        assert paired == result["paired"][s]
        assert paired["only_a"] == sum(right["fused"][v] and not right[s][v] for v in right[s])
        assert paired["only_b"] == sum(right[s][v] and not right["fused"][v] for v in right[s])
        assert paired["difference"] == pytest.approx(doc["models"]["fused"]["accuracy"] - doc["models"][s]["accuracy"])
    assert "## fused against each model" in (eval_dir / "report.md").read_text()


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- TTA over a real (tiny) model ---------------------------------------------------------------

SIDE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store and a stage-1 run of untrained tiny heads, with the predictions of view 0."""
    root = tmp_path_factory.mktemp("tta_run")
    store = root / "store.h5"
    rng = np.random.default_rng(0)
    ids = {"val": _ids(4, "val-"), "test": _ids(4, "test-")}
    with StoreWriter(store, flow_codec="float16") as w:
        for split, vids in ids.items():
            for i, vid in enumerate(vids):
                rgb = rng.integers(0, 255, (7, SIDE, SIDE, 3), dtype=np.uint8)
                flow = rng.normal(0, 3, (6, SIDE, SIDE, 2)).astype(np.float32)
                w.write(vid, rgb, flow, dict(label=i % 2, group=vid, split=split, source_path=f"/{vid}.mp4",
                                             source_fps=10.0, source_size=[SIDE, SIDE], flow_method="synthetic"))
    cfg = resolve_run_config(None, {"train": {"steps": 3, "stage": "head", "seed": 3},
                                    "model": {"backbone": "resnet50", "flow_stack": 2, "lstm_layers": 1,
                                              "lstm_hidden": 8, "attention_heads": 2, "dense_units": [8, 4]}})
    run = root / "run"
    clip = ClipConfig(steps=3, flow_stack=2)
    for stream in ("rgb", "flow"):
        rd = RunDir(run, stream)
        rd.path.mkdir(parents=True)
        rd.write_config(cfg, {"stream": stream, "store": str(store)})
        model = build_model(cfg, stream).eval()
        # A stage-1 run: the checkpoint holds the head; the backbone is the run's seeded initialisation.
        rd.save_checkpoint("best", {"stage": 1, "module": "head", "model": model.head.state_dict(), "epoch": 0})
        for split, vids in ids.items():
            ds = ClipDataset(store, vids, stream, clip)
            with torch.inference_mode():
                clips = clip_inputs(torch.utils.data.default_collate([ds[i] for i in range(len(ds))]), "cpu")
                feats = model.forward_features(clips)
                logits = model.forward_head(feats.half().float()).numpy()  # as from the float16 cache
            rd.write_predictions(split, vids, [i % 2 for i in range(len(vids))], logits)
    return run, store, cfg


def test_tta_recomputes_views_from_the_checkpoint(trained):
    run, store, cfg = trained
    plain = stream_predictions(run, "flow", "test", tta=1)
    two = stream_predictions(run, "flow", "test", tta=2)
    rows = (run / "flow" / "predictions_test_tta2.csv").read_text().splitlines()
    assert rows[0].endswith(",view") and len(rows) == 1 + 2 * 4
    # View 0 of the TTA rows is the clip the run's own predictions came from.
    view0 = {r.split(",")[0]: float(r.split(",")[2]) for r in rows[1:] if r.endswith(",0")}
    np.testing.assert_allclose([view0[v] for v in plain.video_ids], plain.logits, atol=1e-4)
    # The TTA prediction is the mean logit of the plain and the mirrored clip.
    view1 = {r.split(",")[0]: float(r.split(",")[2]) for r in rows[1:] if r.endswith(",1")}
    expected = [(view0[v] + view1[v]) / 2 for v in two.video_ids]
    np.testing.assert_allclose(two.logits, expected, atol=1e-9)
    assert not np.allclose(list(view0.values()), list(view1.values()))
    assert tta_views(2)[1].flip


def test_evaluate_with_tta_uses_views_on_val_and_test(trained):
    run, _, _ = trained
    result = evaluate_run(run, tta=2)
    assert result["tta"] == 2
    for stream in ("rgb", "flow"):
        for split in ("val", "test"):
            assert (run / stream / f"predictions_{split}_tta2.csv").is_file()
    assert json.loads((run / "eval" / "metrics.json").read_text())["tta"] == 2


def test_cv_refuses_more_folds_than_groups(trained):
    _, store, _ = trained
    with pytest.raises(ValueError, match="more than the 8 source recordings"):
        cross_validate(store, folds=9, out=store.parent / "cv")


def fake_fold_training(store_path, out, cfg, noise: float = 1.0) -> dict[str, str]:
    """Stand-in for `train_run` on one fold: each stream's val and test predictions, logits
    following the labels (flow twice as strongly as rgb) plus Gaussian noise, on the fold's own split."""
    from data.clips import video_ids_for_split
    from data.store import Store
    from streams.train import parse_fold

    ids = video_ids_for_split(store_path, fold=parse_fold(cfg.train.fold), seed=cfg.train.seed)
    with Store(store_path) as s:
        for split in ("val", "test"):
            y = np.array([s.label(v) for v in ids[split]])
            for k, stream in enumerate(("rgb", "flow")):
                logits = (2 * y - 1) * (1 + k) + np.random.default_rng(k).normal(0, noise, len(y))
                write_predictions(Path(out) / stream / f"predictions_{split}.csv", ids[split], y, logits)
    return {"rgb": "trained", "flow": "trained"}


def test_cross_validation_rounds_hold_out_whole_recordings(tmp_path, monkeypatch):
    from data.clips import video_ids_for_split
    from fusion.presets import CPU

    store = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    with StoreWriter(store, flow_codec="float16") as w:
        for i in range(40):  # 8 recordings of 5 clips
            w.write(f"v{i:02d}", rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8),
                    np.zeros((2, 16, 16, 2), np.float32),
                    dict(label=int(i % 5 < 2 + (i // 5) % 2), group=f"rec{i // 5}", source_path=f"/v{i}.mp4",
                         source_fps=10.0, source_size=[16, 16], flow_method="synthetic"))
    trained = []

    def fake_train(store_path, out, cfg, devices, on_event=None):
        trained.append(cfg.train.fold)
        return fake_fold_training(store_path, out, cfg, noise=2.5)  # noisy enough for some wrong calls

    monkeypatch.setattr(crossval, "train_run", fake_train)
    doc = cross_validate(store, folds=4, out=tmp_path / "cv", preset=CPU, inner_folds=0)
    assert trained == ["0/4", "1/4", "2/4", "3/4"]
    # Every video is tested exactly once, and a recording never in two test folds.
    tested = [json.loads((tmp_path / "cv" / f"fold{k}" / "eval" / "metrics.json").read_text()) for k in range(4)]
    groups_per_fold = []
    for k in range(4):
        ids = video_ids_for_split(store, fold=(k, 4))["test"]
        groups_per_fold.append({f"rec{int(v[1:]) // 5}" for v in ids})
        assert tested[k]["models"]["fused"]["n"] == len(ids)
    assert sum(len(g) for g in groups_per_fold) == 8 and set().union(*groups_per_fold) == {f"rec{i}" for i in range(8)}
    accs = [r["fused"]["accuracy"] for r in doc["rounds"]]
    assert doc["summary"]["fused"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert doc["summary"]["fused"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["folds"] == 4
    assert "± " in (tmp_path / "cv" / "cv.md").read_text()
    # Wrong calls add up per recording: each model's count matches its accuracy on the folds.
    by_rec = doc["by_recording"]
    assert sorted(by_rec) == [f"rec{i}" for i in range(8)]
    assert all(r["videos"] == 5 and r["violent"] == 2 + int(g[3:]) % 2 for g, r in by_rec.items())
    for m in ("rgb", "flow", "fused"):
        per_fold = [round((1 - r[m]["accuracy"]) * r["n_test"]) for r in doc["rounds"]]
        assert sum(r["wrong"][m] for r in by_rec.values()) == sum(per_fold) == sum(len(r["wrong"][m]) for r in doc["rounds"])
        for g, r in by_rec.items():
            assert r["wrong"][m] == sum(int(v[1:]) // 5 == int(g[3:]) for f in doc["rounds"] for v in f["wrong"][m])
    md = (tmp_path / "cv" / "cv.md").read_text()
    assert "## Wrong calls by recording" in md and len(re.findall(r"^\| rec\d \|", md, re.M)) == 8
    assert sum(r["wrong"]["rgb"] for r in by_rec.values()) > 0
    assert sorted(v for r in doc["rounds"] for v in r["tested"]) == [f"v{i:02d}" for i in range(40)]
    # The paired comparison pools every fold's calls: its counts are the wrong calls' set differences.
    wrong = {m: {v for f in doc["rounds"] for v in f["wrong"][m]} for m in ("rgb", "flow", "fused")}
    for s in ("rgb", "flow"):
        paired = doc["paired"][s]
        assert (paired["n"], paired["resampled"]) == (40, "recording")
        assert (paired["only_a"], paired["only_b"]) == (len(wrong[s] - wrong["fused"]), len(wrong["fused"] - wrong[s]))
        assert paired["difference"] == pytest.approx((len(wrong[s]) - len(wrong["fused"])) / 40)
        assert paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1]
    assert "## fused against each model" in md


def test_cross_validation_of_a_dataset_folder_indexes_and_extracts_it_first(tmp_path, monkeypatch):
    from data.store import Store
    from data.synthetic import SyntheticSpec, generate_dataset
    from fusion.presets import CPU

    data = generate_dataset(tmp_path / "data", SyntheticSpec(videos=32, recordings=8, frames=(6, 8), size=(48, 64)))
    seen = []

    def fake_train(store_path, out, cfg, devices, on_event=None):
        seen.append(Path(store_path))
        return fake_fold_training(store_path, out, cfg, noise=0.5)

    monkeypatch.setattr(crossval, "train_run", fake_train)
    doc = cross_validate(data, folds=2, out=tmp_path / "cv", preset=CPU, inner_folds=0)
    store = tmp_path / "cv" / "store.h5"
    assert set(seen) == {store} and (tmp_path / "cv" / "manifest.csv").is_file()
    with Store(store) as s:
        assert len(s) == 32 and s.root_attrs["flow_method"] == CPU.flow_method
    assert doc["folds"] == 2


def test_cross_validation_refuses_another_or_a_changed_dataset_in_its_folder(tmp_path, monkeypatch):
    from data.synthetic import SyntheticSpec, generate_dataset
    from fusion.presets import CPU

    spec = SyntheticSpec(videos=16, recordings=4, frames=(6, 8), size=(48, 64))
    data, other = generate_dataset(tmp_path / "a", spec), generate_dataset(tmp_path / "b", spec)
    monkeypatch.setattr(crossval, "train_run", lambda store_path, out, cfg, devices, on_event=None:
                        fake_fold_training(store_path, out, cfg))
    out = tmp_path / "cv"
    cross_validate(data, folds=2, out=out, preset=CPU, inner_folds=0)
    with pytest.raises(ValueError, match="holds the job of .*; choose another --out"):
        cross_validate(other, folds=2, out=out, preset=CPU, inner_folds=0)
    first = sorted(p for p in Path(data).rglob("*.mp4"))[0]
    first.unlink()  # the same dataset, one video fewer: its store and folds are of the old one
    with pytest.raises(ValueError, match=r"changed since .*manifest.csv was written \(1 removed\)"):
        cross_validate(data, folds=2, out=out, preset=CPU, inner_folds=0)


def test_dataset_changes_names_what_differs():
    from data.manifest import ManifestRow
    from fusion.pipeline import dataset_changes

    before = [ManifestRow("a", "/d/a.mp4", 1, "r1"), ManifestRow("b", "/d/b.mp4", 0, "r1"), ManifestRow("c", "/d/c.mp4", 0, "r2")]
    now = [ManifestRow("a", "/d/a.mp4", 0, "r1", "train"), ManifestRow("b", "/e/b.mp4", 0, "r2"),
           ManifestRow("d", "/d/d.mp4", 1, "r3")]
    assert dataset_changes(before, now) == "1 added, 1 removed, 1 relabelled, 1 moved to another recording, 1 at another path"
    assert dataset_changes(before, [ManifestRow(r.video_id, r.path, r.label, r.group, "test") for r in before]) == ""
    # Videos the store never held (unreadable ones) count only when added.
    assert dataset_changes(before, now, stored={"a"}) == "1 added, 1 relabelled"
    assert dataset_changes(before, before[:2], stored={"a", "b"}) == ""


def test_repeated_cross_validation_extracts_once_and_pools_every_repeat(tmp_path, monkeypatch):
    from data.synthetic import SyntheticSpec, generate_dataset
    from fusion.presets import CPU

    data = generate_dataset(tmp_path / "data", SyntheticSpec(videos=32, recordings=8, frames=(6, 8), size=(48, 64)))
    seen = []

    def fake_train(store_path, out, cfg, devices, on_event=None):
        seen.append((Path(store_path), cfg.train.seed))
        return fake_fold_training(store_path, out, cfg, noise=2.0)

    monkeypatch.setattr(crossval, "train_run", fake_train)
    events = []
    out = tmp_path / "cv"
    doc = crossval.repeated_cross_validate(data, 3, out, seed=2, on_event=events.append, folds=2, preset=CPU,
                                           inner_folds=0)
    assert {store for store, _ in seen} == {out / "store.h5"} and [s for _, s in seen] == [2, 2, 3, 3, 4, 4]
    assert [e["seed"] for e in events if e["event"] == "repeat"] == [2, 3, 4]
    runs = [json.loads((out / f"seed{s}" / "cv.json").read_text()) for s in (2, 3, 4)]
    assert [r["seed"] for r in runs] == [2, 3, 4] and doc["repeats"] == 3
    for m in ("rgb", "flow", "fused"):
        means = [r["summary"][m]["accuracy"]["mean"] for r in runs]
        assert doc["summary"][m]["accuracy"]["mean"] == pytest.approx(np.mean(means))
        assert doc["summary"][m]["accuracy"]["std"] == pytest.approx(np.std(means, ddof=1))
        assert sum(r["wrong"][m] for r in doc["by_recording"].values()) == sum(
            sum(g["wrong"][m] for g in r["by_recording"].values()) for r in runs)
    for s in ("rgb", "flow"):  # every repeat's calls pooled; no exact test over repeated calls
        pooled = doc["paired"][s]
        assert pooled["n"] == 3 * 32 and pooled["p_value"] is None and pooled["resampled"] == "recording"
        assert pooled["only_a"] == sum(r["paired"][s]["only_a"] for r in runs)
        assert pooled["only_b"] == sum(r["paired"][s]["only_b"] for r in runs)
        assert pooled["difference"] == pytest.approx(np.mean([r["paired"][s]["difference"] for r in runs]))
    md = (out / "cv.md").read_text()
    assert "# Repeated cross-validation: 3 x 2 folds" in md and "p n/a" in md and "| 4 |" in md
    assert json.loads((out / "cv.json").read_text())["runs"][2]["seed"] == 4


def test_repeated_cross_validation_with_a_config_counts_from_its_seed(tmp_path, monkeypatch):
    from fusion.presets import CPU

    store = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    with StoreWriter(store, flow_codec="float16") as w:
        for i in range(24):  # 6 recordings of 4 clips
            w.write(f"v{i:02d}", rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8), np.zeros((2, 16, 16, 2), np.float32),
                    dict(label=int(i % 4 < 2), group=f"rec{i // 4}", source_path=f"/v{i}.mp4", source_fps=10.0,
                         source_size=[16, 16], flow_method="synthetic"))
    monkeypatch.setattr(crossval, "train_run", lambda store_path, out, cfg, devices, on_event=None:
                        fake_fold_training(store_path, out, cfg))
    doc = crossval.repeated_cross_validate(store, 2, tmp_path / "cv", seed=0, config=CPU.run_config(seed=7), folds=2,
                                           preset=CPU, inner_folds=0)
    assert [r["seed"] for r in doc["runs"]] == [7, 8] and (tmp_path / "cv" / "seed8" / "cv.json").is_file()
    one = crossval.repeated_cross_validate(store, 1, tmp_path / "one", folds=2, preset=CPU, inner_folds=0)
    assert "repeats" not in one and (tmp_path / "one" / "fold1").is_dir()  # one repeat is plain cross-validation
    with pytest.raises(ValueError, match="--repeats must be at least 1"):
        crossval.repeated_cross_validate(store, 0, tmp_path / "none", folds=2, preset=CPU)


def test_preparing_a_dataset_with_a_broken_video_skips_it_and_says_where_why_is(tmp_path):
    from data.store import Store
    from data.synthetic import SyntheticSpec, generate_dataset
    from fusion.pipeline import prepare_store
    from fusion.presets import CPU

    data = generate_dataset(tmp_path / "data", SyntheticSpec(videos=4, recordings=2, frames=(6, 8), size=(48, 64)))
    broken = sorted(data.rglob("*.mp4"))[0]
    broken.write_bytes(b"not a video")
    steps = {}
    (tmp_path / "run").mkdir()
    store = prepare_store(data, tmp_path / "run", CPU, data / "groups.csv",
                          lambda name, status, start: steps.update({name: status}))
    with Store(store) as s:
        assert len(s) == 3
    assert steps["extract"].startswith("3 written, 0 reused, 1 failed (why: ")
    assert broken.name in Path(steps["extract"].split("why: ")[1].rstrip(")")).read_text()


def test_a_run_knows_the_recordings_of_its_store_and_fusion_holds_them_out(trained, tmp_path):
    from fusion.pipeline import fit_run, run_groups

    run, store, _ = trained
    groups = run_groups(run)
    assert groups == {v: v for v in [*_ids(4, "val-"), *_ids(4, "test-")]}  # each video its own recording here
    outcome = fit_run(run, out=tmp_path / "fusion.json")
    assert outcome.model.cv_by == "recording"
    assert run_groups(make_run(tmp_path / "bare", _complementary)) is None  # no config: nothing known


def test_a_run_whose_store_records_no_recordings_has_no_groups(trained, tmp_path):
    from fusion.pipeline import run_groups
    from streams.rundir import RunDir

    run, store, cfg = trained
    bare = tmp_path / "store.h5"
    with StoreWriter(bare, flow_codec="float16") as w:
        for i in range(2):
            w.write(f"v{i}", np.zeros((3, SIDE, SIDE, 3), np.uint8), np.zeros((2, SIDE, SIDE, 2), np.float32),
                    dict(label=i, group="", source_path=f"/v{i}.mp4", source_fps=10.0, source_size=[SIDE, SIDE],
                         flow_method="synthetic"))
    for name, info in (("no-groups", {"stream": "rgb", "store": str(bare)}), ("no-store", {"stream": "rgb"})):
        rd = RunDir(tmp_path / name, "rgb")
        rd.path.mkdir(parents=True)
        rd.write_config(cfg, info)
        assert run_groups(tmp_path / name) is None


def test_a_run_whose_store_is_gone_says_fusion_cannot_hold_out_recordings(trained, tmp_path, caplog):
    from fusion.pipeline import run_groups
    from streams.rundir import RunDir

    _, _, cfg = trained
    rd = RunDir(tmp_path / "moved", "rgb")
    rd.path.mkdir(parents=True)
    rd.write_config(cfg, {"stream": "rgb", "store": str(tmp_path / "gone.h5")})
    with caplog.at_level("WARNING", logger="fusion.pipeline"):
        assert run_groups(tmp_path / "moved") is None
    assert "gone.h5 the run was trained on is gone" in caplog.text and "single videos" in caplog.text
