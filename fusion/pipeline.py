"""A trained run, end to end: its streams' predictions (with TTA), fusion, evaluation, the main job.

A run folder holds `RUN/rgb/` and `RUN/flow/` as `twostream train` writes them (config.toml,
best.pt, predictions_val.csv, predictions_test.csv). From there:

- `stream_predictions`: a stream's per-video predictions on val or test. With one view they are
  the run's CSVs; with K > 1 views (fusion.tta) best.pt is rebuilt from the saved config and run
  over the store once per view, and the mean logit per video is kept. A head-only (stage-1) run
  sees its features computed on the fly by the seeded backbone it was trained on, rounded to
  float16 as the features cache stores them. The per-view rows are cached as
  `RUN/<stream>/predictions_<split>_tta<K>.csv` (with a view column) until best.pt changes.
- `fuse_run`: late fusion fitted on validation only (fusion.late), written to RUN/fusion.json,
  with the comparison against each stream, plain averaging and TSN 1:1.5 on val and test in
  RUN/fusion_comparison.json. Several runs: a simplex-weighted ensemble of all their streams
  (fusion.ensemble).
- `evaluate_run`: RUN/eval/ (metrics.json, report.md, roc.png, pr.png, confusion.png,
  predictions.csv) for RGB, flow and fused on test, each at its operating threshold chosen on
  validation.
- `run_job`: index -> extract -> train both streams -> fuse -> evaluate, resuming whatever an
  interrupted run finished.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusion.ensemble import EnsembleWeights, combine, fit_ensemble, save_ensemble
from fusion.late import FusionConfig, FusionModel, baselines, fit_fusion, fuse, save_fusion
from fusion.metrics import compute_metrics, paired_comparison
from fusion.predictions import Predictions, align_all, load_split, read_predictions, write_atomic
from fusion.threshold import choose_threshold
from fusion.tta import average_predictions, check_tta, tta_views

logger = logging.getLogger(__name__)

STREAMS = ("rgb", "flow")
SPLITS = ("val", "test")
Event = Callable[[dict], None]
# Metrics kept per candidate in the fusion comparison.
_SUMMARY_KEYS = ("threshold", "accuracy", "macro_f1", "roc_auc", "log_loss")


# --- a run's streams ----------------------------------------------------------------------------


def check_run(run_dir: str | Path, streams: Sequence[str] = STREAMS) -> Path:
    """The run folder, or a one-line error naming the first stream that has no predictions or
    stale ones (`streams.rundir.RunDir.check_current`)."""
    from streams.rundir import RunDir

    run = Path(run_dir)
    if run.is_file():
        raise NotADirectoryError(f"{run} is a file, not a run folder (made by `twostream train` or `run`)")
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    for stream in streams:
        for split in SPLITS:
            path = run / stream / f"predictions_{split}.csv"
            if not path.is_file():
                raise ValueError(
                    f"{run} has no trained {stream} stream ({path.relative_to(run)} is missing); "
                    f"train it with `twostream train STORE --stream {stream} --out {run}`"
                )
        RunDir(run, stream).check_current()
    return run


def _tta_path(stream_dir: Path, split: str, k: int) -> Path:
    return stream_dir / f"predictions_{split}_tta{k}.csv"


def _fresh(path: Path, source: Path) -> bool:
    return path.is_file() and source.is_file() and path.stat().st_mtime >= source.stat().st_mtime


def clip_forward(model, module: str):
    """A run's model as clips (N, T, C, H, W) -> logits (N,); `module` is its checkpoint's ("head" or "model").

    A head-only (stage-1) model gets its backbone features rounded to float16 first, as the
    features cache it was trained on stores them.
    """
    if module != "head":
        return model

    def forward(clips):
        feats = model.forward_features(clips)  # (N, T, D)
        # The head was trained on features cached as float16; round the same way.
        return model.forward_head(feats.half().float())

    return forward


class ViewModel:
    """A run's stream model rebuilt from its best.pt, scored over test-time views of the store it was trained on.

    `model.head` may be swapped for another head of the same config (fusion.oof's inner heads).
    """

    def __init__(self, stream_dir: Path, device) -> None:
        from data.clips import ClipConfig
        from data.store import store_exists
        from streams.rundir import load_stream_model
        from streams.train import use_fused_lstm

        self.model, cfg, info = load_stream_model(stream_dir, "best", _device(device))
        self.device = next(self.model.parameters()).device
        if self.device.type == "cpu":
            use_fused_lstm(self.model)  # same results, faster recurrent layers on a CPU
        self.store = Path(info["run"].get("store", ""))
        if not store_exists(self.store):
            raise FileNotFoundError(
                f"{stream_dir} was trained on store {self.store}, which no longer exists; TTA needs it"
            )
        self.stream = stream_dir.name
        self.clip = ClipConfig(steps=cfg.train.steps, flow_stack=cfg.model.flow_stack, size=cfg.train.size)
        self.forward = clip_forward(self.model, info.get("module") or "model")

    def predict(self, video_ids: Sequence[str], k: int, batch_size: int = 8):
        """Per-row (video ids, labels, logits, view numbers) over the first `k` views (fusion.tta.predict_views)."""
        from fusion.tta import predict_views

        return predict_views(self.forward, self.store, list(video_ids), self.stream, self.clip, tta_views(k),
                             batch_size, self.device)


def _compute_tta(stream_dir: Path, splits: Sequence[str], k: int, device: str, batch_size: int) -> None:
    """Write `predictions_<split>_tta<k>.csv` for each split: every view of every video of that split."""
    from fusion.predictions import write_predictions

    views = ViewModel(stream_dir, device)
    for split in splits:
        # The run's own CSV names the videos of the split, so TTA keeps the split it was trained with.
        ids = load_split(stream_dir, split).video_ids.tolist()
        ids_r, labels, logits, view_of = views.predict(ids, k, batch_size)
        write_predictions(_tta_path(stream_dir, split, k), ids_r, labels, logits, view_of)


def _device(device: str):
    from flow.devices import resolve_device

    return resolve_device(device)


def stream_predictions(
    run_dir: str | Path,
    stream: str,
    split: str,
    tta: int = 1,
    device: str = "auto",
    batch_size: int = 8,
) -> Predictions:
    """Per-video predictions of one stream of a run on "val" or "test", over `tta` views."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected val or test")
    k = check_tta(tta)
    stream_dir = Path(run_dir) / stream
    if k == 1:
        return load_split(stream_dir, split)
    path = _tta_path(stream_dir, split, k)
    if not _fresh(path, stream_dir / "best.pt"):
        logger.info("%s: computing %d-view predictions for %s", stream_dir, k, split)
        _compute_tta(stream_dir, [split], k, device, batch_size)
    rows = read_predictions(path)  # view rows are merged into the mean logit per video here
    return average_predictions(rows.video_ids, rows.labels, rows.logits)


