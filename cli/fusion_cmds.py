"""`fuse`, `evaluate`, `cv` and `predict`: from trained streams to fused figures and scored footage."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cli.choices import PRETRAINED_HELP, WEIGHTS_HELP
from cli.console import err, out, table
from cli.errors import fail, non_negative, user_errors


class Goal(str, Enum):
    accuracy = "accuracy"
    f1 = "f1"


class PresetName(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


TTA_HELP = "Test-time views per video and stream (1 = the plain clip; 2 adds its mirror; see fusion.tta)."
MIN_RECALL_HELP = "Operating point: the highest threshold keeping violent recall >= R (overrides --goal)."


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("fuse")(fuse)
    app.command("evaluate")(evaluate)
    app.command("cv")(cv)
    app.command("predict")(predict)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def metrics_table(title: str, metrics: dict[str, dict]):
    """Rich table of `compute_metrics` dicts, one row per model."""
    rows = []
    for name, m in metrics.items():
        violent = m["per_class"]["violent"]
        rows.append([name, _fmt(m["accuracy"]), _fmt(m["macro_f1"]), _fmt(violent["precision"]),
                     _fmt(violent["recall"]), _fmt(m["roc_auc"]), _fmt(m["threshold"]), m["n"]])
    return table(title, ["model", "accuracy", "macro-F1", "violent P", "violent R", "ROC-AUC", "threshold", "videos"],
                 rows)


def _parse_devices(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [d.strip() for d in text.split(",") if d.strip()]
    if len(names) == 1:
        names *= 2
    if len(names) != 2:
        raise ValueError(f"--devices needs one device per stream (e.g. cuda:0,cuda:1 or cpu,cpu), got {text!r}")
    return names


@user_errors
def fuse(
    runs: Annotated[list[Path], typer.Argument(help="Run folder(s); several give an ensemble of all their streams.")],
    tta: Annotated[int, typer.Option(help=TTA_HELP)] = 1,
    goal: Annotated[Goal, typer.Option(help="Operating-point goal chosen on validation.")] = Goal.accuracy,
    min_recall: Annotated[float | None, typer.Option(help=MIN_RECALL_HELP)] = None,
    device: Annotated[str, typer.Option(help="Where TTA runs the models: auto, cpu or cuda:N.")] = "auto",
) -> None:
    """Fit late fusion on validation predictions only; compare with each stream, averaging and TSN."""
    from fusion.pipeline import fit_run
    from fusion.tta import check_tta

    check_tta(tta)
    outcome = fit_run(runs, tta, goal.value, min_recall, device)
    rows = []
    for split in ("val", "test"):
        for name, m in outcome.comparison[split].items():
            rows.append([split, name, _fmt(m["accuracy"]), _fmt(m["macro_f1"]), _fmt(m["roc_auc"]),
                         _fmt(m["threshold"]), m["n"]])
    out.print(table(f"fusion of {', '.join(str(r) for r in runs)} ({outcome.tta} view{'s' if outcome.tta > 1 else ''})",
                    ["split", "model", "accuracy", "macro-F1", "ROC-AUC", "threshold", "videos"], rows))
    model = outcome.model
    if hasattr(model, "features"):
        weights = ", ".join(f"{f} {w:+.3f}" for f, w in zip(model.features, model.weights, strict=True))
        out.print(f"fusion: {model.method}, {weights}, bias {model.bias:+.3f}, threshold {model.threshold:.3f}")
    else:
        weights = ", ".join(f"{m} {w:.3f}" for m, w in zip(model.members, model.weights, strict=True))
        out.print(f"ensemble weights: {weights}; threshold {model.threshold:.3f}")
    if outcome.fallback_reason:
        err.print(f"[yellow]fallback:[/] {outcome.fallback_reason}")
    out.print(f"written to {outcome.path} (comparison: {outcome.path.with_name(outcome.path.stem + '_comparison.json')})")


@user_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder holding rgb/ and flow/ from `twostream train`.")],
    tta: Annotated[int, typer.Option(help=TTA_HELP)] = 1,
    goal: Annotated[Goal, typer.Option(help="Operating-point goal chosen on validation.")] = Goal.accuracy,
    min_recall: Annotated[float | None, typer.Option(help=MIN_RECALL_HELP)] = None,
    device: Annotated[str, typer.Option(help="Where TTA runs the models: auto, cpu or cuda:N.")] = "auto",
) -> None:
    """Fuse on validation, then report RGB, flow and fused on test (RUN/eval/)."""
    from fusion.pipeline import evaluate_run
    from fusion.tta import check_tta

    check_tta(tta)
    result = evaluate_run(run, tta, goal.value, min_recall, device)
    views = f"{result['tta']} TTA view{'s' if result['tta'] > 1 else ''}"
    out.print(metrics_table(f"test set of {run} ({views}; thresholds chosen on validation)", result["metrics"]))
    if result["fallback_reason"]:
        err.print(f"[yellow]fallback:[/] {result['fallback_reason']}")
    print_paired(result["paired"])
    out.print(f"report: {result['report']}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def print_paired(paired: dict) -> None:
    """One line per stream: the videos fused calls right where the stream does not, and the reverse
    (calls, when repeats call each video again: no exact test then)."""
    for s, r in paired.items():
        low, high = r["ci95"]
        test = "" if r["p_value"] is None else f"; McNemar p {r['p_value']:.3g}"
        unit = "call" if r["p_value"] is None else "video"
        out.print(f"fused vs {s}: right where {s} is wrong on {_count(r['only_a'], unit)}, wrong where it is right on "
                  f"{r['only_b']} (accuracy {r['difference']:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}] "
                  f"by {r['resampled']}{test})", soft_wrap=True)


@user_errors
def cv(
    store: Annotated[Path, typer.Argument(help="Store file from `twostream extract`, or a dataset folder/CSV (indexed and extracted into OUT with the preset's settings).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the fold runs, cv.json and cv.md.")],
    folds: Annotated[int, typer.Option(help="Stratified group folds (no recording in two folds).")] = 5,
    preset: Annotated[PresetName, typer.Option(help="Training settings: cpu (small, fast), gpu (the report's), auto.")] = PresetName.auto,
    epochs: Annotated[int | None, typer.Option(help="Stage-1 epochs (overrides the preset or config).")] = None,
    config: Annotated[Path | None, typer.Option(help="Training config TOML (replaces the preset's settings).")] = None,
    devices: Annotated[str | None, typer.Option(help="One device per stream, e.g. cuda:0,cuda:1 or cpu,cpu.")] = None,
    tta: Annotated[int, typer.Option(help=TTA_HELP)] = 1,
    goal: Annotated[Goal, typer.Option(help="Operating-point goal, chosen per fold where fusion is fitted (see --inner-folds).")] = Goal.accuracy,
    seed: Annotated[int | None, typer.Option(help="Seed of the folds and of training (preset only; a --config sets train.seed); --repeats counts up from it. Default 0.")] = None,
    inner_folds: Annotated[int | None, typer.Option(help="Fit fusion and thresholds on out-of-fold predictions of each fold's non-test videos from K inner group folds, and score its test videos with the mean of those K heads (0 = fit on its validation part, score with the fold's own heads; default: the preset's).")] = None,
    pretrained: Annotated[bool, typer.Option(help=PRETRAINED_HELP)] = False,
    weights: Annotated[Path | None, typer.Option(help=WEIGHTS_HELP)] = None,
    repeats: Annotated[int, typer.Option(help="Repeat the k-fold with seeds SEED .. SEED+N-1 into OUT/seed<N>/ and report the mean ± std over repeats (repeated k-fold).")] = 1,
) -> None:
    """Cross-validate: per fold train both streams, fuse (on inner out-of-fold predictions or the validation part), evaluate on the fold."""
    from fusion.crossval import repeated_cross_validate
    from fusion.tta import check_tta

    check_tta(tta)
    non_negative("--seed", seed)
    cfg = None
    if config is not None:
        if seed is not None:
            raise ValueError(f"--seed applies to the preset; with --config set train.seed in {config}")
        from streams.rundir import resolve_run_config

        cfg = resolve_run_config(config)
    doc = repeated_cross_validate(store, repeats, out_dir, seed or 0, cfg, _fold_printer(), folds=folds,
                                  preset=preset.value, devices=_parse_devices(devices), tta=tta, epochs=epochs,
                                  goal=goal.value, inner_folds=inner_folds, pretrained=pretrained, weights=weights)
    rows = [[m, *(f"{s[k]['mean']:.4f} ± {s[k]['std']:.4f}" for k in ("accuracy", "macro_f1", "roc_auc"))]
            for m, s in doc["summary"].items()]
    title = (f"{folds}-fold cross-validation of {store}" if repeats == 1
             else f"{repeats} x {folds}-fold cross-validation of {store} (mean ± std over repeats)")
    out.print(table(title, ["model", "accuracy", "macro-F1", "ROC-AUC"], rows))
    print_paired(doc["paired"])
    out.print(f"report: {out_dir / 'cv.md'}")


def _fold_printer():
    def on_event(event: dict) -> None:
        if event.get("event") == "repeat":
            err.print(f"repeat {event['repeat'] + 1}/{event['repeats']} (seed {event['seed']})")
        elif event.get("event") == "fold":
            err.print(f"fold {event['fold'] + 1}/{event['folds']}: training both streams")
        elif event.get("event") == "inner":
            err.print(f"fold {event['fold'] + 1}: out-of-fold predictions from {event['inner_folds']} inner folds")

    return on_event


@user_errors
def predict(
    videos: Annotated[list[Path], typer.Argument(help="Video files to score.")],
    model: Annotated[Path, typer.Option("--model", help="Run folder (trained rgb/ and flow/, fusion.json).")],
    window: Annotated[float, typer.Option(help="Window length in seconds.")] = 2.0,
    stride: Annotated[float, typer.Option(help="Seconds between window starts.")] = 1.0,
    tta: Annotated[int, typer.Option(help=TTA_HELP)] = 1,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for per-video CSV, JSON and timeline PNG (default RUN/predict).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda:N.")] = "auto",
) -> None:
    """Score videos in sliding windows (RGB, flow, fused) and give each a verdict.

    A video that cannot be read is reported on one line and skipped; the others are still scored,
    and the command then exits 2.
    """
    from data.video import VideoReadError
    from fusion.predict import Scorer, check_windows, output_names, window_mismatch, write_outputs
    from fusion.tta import check_tta

    check_tta(tta)
    check_windows(window, stride)
    dest = out_dir or model / "predict"
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"--out {dest} is a file; give a folder for the per-video outputs")
    scorer = Scorer(model, tta, device)
    mismatch = window_mismatch(window, scorer.clip_seconds)
    if mismatch:
        err.print(f"[yellow]warning:[/] {mismatch}", soft_wrap=True)
    rows, failed = [], 0
    for path, name in zip(videos, output_names(videos), strict=True):
        try:
            score = scorer.score(path, window, stride)
        except (VideoReadError, ValueError, FileNotFoundError) as exc:
            failed += 1
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print_error(message if str(path) in message else f"{path}: {message}")
            continue
        write_outputs(score, dest, name)
        rows.append([path, "violent" if score.violent else "non-violent", f"{score.score:.3f}",
                     f"{score.threshold:.3f}", len(score.windows), f"{score.duration_s:.1f}"])
    if rows:
        out.print(table(f"{len(rows)} video(s) scored ({tta} view{'s' if tta > 1 else ''}); windows in {dest}",
                        ["video", "verdict", "score", "threshold", "windows", "seconds"], rows))
    if failed:
        raise fail(f"{failed} of {len(videos)} video(s) could not be scored")


def print_error(message: str) -> None:
    """One `error:` line on stderr, as user mistakes are reported."""
    import sys

    print(f"error: {message}", file=sys.stderr)
