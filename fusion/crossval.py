"""Cross-validation over a store: stratified group k-fold, both streams trained per fold.

`cross_validate` trains both streams on each fold's other folds (`fusion.pipeline.train_run`),
fits fusion and every threshold on the fold's validation part or on out-of-fold predictions of
its non-test videos (`fusion.oof`), and evaluates on the held-out fold
(`fusion.pipeline.evaluate_run`). It writes OUT/cv.json and OUT/cv.md: mean +- std over folds per
model, the per-fold table, wrong calls per source recording, and the paired comparison of the
fused model against each stream on the same videos (`fusion.metrics.paired_comparison`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fusion.metrics import paired_comparison
from fusion.pipeline import STREAMS, Event, claim_output, evaluate_run, prepare_store, train_run
from fusion.predictions import write_atomic
from fusion.report import paired_lines
from fusion.tta import check_tta

logger = logging.getLogger(__name__)


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


_CV_METRICS = (("accuracy", ("accuracy",)), ("macro_f1", ("macro_f1",)), ("roc_auc", ("roc_auc",)),
               ("violent_recall", ("per_class", "violent", "recall")))


def _pick(m: Mapping, keys: tuple[str, ...]):
    for k in keys:
        m = m[k]
    return m


def cross_validate(
    store: str | Path,
    folds: int = 5,
    out: str | Path = "runs/cv",
    preset="auto",
    config=None,
    devices: Sequence[str] | None = None,
    tta: int = 1,
    epochs: int | None = None,
    goal: str = "accuracy",
    min_recall: float | None = None,
    on_event: Event | None = None,
    seed: int = 0,
    inner_folds: int | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    store_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Stratified group k-fold: per fold train both streams, fuse, evaluate on its test fold.

    `store` may also be a dataset folder or CSV: it is indexed and extracted into OUT/store.h5
    (or `store_dir`/store.h5) with the preset's settings first (manifest.csv beside it, resumable). No source recording is in two
    folds; each round's validation part is carved from the training folds by group
    (data.splits.fold_split). `config` (a streams RunConfig) replaces the
    preset's training config. `seed` (the preset's; a `config` keeps its own) draws the folds
    and seeds training (`repeated_cross_validate` repeats it over seeds).
    `inner_folds` K >= 2 (None: the preset's, lowered or off where the data or training rule it
    out; 0: off) fits fusion and every threshold on
    out-of-fold predictions of each fold's non-test videos from K inner group folds (fusion.oof)
    instead of on its validation part, and scores the test fold with the mean of those K inner
    heads per stream (stacking): the thresholds meet scores of the models they were fitted on. With
    `tta` views both are means over the same views.
    `pretrained` / `weights` start the backbones from ImageNet weights (hub cache) or a file.
    Writes OUT/fold<k>/ runs, OUT/cv.json and OUT/cv.md; returns the doc written to cv.json:
    {"store", "folds" (count), "tta", "goal", "preset", "seed", "inner_folds", "rounds" (one per
    fold: its figures per model, "tested" and "wrong" video ids), "summary": {model: {metric:
    {"mean", "std"}}}, "by_recording", "paired"}.
    """
    from data.store import require_store
    from fusion.oof import check_inner_folds, labels_groups, out_of_fold
    from fusion.presets import choose_preset, train_devices

    store = Path(store)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    k = check_tta(tta)
    chosen = choose_preset(preset)
    n_inner = check_inner_folds(chosen.inner_folds if inner_folds is None else inner_folds)
    base = config if config is not None else chosen.run_config(epochs, seed=seed)
    if config is not None and epochs is not None:
        base = replace(base, train=replace(base.train, epochs=epochs))
    base = base.with_weights(pretrained, weights)  # a missing weights file fails before any extraction
    if store.is_dir() or store.suffix.lower() == ".csv":  # a dataset: index and extract it first
        where = Path(store_dir if store_dir is not None else out)
        where.mkdir(parents=True, exist_ok=True)
        claim_output(where, str(store.resolve()))  # another dataset's store and folds are not reused
        store = prepare_store(store, where, chosen)
    require_store(store)
    ids, labels, groups = labels_groups(store)
    if not len(labels):
        raise ValueError(f"{store} holds no videos; make it with `twostream extract`")
    n_groups = len(np.unique(groups))
    if folds > n_groups:
        raise ValueError(
            f"--folds {folds} is more than the {n_groups} source recordings (groups) in {store}; "
            f"use at most {n_groups} folds"
        )
    if n_inner and inner_folds is None:  # the preset's K adapts to the data and settings; an asked-for K is checked
        n_inner = _preset_inner_folds(store, base, folds, n_inner)
    elif n_inner:
        _check_inner(store, base, folds, n_inner)
    devices = list(devices or train_devices(chosen))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for fold in range(folds):
        fold_dir = out / f"fold{fold}"
        cfg = replace(base, train=replace(base.train, fold=f"{fold}/{folds}"))
        if on_event is not None:
            on_event({"event": "fold", "fold": fold, "folds": folds})
        try:
            train_run(store, fold_dir, cfg, devices, on_event)
            fit_set = test_set = None
            if n_inner:
                if on_event is not None:
                    on_event({"event": "inner", "fold": fold, "inner_folds": n_inner})
                inner = out_of_fold(store, fold_dir, n_inner, devices, k)
                fit_set, test_set = inner.fit, inner.test
            result = evaluate_run(fold_dir, k, goal, min_recall, fit_set=fit_set, test_set=test_set)
        except ValueError as exc:
            raise ValueError(f"fold {fold} of {folds}: {exc}") from None
        rows.append({"fold": fold, "run": str(fold_dir), "fallback_reason": result["fallback_reason"],
                     "fusion_method": result["fusion_method"],
                     "fitted_on": "validation" if fit_set is None else "out-of-fold", "n_fit": result["n_fit"],
                     **{m: {name: _pick(result["metrics"][m], keys) for name, keys in _CV_METRICS}
                        for m in ("rgb", "flow", "fused")},
                     "n_test": result["metrics"]["fused"]["n"], "tested": result["tested"], "wrong": result["wrong"]})
        logger.info("fold %d/%d: fused accuracy %.4f", fold + 1, folds, rows[-1]["fused"]["accuracy"])
    summary = {m: {name: _mean_std([r[m][name] for r in rows]) for name, _ in _CV_METRICS}
               for m in ("rgb", "flow", "fused")}
    doc = {"store": str(store.resolve()), "folds": folds, "tta": k, "goal": goal, "preset": chosen.name,
           "seed": base.train.seed, "inner_folds": n_inner, "rounds": rows, "summary": summary,
           "by_recording": _errors_by_recording(rows, ids, labels, groups),
           "paired": _paired_calls(rows, dict(zip(ids.tolist(), groups.tolist(), strict=True)))}
    write_atomic(out / "cv.json", json.dumps(doc, indent=2) + "\n")
    write_atomic(out / "cv.md", _cv_markdown(doc))
    return doc