def run_predictions(
    run_dir: str | Path, tta: int = 1, device: str = "auto"
) -> tuple[dict[str, Predictions], dict[str, Predictions]]:
    """(val, test) predictions of both streams of a run: stream -> Predictions."""
    run = check_run(run_dir)
    k = check_tta(tta)
    if k > 1:  # one model load per stream for both splits
        for s in STREAMS:
            stale = [split for split in SPLITS if not _fresh(_tta_path(run / s, split, k), run / s / "best.pt")]
            if stale:
                _compute_tta(run / s, stale, k, device, batch_size=8)
    val = {s: stream_predictions(run, s, "val", tta, device) for s in STREAMS}
    test = {s: stream_predictions(run, s, "test", tta, device) for s in STREAMS}
    return val, test


# --- fusion -------------------------------------------------------------------------------------


def _fusion_config(goal: str, min_recall: float | None) -> FusionConfig:
    if min_recall is not None and not 0.0 < min_recall <= 1.0:  # NaN fails too
        raise ValueError(f"--min-recall must be in (0, 1], e.g. 0.95; got {min_recall}")
    if min_recall is not None:
        goal = "recall"  # a recall floor is a goal of its own
    return FusionConfig(goal=goal, min_recall=min_recall)


def _check_val(val: Mapping[str, Predictions]) -> None:
    for name, p in val.items():
        if len(p) == 0:
            raise ValueError(f"the validation predictions of {name} are empty; fusion needs validation videos")
    labels = next(iter(val.values())).labels
    if labels.min() == labels.max():
        only = "violent" if labels[0] == 1 else "non-violent"
        raise ValueError(
            f"the validation set holds only {only} videos ({len(labels)}); fusion needs both classes"
        )


