"""Classification metrics of per-video violence probabilities at an operating threshold.

Every value is a plain Python number, list, dict or None, so the result goes to JSON as is.
"""

from __future__ import annotations

import numpy as np
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