def _errors_by_recording(rows: Sequence[Mapping], ids: np.ndarray, labels: np.ndarray,
                         groups: np.ndarray) -> dict[str, dict]:
    """Per source recording: its videos, how many are violent, and each model's wrong calls on them
    (every video is tested in exactly one fold). Shape: ids, labels, groups (N,)."""
    recording = dict(zip(ids.tolist(), groups.tolist(), strict=True))
    out: dict[str, dict] = {}
    for g in np.unique(groups):
        mine = groups == g
        out[str(g)] = {"videos": int(mine.sum()), "violent": int(labels[mine].sum()),
                       "wrong": {m: 0 for m in ("rgb", "flow", "fused")}}
    for r in rows:
        for m, wrong in r["wrong"].items():
            for v in wrong:
                out[recording[v]]["wrong"][m] += 1
    return out


def _paired_calls(rows: Sequence[Mapping], recording: Mapping[str, str], exact: bool = True) -> dict[str, dict]:
    """The fused model's calls against each stream's on every video a round tested, as it called it
    there (`fusion.metrics.paired_comparison`, resampling the recordings in `recording`: video id
    -> recording). Rounds of several repeats call a video again: then `exact` is False and the
    p-value None, as no exact test takes repeated calls as independent."""
    models = ("fused", *STREAMS)
    tested = [v for r in rows for v in r["tested"]]
    wrong = [{m: set(r["wrong"][m]) for m in models} for r in rows]
    right = {m: np.array([v not in w[m] for r, w in zip(rows, wrong, strict=True) for v in r["tested"]]) for m in models}
    groups = np.array([recording.get(v, v) for v in tested])
    out = {s: paired_comparison(right["fused"], right[s], groups) for s in STREAMS}
    return out if exact else {s: {**r, "p_value": None} for s, r in out.items()}