def _summary(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    m = compute_metrics(labels, probs, threshold)
    return {k: m[k] for k in _SUMMARY_KEYS} | {"n": m["n"]}


def compare_candidates(
    val: Mapping[str, Predictions],
    test: Mapping[str, Predictions],
    fused: Callable[[Mapping[str, Predictions]], Predictions],
    fused_threshold: float,
    cfg: FusionConfig,
    name: str = "fused",
) -> dict[str, dict[str, dict]]:
    """{"val": {candidate: metrics}, "test": {...}} for each input alone, average, TSN and the fusion.

    Each baseline's threshold is chosen on validation for the goal; the fusion keeps its own.
    Validation figures of the fusion are in-sample (it was fitted there).
    """
    out: dict[str, dict[str, dict]] = {"val": {}, "test": {}}
    base_val = baselines(val, dict(cfg.tsn_weights))
    base_test = baselines(test, dict(cfg.tsn_weights))
    for cand, pv in base_val.items():
        thr = choose_threshold(pv.labels, pv.probabilities, cfg.goal, cfg.min_recall)
        out["val"][cand] = _summary(pv.labels, pv.probabilities, thr)
        pt = base_test[cand]
        out["test"][cand] = _summary(pt.labels, pt.probabilities, thr)
    for split, inputs in (("val", val), ("test", test)):
        p = fused(inputs)
        out[split][name] = _summary(p.labels, p.probabilities, fused_threshold)
    return out


@dataclass(frozen=True)
class FusionOutcome:
    """A fitted fusion of one run (or an ensemble of several) with its predictions and comparison."""

    model: FusionModel | EnsembleWeights  # what was fitted on validation
    path: Path  # where it was written
    val: dict[str, Predictions]  # input name -> validation predictions
    test: dict[str, Predictions]  # input name -> test predictions
    comparison: dict[str, dict[str, dict]] = field(default_factory=dict)  # split -> candidate -> metrics
    tta: int = 1  # views per video the predictions average

    def fused(self, split: str) -> Predictions:
        """The fused predictions on "val" or "test"."""
        inputs = self.val if split == "val" else self.test
        if isinstance(self.model, FusionModel):
            return fuse(self.model, inputs)
        return combine(self.model, inputs)

    @property
    def threshold(self) -> float:
        return float(self.model.threshold)

    @property
    def fallback_reason(self) -> str | None:
        return getattr(self.model, "fallback_reason", None)


def stream_fingerprints(run_dir: str | Path) -> dict[str, str]:
    """Stream -> a digest of its predictions_val.csv, which training writes anew with every best.pt:
    recorded with a fusion, it tells whether a stream was trained again since (copies keep it,
    unlike file times). Streams without that file are left out."""
    import hashlib

    out = {}
    for s in STREAMS:
        path = Path(run_dir) / s / "predictions_val.csv"
        if path.is_file():
            out[s] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return out


def run_groups(run_dir: str | Path, video_ids: Sequence[str] | None = None) -> dict[str, str] | None:
    """Video id -> source recording in the store a run was trained on, for `video_ids` (default:
    every video there); None when the run or store does not say.

    A video without a recorded group is its own recording.
    """
    from data.store import Store, store_exists
    from streams.rundir import RunDir

    try:
        _, info = RunDir(Path(run_dir), STREAMS[0]).read_config()
    except FileNotFoundError:  # a run made of prediction files only
        return None
    except ValueError as exc:
        logger.warning("cannot read the recordings of %s (%s): fusion's folds hold out single videos", run_dir, exc)
        return None
    if not info.get("store"):
        return None
    store = Path(info["store"])
    if store.is_dir() or not store_exists(store):
        logger.warning("the store %s the run was trained on is gone: its recordings are unknown, so fusion's "
                       "folds hold out single videos", store)
        return None
    with Store(store) as s:
        recorded = {v: s.attrs(v).get("group") for v in (s.video_ids if video_ids is None else video_ids) if v in s}
    if not any(recorded.values()):
        return None  # a store without recordings: folds can only hold out videos
    return {v: str(g or v) for v, g in recorded.items()}  # as Store.recording: no group, its own recording


def fit_run(
    run_dirs: Sequence[str | Path] | str | Path,
    tta: int = 1,
    goal: str = "accuracy",
    min_recall: float | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    fit_set: Mapping[str, Predictions] | None = None,
    test_set: Mapping[str, Predictions] | None = None,
) -> FusionOutcome:
    """Fit fusion on validation, write it and its comparison; see `fuse_run`.

    `fit_set` (stream -> predictions; one run only) replaces the validation predictions as the set
    fusion and every threshold are fitted on, e.g. out-of-fold predictions (fusion.oof);
    `test_set` likewise replaces the test predictions (e.g. the inner heads' mean on the test part).
    """
    runs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(r) for r in run_dirs]
    if not runs:
        raise ValueError("fusion needs at least one run folder")
    seen: set[Path] = set()
    for r in runs:
        if r.resolve() in seen:
            raise ValueError(f"run folder {r} is given twice; an ensemble combines different runs")
        seen.add(r.resolve())
    k = check_tta(tta)
    cfg = _fusion_config(goal, min_recall)
    if (fit_set is not None or test_set is not None) and len(runs) != 1:
        raise ValueError("a fit or test set replaces the predictions of one run, not of an ensemble")
    for name, given in (("fit", fit_set), ("test", test_set)):
        if given is not None and not set(STREAMS) <= set(given):
            raise ValueError(f"the {name} set needs predictions of both streams; it has {', '.join(given) or 'none'}")
    if len(runs) == 1:
        if fit_set is not None and test_set is not None:  # the run's own heads predict nothing here
            check_run(runs[0])
            val, test = {s: fit_set[s] for s in STREAMS}, {s: test_set[s] for s in STREAMS}
        else:
            val, test = run_predictions(runs[0], k, device)
            if fit_set is not None:
                val = {s: fit_set[s] for s in STREAMS}
            if test_set is not None:
                test = {s: test_set[s] for s in STREAMS}
        _check_val(val)
        model = fit_fusion(val, cfg, run_groups(runs[0], val[STREAMS[0]].video_ids.tolist()))
        model = replace(model, trained=stream_fingerprints(runs[0]))
        path = save_fusion(model, Path(out) if out else runs[0] / "fusion.json")

        def fused(inputs):
            return fuse(model, inputs)

    else:
        val, test = {}, {}
        names = _member_names(runs)
        for run, name in zip(runs, names, strict=True):
            v, t = run_predictions(run, k, device)
            for s in STREAMS:
                val[f"{name}/{s}"], test[f"{name}/{s}"] = v[s], t[s]
        _check_val(val)
        model = fit_ensemble(val, "logit", cfg.goal, cfg.min_recall)
        path = save_ensemble(model, Path(out) if out else runs[0] / "ensemble.json")

        def fused(inputs):
            return combine(model, inputs)

    name = "fused" if isinstance(model, FusionModel) else "ensemble"
    comparison = compare_candidates(val, test, fused, float(model.threshold), cfg, name)
    doc = {"tta": k, "goal": cfg.goal, "min_recall": cfg.min_recall, "runs": [str(r) for r in runs],
           "fitted_on": "validation" if fit_set is None else "out-of-fold",
           "tested_on": "the run's heads" if test_set is None else "inner-fold heads",
           "model": str(path), "fallback_reason": getattr(model, "fallback_reason", None), **comparison}
    write_atomic(path.with_name(path.stem + "_comparison.json"), json.dumps(doc, indent=2) + "\n")
    return FusionOutcome(model, path, val, test, comparison, k)


