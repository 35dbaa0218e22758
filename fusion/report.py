"""The evaluation report: metrics.json, report.md, ROC/PR/confusion figures and per-video predictions.

Figures are drawn on matplotlib `Figure` objects with the Agg canvas attached directly, so no
pyplot state or global backend changes leak into whoever imports this module (a notebook keeps
its inline backend). Every file is written to a temporary name and renamed into place, and
metrics.json comes last, so a crash leaves either the previous report or whole new files, and a
metrics.json newer than the other files marks a finished report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fusion.metrics import compute_curves
from fusion.predictions import Predictions, align_all, write_atomic

logger = logging.getLogger(__name__)

_DPI = 120
# (header, path into a compute_metrics dict) for the report table.
_COLUMNS = (
    ("threshold", ("threshold",)),
    ("accuracy", ("accuracy",)),
    ("macro-F1", ("macro_f1",)),
    ("violent P", ("per_class", "violent", "precision")),
    ("violent R", ("per_class", "violent", "recall")),
    ("violent F1", ("per_class", "violent", "f1")),
    ("non-violent P", ("per_class", "non_violent", "precision")),
    ("non-violent R", ("per_class", "non_violent", "recall")),
    ("non-violent F1", ("per_class", "non_violent", "f1")),
    ("ROC-AUC", ("roc_auc",)),
    ("PR-AUC", ("pr_auc",)),
    ("ECE", ("ece",)),
    ("log-loss", ("log_loss",)),
)


def _get(d: Mapping, keys: tuple[str, ...]):
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if v >= 10 else f"{v:.4f}"
    return str(v)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    return buf.getvalue()


def _roc_figure(curves: Mapping[str, dict | None]) -> Figure:
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    for name, c in curves.items():
        if c is not None:
            ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=f"{name} (AUC {c['roc']['auc']:.3f})")
    if all(c is None for c in curves.values()):
        ax.text(0.5, 0.5, "one class only: no ROC curve", ha="center", va="center")
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate (violent recall)",
        title="ROC",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right", fontsize=8)  # the chance line always has a label
    return fig


def _pr_figure(curves: Mapping[str, dict | None]) -> Figure:
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for name, c in curves.items():
        if c is not None:
            ax.step(
                c["pr"]["recall"],
                c["pr"]["precision"],
                where="post",
                label=f"{name} (AP {c['pr']['ap']:.3f})",
            )
    base = next((c["pr"]["base_rate"] for c in curves.values() if c is not None), None)
    if base is None:
        ax.text(0.5, 0.5, "one class only: no PR curve", ha="center", va="center")
    else:
        ax.axhline(base, color="0.7", linestyle="--", linewidth=1, label=f"violent rate {base:.2f}")
    ax.set(
        xlabel="recall (violent)",
        ylabel="precision (violent)",
        title="Precision-recall",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)
    return fig


def _confusion_figure(results: Mapping[str, dict]) -> Figure:
    names = list(results)
    fig = Figure(figsize=(3.2 * len(names), 3.2))
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        cm = np.asarray(
            results[name]["confusion_matrix"]
        )  # (2, 2) rows = true, columns = predicted
        ax.imshow(cm, cmap="Blues", vmin=0)
        for (r, c), v in np.ndenumerate(cm):
            ax.text(
                c,
                r,
                str(v),
                ha="center",
                va="center",
                color="white" if v > cm.max() / 2 else "black",
            )
        ax.set_xticks([0, 1], ["non-violent", "violent"])
        ax.set_xlabel("predicted")
        if i == 0:  # the panels share their rows; labelling them once keeps them from overlapping
            ax.set_yticks([0, 1], ["non-violent", "violent"])
            ax.set_ylabel("true")
        else:
            ax.set_yticks([0, 1], ["", ""])
        ax.set_title(f"{name} @ {results[name]['threshold']:.3f}", fontsize=9)
    return fig


def _predictions_csv(predictions: Mapping[str, Predictions], primary: str, threshold: float) -> str:
    aligned = align_all(predictions)
    names = list(aligned)
    ref = aligned[names[0]]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["video_id", "label", *(f"{n}_probability" for n in names), "predicted"])
    probs = {n: aligned[n].probabilities for n in names}
    decided = probs.get(primary)
    for i, vid in enumerate(ref.video_ids):
        pred = "" if decided is None else int(decided[i] >= threshold)
        writer.writerow([vid, int(ref.labels[i]), *(repr(float(probs[n][i])) for n in names), pred])
    return buf.getvalue()


def _fusion_markdown(fusion: Mapping) -> list[str]:
    lines = ["## Fusion", ""]
    if "features" in fusion:
        lines.append(
            f"- Method: {fusion.get('method')}"
            + (f" ({fusion['selected']} alone)" if fusion.get("selected") else "")
        )
        lines.append(
            f"- Inverse L2 strength C = {_fmt(fusion.get('c'))}; cross-validation folds: "
            f"{fusion.get('cv_folds') or 'none (validation too small)'}"
            + (f", holding out whole {fusion.get('cv_by')}s" if fusion.get("cv_folds") and fusion.get("cv_by") else "")
        )
        rows = list(zip(fusion["features"], fusion["weights"], strict=True)) + [
            ("bias", fusion.get("bias"))
        ]
    else:
        lines.append(f"- Ensemble method: weighted average of {fusion.get('method')}s")
        rows = list(zip(fusion.get("members", ()), fusion.get("weights", ()), strict=True))
    lines += ["", "| input | weight |", "|---|---|"]
    lines += [f"| {n} | {_fmt(float(w)) if w is not None else 'n/a'} |" for n, w in rows]
    if fusion.get("fallback_reason"):
        lines += ["", f"> **Fallback:** {fusion['fallback_reason']}"]
    return lines + [""]


def paired_lines(paired: Mapping[str, dict], primary: str = "fused", where: str = "the same test videos") -> list[str]:
    """Markdown section for `fusion.metrics.paired_comparison` results of `primary` against each model."""
    unit = {"recording": "recordings", "video": "videos"}
    lines = [f"## {primary} against each model, on {where}", "",
             "Only the videos two models call differently say which is better. p: exact McNemar test "
             "(videos taken as independent); the interval of the accuracy difference resamples whole "
             "recordings when the videos come from several, as clips of one recording are not independent.",
             "", f"| model | {primary} right, model wrong | model right, {primary} wrong | accuracy difference "
             f"| 95% interval | resampled | p |", "|---|---:|---:|---:|---|---|---:|"]
    for name, r in paired.items():
        low, high = r["ci95"]
        p = "n/a" if r["p_value"] is None else f"{r['p_value']:.3g}"
        lines.append(f"| {name} | {r['only_a']} | {r['only_b']} | {r['difference']:+.4f} | [{low:+.4f}, {high:+.4f}] "
                     f"| {unit.get(r['resampled'], r['resampled'])} | {p} |")
    if any(r["p_value"] is None for r in paired.values()):
        lines += ["", "p n/a: the calls include repeated calls of the same videos, which no exact test takes as "
                      "independent; the interval resamples whole recordings with every call of their videos."]
    return lines


def _markdown(
    results: Mapping[str, dict],
    primary: str,
    goal: str | None,
    min_recall: float | None,
    fusion: Mapping | None,
    title: str,
    split: str,
    paired: Mapping[str, dict] | None = None,
) -> str:
    p = results[primary]
    goal_text = goal or "not recorded"
    if goal == "recall" and min_recall is not None:
        goal_text = f"recall (violent recall >= {min_recall:g})"
    lines = [
        f"# {title}",
        "",
        f"Split: {split}; {p['n']} videos ({p['n_per_class']['violent']} violent, "
        f"{p['n_per_class']['non_violent']} non-violent). Primary model: **{primary}**, "
        f"accuracy {_fmt(p['accuracy'])}.",
        "",
        f"Operating point: threshold {_fmt(p['threshold'])} on the violent probability, chosen on "
        f"validation for goal {goal_text}; a video is violent when its probability >= the threshold.",
        "",
        "## Metrics",
        "",
        "| model | " + " | ".join(h for h, _ in _COLUMNS) + " |",
        "|---|" + "---:|" * len(_COLUMNS),
    ]
    for name, m in results.items():
        label = f"**{name}**" if name == primary else name
        lines.append(f"| {label} | " + " | ".join(_fmt(_get(m, k)) for _, k in _COLUMNS) + " |")
    (tn, fp), (fn, tp) = p["confusion_matrix"]
    lines += [
        "",
        "ECE: 15 equal-width bins of the violent probability. PR-AUC: average precision of the "
        "violent class. n/a: undefined with one class present.",
        "",
        f"## Confusion matrix ({primary})",
        "",
        "| true \\ predicted | non-violent | violent |",
        "|---|---:|---:|",
        f"| non-violent | {tn} | {fp} |",
        f"| violent | {fn} | {tp} |",
        "",
    ]
    if paired:
        lines += paired_lines(paired, primary) + [""]
    if fusion:
        lines += _fusion_markdown(fusion)
    lines += [
        "## Figures",
        "",
        "![ROC](roc.png) ![Precision-recall](pr.png)",
        "",
        "![Confusion matrices](confusion.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out_dir: str | Path,
    results: Mapping[str, dict],
    curves: Mapping[str, dict | None] | None = None,
    predictions: Mapping[str, Predictions] | None = None,
    *,
    primary: str | None = None,
    goal: str | None = None,
    min_recall: float | None = None,
    fusion: Mapping | None = None,
    title: str = "twostream evaluation",
    split: str = "test",
    paired: Mapping[str, dict] | None = None,
) -> list[Path]:
    """Write the report files into `out_dir` and return their paths.

    Args:
        results: model name -> `compute_metrics` dict, e.g. {"rgb": ..., "flow": ..., "fused": ...}.
        curves: model name -> `compute_curves` output; computed from `predictions` when None.
        predictions: model name -> per-video predictions on the evaluated split; written side by
            side as predictions.csv.
        primary: the model whose accuracy is metrics.json's top-level `accuracy`; "fused" when
            present, else the first model.
        fusion: `FusionModel.to_dict()` or `EnsembleWeights.to_dict()`, shown with any fallback note.
        paired: other model name -> `fusion.metrics.paired_comparison` of the primary model's calls
            (a) against that model's (b) on the same videos; a table in report.md, "paired" in
            metrics.json.
    """
    if not results:
        raise ValueError("no results to report")
    primary = primary or ("fused" if "fused" in results else next(iter(results)))
    if primary not in results:
        raise ValueError(
            f"primary model {primary!r} is not among the results ({', '.join(results)})"
        )
    if curves is None:
        if predictions is None:
            raise ValueError("the report needs curves or per-video predictions to draw ROC and PR")
        curves = {
            n: compute_curves(p.labels, p.probabilities)
            for n, p in predictions.items()
            if n in results
        }
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, where the evaluation writes its folder; move the file away")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    written.append(write_atomic(out / "roc.png", _png(_roc_figure(curves))))
    written.append(write_atomic(out / "pr.png", _png(_pr_figure(curves))))
    written.append(write_atomic(out / "confusion.png", _png(_confusion_figure(results))))
    if predictions:
        text = _predictions_csv(predictions, primary, float(results[primary]["threshold"]))
        written.append(write_atomic(out / "predictions.csv", text))
    md = _markdown(results, primary, goal, min_recall, fusion, title, split, paired)
    written.append(write_atomic(out / "report.md", md))
    summary = {
        "primary": primary,
        "accuracy": results[primary]["accuracy"],
        "threshold": results[primary]["threshold"],
        "goal": goal,
        "min_recall": min_recall,
        "split": split,
        "models": dict(results),
        "fusion": None if fusion is None else dict(fusion),
        "paired": None if paired is None else dict(paired),
    }
    written.append(write_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n"))
    logger.info("report written to %s (%s accuracy %.4f)", out, primary, summary["accuracy"])
    return written