def _preset_inner_folds(store: Path, base, folds: int, wanted: int) -> int:
    """The preset's inner fold count where it applies: at most `wanted`, no more than every outer
    fold's non-test part has recordings of each class; 0 with fine-tuning."""
    from fusion.oof import max_inner_folds

    if base.train.stage != "head":
        return 0
    allowed = min(max_inner_folds(store, replace(base.train, fold=f"{fold}/{folds}")) for fold in range(folds))
    if allowed < 2:
        logger.info("inner folds: off (too few recordings per class outside a test fold)")
        return 0
    if allowed < wanted:
        logger.info("inner folds: %d (the preset's %d would leave a class out of an inner part)", allowed, wanted)
    return min(wanted, allowed)


def _check_inner(store: Path, base, folds: int, n_inner: int) -> None:
    """Every outer fold's non-test part can be split into `n_inner` group folds; raised before anything trains."""
    from fusion.oof import inner_folds

    if base.train.stage != "head":
        raise ValueError("--inner-folds retrains each stream's head on cached features, so it needs head-only "
                         f"training (stage = head), not stage = {base.train.stage}; or use --inner-folds 0")
    for fold in range(folds):
        inner_folds(store, replace(base.train, fold=f"{fold}/{folds}"), n_inner)


def _summary_lines(summary: Mapping[str, Mapping]) -> list[str]:
    """cv.md's table of every model's mean ± std per metric."""
    names = [name for name, _ in _CV_METRICS]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for m, stats in summary.items():
        lines.append(f"| {m} | " + " | ".join(f"{stats[n]['mean']:.4f} ± {stats[n]['std']:.4f}" for n in names) + " |")
    return lines


def _cv_markdown(doc: Mapping) -> str:
    n_inner = doc.get("inner_folds") or 0
    fitted = (f"out-of-fold predictions of all its non-test videos ({n_inner} inner group folds, each "
              f"stream's head retrained per inner fold; the test videos never enter them, and are scored "
              f"by the mean of those {n_inner} heads)" if n_inner
              else "a validation part carved from them by group")
    lines = [
        f"# Cross-validation: {doc['folds']} folds",
        "",
        f"Store: {doc['store']}. Stratified group k-fold (no source recording in two folds); per "
        f"fold both streams train on the other folds, fusion and the operating thresholds are fitted "
        f"on {fitted}, and every figure is on the held-out fold. TTA views: {doc['tta']}.",
        "",
        *_summary_lines(doc["summary"]),
    ]
    lines += ["", "## Per fold", "", "| fold | videos | rgb | flow | fused | fitted on | note |",
              "|---:|---:|---:|---:|---:|---|---|"]
    for r in doc["rounds"]:
        method = r.get("fusion_method")
        note = ("equal weights" if method == "equal" else "one stream" if method == "single"
                else "fallback to one stream" if r.get("fallback_reason") else "")
        fit = f"{'out-of-fold' if n_inner else 'validation'} ({r.get('n_fit', '?')} videos)"
        lines.append(f"| {r['fold']} | {r['n_test']} | {r['rgb']['accuracy']:.4f} | {r['flow']['accuracy']:.4f} "
                     f"| {r['fused']['accuracy']:.4f} | {fit} | {note} |")
    if doc.get("paired"):
        lines += [""] + paired_lines(doc["paired"], "fused", "every video, each called in the fold that tested it")
    lines += _recording_lines(doc.get("by_recording") or {})
    return "\n".join(lines) + "\n"


def _repeated_markdown(doc: Mapping) -> str:
    seeds = [r["seed"] for r in doc["runs"]]
    lines = [
        f"# Repeated cross-validation: {doc['repeats']} x {doc['folds']} folds",
        "",
        f"Store: {doc['store']}. {doc['repeats']} repeats of stratified group k-fold (no source recording in two "
        f"folds of a repeat), seeds {seeds[0]} to {seeds[-1]}; each repeat's folds, fusion and thresholds as in its "
        f"own cv.md (seed<N>/). Figures: mean ± std over repeats of each repeat's mean over its folds. "
        f"TTA views: {doc['tta']}.",
        "",
        *_summary_lines(doc["summary"]),
    ]
    lines += ["", "## Per repeat (accuracy, mean over folds)", "", "| seed | rgb | flow | fused | folder |",
              "|---:|---:|---:|---:|---|"]
    for r in doc["runs"]:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['summary'][m]['accuracy']['mean']:.4f}"
                                                     for m in ("rgb", "flow", "fused")) + f" | {r['out']} |")
    lines += [""] + paired_lines(doc["paired"], "fused", f"every video in each of the {doc['repeats']} repeats")
    lines += _recording_lines(doc.get("by_recording") or {}, repeats=doc["repeats"])
    return "\n".join(lines) + "\n"