def _member_names(runs: Sequence[Path]) -> list[str]:
    """Unique member names from the run folders' names (a numeric suffix where two share one)."""
    names, seen = [], {}
    for run in runs:
        base = run.resolve().name or "run"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def fuse_run(
    run_dirs: Sequence[str | Path] | str | Path,
    tta: int = 1,
    goal: str = "accuracy",
    min_recall: float | None = None,
    device: str = "auto",
) -> FusionModel | EnsembleWeights:
    """Fit late fusion of a run's RGB and flow streams on validation; write RUN/fusion.json.

    Several runs give a simplex-weighted ensemble over all their streams, written to the first
    run's ensemble.json. A recall floor (`min_recall`) makes the operating goal "recall". The
    comparison with each stream, averaging and TSN 1:1.5 on val and test goes next to the model
    (`<model>_comparison.json`); a learned fusion worse than the best stream on validation falls
    back to that stream and says why (`fallback_reason`).
    """
    return fit_run(run_dirs, tta, goal, min_recall, device).model


# --- evaluation ---------------------------------------------------------------------------------


def evaluate_run(
    run_dir: str | Path,
    tta: int = 1,
    goal: str = "accuracy",
    min_recall: float | None = None,
    device: str = "auto",
    fit_set: Mapping[str, Predictions] | None = None,
    test_set: Mapping[str, Predictions] | None = None,
) -> dict[str, Any]:
    """Fuse on validation (or on `fit_set`, see `fit_run`), evaluate RGB, flow and fused on test
    (or on `test_set`); write RUN/eval/.

    Returns {"metrics": {"rgb", "flow", "fused"} -> compute_metrics dict, "report": report.md path,
    "eval_dir", "tta", "fallback_reason", "fusion_method" ("learned", "equal", "single"; None for an
    ensemble), "comparison", "n_fit", "tested": the test videos (sorted ids), "wrong": {"rgb", "flow", "fused"} -> those each
    model calls wrongly at its threshold (sorted ids), "paired": {"rgb", "flow"} -> the fused model's
    calls against that stream's on the same test videos (`fusion.metrics.paired_comparison`)}.
    """
    from fusion.report import write_report

    run = check_run(run_dir)
    outcome = fit_run(run, tta, goal, min_recall, device, fit_set=fit_set, test_set=test_set)
    cfg = _fusion_config(goal, min_recall)
    test = align_all(outcome.test)
    results: dict[str, dict] = {}
    predictions: dict[str, Predictions] = {}
    thresholds: dict[str, float] = {}
    for s in STREAMS:
        pv = outcome.val[s]
        thresholds[s] = choose_threshold(pv.labels, pv.probabilities, cfg.goal, cfg.min_recall)
        predictions[s] = test[s]
    predictions["fused"], thresholds["fused"] = outcome.fused("test"), outcome.threshold
    for m, p in predictions.items():
        results[m] = compute_metrics(p.labels, p.probabilities, thresholds[m])
    right = {m: _right_calls(p, thresholds[m]) for m, p in predictions.items()}
    ids = sorted(right["fused"])
    recordings = run_groups(run, ids)
    groups = None if recordings is None else np.array([recordings.get(v, v) for v in ids])
    paired = {s: paired_comparison([right["fused"][v] for v in ids], [right[s][v] for v in ids], groups)
              for s in STREAMS}
    eval_dir = run / "eval"
    title = f"twostream evaluation: {run.resolve().name}" + (f" ({outcome.tta} TTA views)" if outcome.tta > 1 else "")
    write_report(eval_dir, results, predictions=predictions, goal=cfg.goal, min_recall=cfg.min_recall,
                 fusion=outcome.model.to_dict(), title=title, split="test", paired=paired)
    # metrics.json stays the last file written: it gains the view count and the baselines.
    metrics_path = eval_dir / "metrics.json"
    doc = json.loads(metrics_path.read_text(encoding="utf-8"))
    doc.update(tta=outcome.tta, comparison=outcome.comparison)
    write_atomic(metrics_path, json.dumps(doc, indent=2) + "\n")
    return {
        "metrics": results,
        "report": eval_dir / "report.md",
        "eval_dir": eval_dir,
        "tta": outcome.tta,
        "fallback_reason": outcome.fallback_reason,
        "fusion_method": getattr(outcome.model, "method", None),
        "comparison": outcome.comparison,
        "n_fit": len(outcome.val["rgb"]),
        "tested": ids,
        "wrong": {m: sorted(v for v, ok in right[m].items() if not ok) for m in predictions},
        "paired": paired,
    }


