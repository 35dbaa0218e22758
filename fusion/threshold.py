"""Operating thresholds chosen on validation: best accuracy, best violent F1, or a recall floor.

A video is called violent when its probability is >= the threshold. Candidate thresholds sit
halfway between consecutive distinct validation probabilities (plus one below the lowest and one
above the highest), so the chosen point keeps the largest margin to the validation samples on
either side instead of sitting exactly on one of them.
"""

from __future__ import annotations

import numpy as np

from fusion.metrics import check_scores

GOALS = ("accuracy", "f1", "recall")


def threshold_table(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate threshold with the confusion counts it gives, thresholds ascending.

    Shape: labels, probs (N,) -> each entry (K + 1,), K = distinct probabilities (K if the
    highest is exactly 1, since nothing can sit above it).

    Returns:
        dict of `threshold`, `tp`, `fp`, `fn`, `tn` arrays.
    """
    labels, probs = check_scores(labels, probs, "cannot choose a threshold on an empty validation set")
    scores, inverse = np.unique(probs, return_inverse=True)  # (K,) ascending
    pos_at = np.bincount(inverse, weights=labels, minlength=len(scores))
    neg_at = np.bincount(inverse, weights=1 - labels, minlength=len(scores))
    # Cut i (i = 0..K) calls violent every score >= scores[i]; cut K calls nothing violent.
    tp = np.concatenate([np.cumsum(pos_at[::-1])[::-1], [0.0]])
    fp = np.concatenate([np.cumsum(neg_at[::-1])[::-1], [0.0]])
    lower = np.concatenate([[0.0], scores])
    upper = np.concatenate([scores, [1.0]])
    thresholds = (lower + upper) / 2
    if scores[-1] >= 1.0:  # no threshold <= 1 lies above a probability of exactly 1
        tp, fp, thresholds = tp[:-1], fp[:-1], thresholds[:-1]
    n_pos, n_neg = float(labels.sum()), float(len(labels) - labels.sum())
    return {"threshold": thresholds, "tp": tp, "fp": fp, "fn": n_pos - tp, "tn": n_neg - fp}


def choose_threshold(
    labels: np.ndarray, probs: np.ndarray, goal: str = "accuracy", min_recall: float | None = None
) -> float:
    """The validation threshold for `goal`.

    Goals:
        accuracy: the highest accuracy.
        f1: the highest F1 of the violent class.
        recall: the highest threshold whose violent recall is >= `min_recall` (e.g. 0.95), since
            missing violence costs more than a false alarm; among thresholds meeting the floor the
            highest gives the fewest false alarms.

    Ties on accuracy or F1 go to the lowest threshold (more violence caught at the same score).

    Shape: labels, probs (N,).
    """
    if goal not in GOALS:
        raise ValueError(f"unknown threshold goal {goal!r}; choose one of {', '.join(GOALS)}")
    if goal == "recall":
        if min_recall is None or not 0.0 < float(min_recall) <= 1.0:
            raise ValueError("goal 'recall' needs min_recall in (0, 1], e.g. 0.95")
    elif min_recall is not None:
        raise ValueError(f"min_recall applies to goal 'recall' only, not {goal!r}")
    table = threshold_table(labels, probs)
    tp, fp, fn, tn = table["tp"], table["fp"], table["fn"], table["tn"]
    n_pos, n_neg = tp[0] + fn[0], fp[0] + tn[0]
    if n_pos == 0 or n_neg == 0:
        only = "violent" if n_neg == 0 else "non-violent"
        raise ValueError(f"validation labels are all {only}; a threshold needs both classes")
    if goal == "accuracy":
        score = (tp + tn) / (n_pos + n_neg)
    elif goal == "f1":
        score = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    else:
        # Counts are integers; compare tp >= target * n_pos with a little slack for float error.
        meets = tp >= float(min_recall) * n_pos - 1e-9
        return float(table["threshold"][np.flatnonzero(meets)[-1]])
    return float(table["threshold"][np.argmax(score)])  # argmax: first, i.e. lowest, of ties