def _recording_lines(by_recording: Mapping[str, Mapping], most: int = 20, repeats: int = 1) -> list[str]:
    """cv.md's table of wrong calls per source recording, the worst (by fused, then flow, rgb) first."""
    if not by_recording:
        return []
    order = sorted(by_recording, key=lambda g: tuple(-by_recording[g]["wrong"][m] for m in ("fused", "flow", "rgb")))
    tested = "in one fold" if repeats == 1 else f"in one fold of each of the {repeats} repeats, and its wrong calls add up"
    lines = ["", "## Wrong calls by recording", "",
             f"Each video is tested {tested}; a recording whose calls go wrong together is where a model "
             "does not carry over to new footage." + (f" The {most} worst of {len(order)}; all are in cv.json."
                                                      if len(order) > most else ""),
             "", "| recording | videos | violent | rgb | flow | fused |", "|---|---:|---:|---:|---:|---:|"]
    for g in order[:most]:
        r = by_recording[g]
        lines.append(f"| {g} | {r['videos']} | {r['violent']} | " + " | ".join(str(r["wrong"][m]) for m in ("rgb", "flow", "fused"))
                     + " |")
    return lines


# --- repeated cross-validation ------------------------------------------------------------------


def repeated_cross_validate(
    store: str | Path,
    repeats: int,
    out: str | Path = "runs/cv",
    seed: int = 0,
    config=None,
    on_event: Event | None = None,
    **options,
) -> dict[str, Any]:
    """Repeated stratified group k-fold: `cross_validate` once per seed, seed .. seed + repeats - 1.

    With a dozen recordings, one draw of the folds decides much of a k-fold figure (which
    recordings meet in a test fold); repeating over seeds and averaging is the usual remedy
    (scikit-learn's RepeatedStratifiedKFold). Repeat r goes to OUT/seed<seed + r>/ as one
    `cross_validate` would write it (a `config` gets train.seed + r); a dataset folder or CSV is
    indexed and extracted once, into OUT/store.h5. OUT/cv.json and OUT/cv.md then hold the mean
    ± std over repeats of each repeat's mean, each repeat's figures, wrong calls per recording summed
    over repeats, and the fused model's calls against each stream's pooled over every repeat
    (`fusion.metrics.paired_comparison` over all calls, its interval resampling whole recordings
    with every repeat of their videos; no exact test, since repeats call the same videos again).
    One repeat is plain `cross_validate` into OUT. Returns the doc written to cv.json.
    """
    from fusion.oof import labels_groups

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    if repeats == 1:
        return cross_validate(store, out=out, seed=seed, config=config, on_event=on_event, **options)
    out = Path(out)
    docs = []
    for r in range(repeats):
        cfg = None if config is None else replace(config, train=replace(config.train, seed=config.train.seed + r))
        s = seed + r if config is None else cfg.train.seed
        if on_event is not None:
            on_event({"event": "repeat", "repeat": r, "repeats": repeats, "seed": s})
        where = out / f"seed{s}"
        if r == 0 and (Path(store).is_dir() or Path(store).suffix.lower() == ".csv"):
            options = {"store_dir": out, **options}  # the dataset is extracted once, beside the repeats
        try:
            docs.append(cross_validate(store, out=where, seed=s, config=cfg, on_event=on_event, **options))
        except ValueError as exc:
            raise ValueError(f"repeat {r + 1} of {repeats} (seed {s}): {exc}") from None
        store = docs[-1]["store"]  # later repeats read the store the first one made or checked
    ids, labels, groups = labels_groups(store)
    first = docs[0]
    summary = {m: {name: _mean_std([d["summary"][m][name]["mean"] for d in docs]) for name, _ in _CV_METRICS}
               for m in ("rgb", "flow", "fused")}
    rows = [row for d in docs for row in d["rounds"]]
    doc = {"store": first["store"], "folds": first["folds"], "repeats": repeats, "tta": first["tta"],
           "goal": first["goal"], "preset": first["preset"], "inner_folds": first["inner_folds"],
           "runs": [{"seed": d["seed"], "out": str(out / f"seed{d['seed']}"), "summary": d["summary"]} for d in docs],
           "summary": summary, "by_recording": _errors_by_recording(rows, ids, labels, groups),
           "paired": _paired_calls(rows, dict(zip(ids.tolist(), groups.tolist(), strict=True)), exact=False)}
    write_atomic(out / "cv.json", json.dumps(doc, indent=2) + "\n")
    write_atomic(out / "cv.md", _repeated_markdown(doc))
    return doc