def _right_calls(p: Predictions, threshold: float) -> dict[str, bool]:
    """Video id -> whether its call at `threshold` (violent when probability >= it) is right."""
    ok = (p.probabilities >= threshold) == (p.labels == 1)
    return dict(zip((str(v) for v in p.video_ids), ok.tolist(), strict=True))


# --- training both streams ----------------------------------------------------------------------


def _stream_done(run: Path, stream: str) -> bool:
    d = run / stream
    return all((d / name).is_file() for name in ("best.pt", "predictions_val.csv", "predictions_test.csv"))


def train_run(
    store: str | Path,
    out: str | Path,
    cfg,
    devices: Sequence[str] = ("cpu", "cpu"),
    on_event: Event | None = None,
) -> dict[str, str]:
    """Train whichever streams of `out` are unfinished, both at once; returns stream -> "trained"|"reused".

    A stream with best.pt and both prediction files is reused when it was trained with the same
    settings (else ValueError: the folder holds another job); one with last.pt resumes; the rest
    start fresh. Raises ValueError naming the log of a stream that failed.
    """
    from streams.launch import train_both, train_stream
    from streams.rundir import RUNTIME_KEYS, RunDir, config_differences

    out = Path(out)
    todo = [s for s in STREAMS if not _stream_done(out, s)]
    status = {s: "reused" for s in STREAMS if s not in todo}
    for s in status:
        RunDir(out, s).check_current(store)
        saved, _ = RunDir(out, s).read_config()
        diff = config_differences(saved, cfg, RUNTIME_KEYS)
        if diff:
            raise ValueError(f"{out / s} was trained with other settings ({'; '.join(diff[:3])}"
                             f"{'; ...' if len(diff) > 3 else ''}); choose another --out, or delete it to retrain")
    if not todo:
        return status
    resume = {s: (out / s / "last.pt").is_file() for s in todo}
    for s in todo:
        if resume[s]:  # a head cut short on other descriptors or another store must not carry on with these
            RunDir(out, s).check_current(store)
    if len(todo) == 2 and resume["rgb"] == resume["flow"]:
        outcomes = train_both(store, out, cfg, list(devices), resume=resume["rgb"], on_event=on_event)
        failed = [o for o in outcomes.values() if not o.ok]
        if failed:
            o = failed[0]
            raise ValueError(f"training the {o.stream} stream failed: {o.error} (log: {o.log_path})")
    else:
        for i, s in enumerate(todo):
            train_stream(store, s, out, cfg, devices[STREAMS.index(s)] if i < len(devices) else "auto",
                         resume=resume[s], on_event=on_event)
    status.update({s: "trained" for s in todo})
    return status


