"""Classification metrics of per-video violence probabilities at an operating threshold, and the
paired comparison of two models' calls on the same videos.

Every value is a plain Python number, list, dict or None, so the result goes to JSON as is.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

CLASS_NAMES = ("non_violent", "violent")  # index = label
ECE_BINS = 15
_BOOTSTRAP_DRAWS = 1 << 20  # unit draws held at once by paired_comparison's bootstrap


def check_scores(
    labels: np.ndarray, probs: np.ndarray, empty: str = "cannot compute metrics on an empty set"
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (0/1) and violent-class probabilities as flat int64/float64 arrays, or a clear ValueError."""
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, np.float64).reshape(-1)
    if labels.shape != probs.shape:
        raise ValueError(f"got {labels.size} labels and {probs.size} probabilities")
    if labels.size == 0:
        raise ValueError(empty)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 1 (violent) or 0 (non-violent)")
    if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()):
        raise ValueError("probabilities must be finite and lie in [0, 1]")
    return labels.astype(np.int64), probs


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE of the violent-class probability over equal-width bins of [0, 1].

    ECE = sum_b (n_b / N) * |mean(label in b) - mean(prob in b)|, bins [0, 1/B), ..., [(B-1)/B, 1]
    (the last bin closed), empty bins skipped. The violent-class probability is binned rather than
    the top-label confidence so the value does not depend on the operating threshold.

    Shape: labels, probs (N,).
    """
    labels, probs = check_scores(labels, probs)
    bins = np.minimum((probs * n_bins).astype(np.int64), n_bins - 1)  # (N,) bin index
    counts = np.bincount(bins, minlength=n_bins)
    gap = np.abs(
        np.bincount(bins, weights=labels, minlength=n_bins)
        - np.bincount(bins, weights=probs, minlength=n_bins)
    )
    # |sum(y) - sum(p)| / N per bin equals (n_b / N) * |mean(y) - mean(p)|.
    return float(gap[counts > 0].sum() / len(labels))


def compute_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, per-class precision/recall/F1, macro-F1, ROC-AUC, PR-AUC, ECE, log-loss, counts.

    A video is called violent when prob >= threshold. `confusion_matrix` is [[tn, fp], [fn, tp]]
    (rows = true label 0/1, columns = predicted). `pr_auc` is the violent class's average
    precision. The AUCs are None when only one class is present (they are undefined there).

    Shape: labels, probs (N,).
    """
    labels, probs = check_scores(labels, probs)
    threshold = float(threshold)
    pred = (probs >= threshold).astype(np.int64)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=[0, 1], zero_division=0
    )
    both = bool(labels.min() != labels.max())
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(CLASS_NAMES)
    }
    return {
        "n": int(len(labels)),
        "n_per_class": {name: int(support[i]) for i, name in enumerate(CLASS_NAMES)},
        "threshold": threshold,
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(np.mean(f1)),
        "per_class": per_class,
        "roc_auc": float(roc_auc_score(labels, probs)) if both else None,
        "pr_auc": float(average_precision_score(labels, probs)) if both else None,
        "ece": expected_calibration_error(labels, probs),
        "log_loss": float(log_loss(labels, probs, labels=[0, 1])),
        "confusion_matrix": confusion_matrix(labels, pred, labels=[0, 1]).tolist(),
    }


def compute_curves(labels: np.ndarray, probs: np.ndarray) -> dict | None:
    """ROC and precision-recall curve points (violent class) as lists; None for one class.

    Returns:
        {"roc": {"fpr", "tpr", "auc"}, "pr": {"precision", "recall", "ap", "base_rate"}} or None.
    """
    labels, probs = check_scores(labels, probs)
    if labels.min() == labels.max():
        return None
    fpr, tpr, _ = roc_curve(labels, probs)
    precision, recall, _ = precision_recall_curve(labels, probs)
    return {
        "roc": {
            "fpr": fpr.tolist(),
            "tpr": tpr.tolist(),
            "auc": float(roc_auc_score(labels, probs)),
        },
        "pr": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "ap": float(average_precision_score(labels, probs)),
            "base_rate": float(labels.mean()),
        },
    }


def paired_comparison(
    correct_a: np.ndarray, correct_b: np.ndarray, groups: np.ndarray | None = None,
    resamples: int = 2000, seed: int = 0,
) -> dict:
    """Whether model a calls the same videos better than model b: the paired test of two classifiers.

    Two accuracies on one test set are not independent samples: only the videos the models call
    differently say which is better. `only_a` counts videos a calls right and b wrong, `only_b`
    the reverse; `p_value` is the exact two-sided McNemar test on them (a binomial test of
    only_a against only_b at one half; 1.0 when they never disagree; McNemar 1947, Dietterich
    1998). It treats videos as independent, which clips cut from one recording are not, so the
    95% interval of `difference` (accuracy a - accuracy b) is a percentile bootstrap over whole
    recordings when `groups` names at least two of them ("resampled": "recording"), else over
    videos. With a dozen recordings that interval is wide: it is the honest width.

    Shape: correct_a, correct_b, groups (N,); correct_* are booleans (a model's call is right).
    """
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    a = np.asarray(correct_a, dtype=bool).reshape(-1)
    b = np.asarray(correct_b, dtype=bool).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired calls must be two non-empty vectors of one length, got {a.size} and {b.size}")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    p_value = float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    diff = a.astype(np.float64) - b.astype(np.float64)  # (N,) +1, 0, -1
    units, resampled = np.arange(a.size), "video"  # what the bootstrap draws: videos, or whole recordings
    if groups is not None:
        g = np.asarray(groups).reshape(-1)
        if g.shape != a.shape:
            raise ValueError(f"groups must name one recording per video, got {g.size} for {a.size} videos")
        recordings = np.unique(g, return_inverse=True)[1]
        if recordings.max() >= 1:
            units, resampled = recordings, "recording"
    n_units = int(units.max()) + 1
    sums = np.bincount(units, weights=diff, minlength=n_units)  # (U,)
    counts = np.bincount(units, minlength=n_units).astype(np.float64)  # (U,)
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    rows = max(1, _BOOTSTRAP_DRAWS // n_units)  # resamples per batch: memory stays bounded for big test sets
    for start in range(0, resamples, rows):
        draws = rng.integers(0, n_units, size=(min(rows, resamples - start), n_units))  # (r, U)
        boot[start:start + len(draws)] = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {
        "n": int(a.size),
        "only_a": only_a,
        "only_b": only_b,
        "difference": float(diff.mean()),
        "p_value": p_value,
        "ci95": [float(low), float(high)],
        "resampled": resampled,
    }