# --- the main job -------------------------------------------------------------------------------


def _generate_synthetic(folder: Path, spec) -> Path:
    """The synthetic dataset in `folder`, generated aside and renamed in, so a kill never leaves half of it."""
    import shutil

    from data.synthetic import generate_dataset

    if (folder / "groups.csv").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    generate_dataset(tmp, spec)
    if folder.exists():
        if any(folder.iterdir()):
            raise ValueError(f"{folder} holds files but no synthetic dataset (no groups.csv); move it away or "
                             "choose another --out")
        folder.rmdir()
    tmp.rename(folder)
    return folder


def prepare_store(source: str | Path, out: Path, preset, groups: Path | None = None, step=None) -> Path:
    """Index a dataset folder or CSV into OUT/manifest.csv and extract it into OUT/store.h5 with
    the preset's sampling and flow; both steps reuse what an earlier run finished."""
    from data.layouts import index_dataset
    from data.manifest import read_manifest, write_manifest
    from data.splits import assign_splits
    from flow.extract import extract_dataset

    step = step or (lambda name, status, start: logger.info("%s: %s", name, status))
    manifest = out / "manifest.csv"
    t = time.perf_counter()
    indexed = index_dataset(source, groups_file=groups)  # listing files is cheap: done every time
    store = out / "store.h5"
    if manifest.is_file():
        rows = read_manifest(manifest)
        changes = dataset_changes(rows, indexed, _stored_ids(store))
        if changes:
            raise ValueError(f"{source} changed since {manifest} was written ({changes}), so the store and streams "
                             f"in {out} are of the old dataset; choose another --out to start over")
        step("index", "reused", t)
    else:
        rows = assign_splits(indexed)
        write_manifest(rows, manifest)
        step("index", f"{len(rows)} videos", t)
    t = time.perf_counter()
    summary = extract_dataset(rows, store, preset.extract_config())
    if not summary.written and not summary.skipped:
        raise ValueError(f"no video of {source} could be read; see {summary.failures_csv}")
    failed = f"{len(summary.failures)} failed" + (f" (why: {summary.failures_csv})" if summary.failures else "")
    step("extract", f"{len(summary.written)} written, {len(summary.skipped)} reused, {failed}", t)
    return store


def _stored_ids(store: Path) -> set[str]:
    """The videos in the store at `store` (none when there is none yet)."""
    from data.store import Store, store_exists

    if not store_exists(store):
        return set()
    with Store(store) as s:
        return set(s.video_ids)


def dataset_changes(before: Sequence, now: Sequence, stored: set[str] | None = None) -> str:
    """What differs between two indexings of a dataset (ManifestRows; splits aside, they are
    assigned after indexing), e.g. "2 added, 1 removed, 3 relabelled"; "" when nothing does.

    With `stored` (the ids in the store made from `before`), a video the store never held (one that
    could not be read, or not reached yet) counts only when added: removing or fixing a broken video
    changes nothing that was made from the dataset.
    """
    old, new = {r.video_id: r for r in before}, {r.video_id: r for r in now}
    if stored is not None:
        old = {v: r for v, r in old.items() if v in stored}
    both = old.keys() & new.keys()
    counts = (("added", len(new.keys() - {r.video_id for r in before})), ("removed", len(old.keys() - new.keys())),
              ("relabelled", sum(old[v].label != new[v].label for v in both)),
              ("moved to another recording", sum(old[v].group != new[v].group for v in both)),
              ("at another path", sum(Path(old[v].path).resolve() != Path(new[v].path).resolve() for v in both)))
    return ", ".join(f"{n} {what}" for what, n in counts if n)


def claim_output(out: Path, source: str) -> None:
    """Record in OUT/job.json which dataset the job in `out` is of; refuse another dataset there,
    whose steps would otherwise be taken for done (its manifest, store and streams reused)."""
    path = out / "job.json"
    try:
        held = json.loads(path.read_text(encoding="utf-8")).get("source") if path.is_file() else None
    except (ValueError, AttributeError):
        held = None  # unreadable: rewritten below
    if held is not None and held != source:
        raise ValueError(f"{out} holds the job of {held}; choose another --out for {source}")
    if held is None:
        write_atomic(path, json.dumps({"source": source}, indent=2) + "\n")


def run_job(
    data_dir: str | Path | None,
    out: str | Path,
    preset="auto",
    epochs: int | None = None,
    tta: int | None = None,
    on_event: Event | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> dict[str, Any]:
    """The whole job: index -> extract -> train both streams -> fuse -> evaluate.

    Without `data_dir` the embedded synthetic dataset is generated into OUT/data. OUT/job.json
    names the dataset; another one in the same OUT is refused. Every step reuses what an earlier,
    interrupted run of the same command finished: the dataset, the
    manifest (OUT/manifest.csv), the store (OUT/store.h5, which resumes per video), the cached
    features, each trained stream (best.pt + predictions) or its last checkpoint. `pretrained` /
    `weights` start the backbones from ImageNet weights (hub cache) or a file. Returns
    {"preset", "steps": {step: {"seconds", "status"}}, "metrics", "report", "fallback_reason",
    "comparison", "tta", "paired"} (see `evaluate_run`).
    """
    from fusion.presets import choose_preset, train_devices

    chosen = choose_preset(preset)
    k = check_tta(tta if tta is not None else chosen.tta)
    run_cfg = chosen.run_config(epochs).with_weights(pretrained, weights)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    if data_dir is not None and not Path(data_dir).exists():
        raise FileNotFoundError(f"dataset {data_dir} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    claim_output(out, "the embedded synthetic dataset" if data_dir is None else str(Path(data_dir).resolve()))
    steps: dict[str, dict] = {}

    def step(name: str, status: str, start: float) -> None:
        steps[name] = {"seconds": round(time.perf_counter() - start, 2), "status": status}
        logger.info("%s: %s in %.1f s", name, status, steps[name]["seconds"])
        if on_event is not None:
            on_event({"event": "job", "step": name, **steps[name]})

    t = time.perf_counter()
    if data_dir is None:
        existed = (out / "data" / "groups.csv").is_file()
        source = _generate_synthetic(out / "data", chosen.synthetic_spec())
        groups = source / "groups.csv"
        step("data", "reused" if existed else "generated", t)
    else:
        source = Path(data_dir)
        groups = None
    store = prepare_store(source, out, chosen, groups, step)
    t = time.perf_counter()
    status = train_run(store, out, run_cfg, train_devices(chosen), on_event)
    step("train", ", ".join(f"{s} {v}" for s, v in status.items()), t)
    t = time.perf_counter()
    result = evaluate_run(out, k)
    step("fuse+evaluate", f"{k} view{'s' if k > 1 else ''}", t)
    return {"preset": chosen.name, "steps": steps, "metrics": result["metrics"], "report": result["report"],
            "fallback_reason": result["fallback_reason"], "comparison": result["comparison"], "tta": k,
            "paired": result["paired"]}
