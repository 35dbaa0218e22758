"""Leakage-free splits: stratified group k-fold and train/val/test hold-outs by source recording.

Every split here assigns whole groups (source recordings), so no recording feeds both training and
evaluation. Groups are placed greedily, largest first (ties in a seeded random order), each into
the part whose per-class counts fall furthest short of their target — the scheme of scikit-learn's
StratifiedGroupKFold, with targets that may differ per part so hold-outs use the same code.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from data.manifest import SPLITS, ManifestRow

logger = logging.getLogger(__name__)

_SPLIT_NAMES = {s: f"the {s} split" for s in SPLITS}


def group_kfold(labels: Sequence, groups: Sequence, k: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per sample; a group never spans two folds, class counts balanced.

    Shape: labels (N,), groups (N,) -> (N,) int64.
    """
    _, g, counts = _tabulate(labels, groups)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k must be an integer of at least 2, got {k!r}")
    if k > len(counts):
        raise ValueError(f"{k} folds but only {len(counts)} groups")
    want = np.tile(counts.sum(0) / k, (k, 1))  # (k, C)
    folds = _greedy_assign(counts, want, np.random.default_rng(seed))[g]
    _warn_missing_classes(folds, labels, {i: f"fold {i}" for i in range(k)})
    return folds


def assign_splits(
    rows: Sequence[ManifestRow],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> list[ManifestRow]:
    """Rows with train/val/test splits by group, stratified by label; given splits are kept.

    A group takes the split of any of its rows that has one (two different ones raise). Groups with
    none fill train plus whichever of val/test no row names. A hold-out still empty after that is
    carved out of train: RWF-2000 names train and val, so its official val stays as published
    (figures on it compare with the literature) and test comes from train's groups. Fractions are
    of all rows.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction:g}"
        )
    rows = list(rows)
    if not rows:
        return []
    _, g, counts = _tabulate([r.label for r in rows], [r.group for r in rows])
    names = np.unique([r.group for r in rows])
    split_of = np.array([""] * len(counts), dtype=object)  # (G,) split per group
    for row, gi in zip(rows, g, strict=True):
        if row.split and split_of[gi] not in ("", row.split):
            raise ValueError(
                f"group {str(names[gi])!r} has videos in both {split_of[gi]} and {row.split}; "
                "fix the groups or clear the split column to let the splits be chosen"
            )
        split_of[gi] = split_of[gi] or row.split
    fractions = {
        "train": 1 - val_fraction - test_fraction,
        "val": val_fraction,
        "test": test_fraction,
    }
    totals = counts.sum(0)  # (C,) class counts over all rows
    rng = np.random.default_rng(seed)

    given = set(split_of) - {""}
    parts = ["train"] + [s for s in ("val", "test") if s not in given and fractions[s] > 0]
    _fill(split_of, split_of == "", parts, fractions, counts, totals, rng)
    missing = [s for s in ("val", "test") if fractions[s] > 0 and s not in set(split_of)]
    if missing:
        if (split_of == "train").sum() > len(missing):
            logger.info("carving %s out of train", " and ".join(missing))
            _fill(
                split_of, split_of == "train", ["train", *missing], fractions, counts, totals, rng
            )
        else:
            logger.warning("too few groups in train to carve out %s", " and ".join(missing))
    out = [dataclasses.replace(r, split=split_of[gi]) for r, gi in zip(rows, g, strict=True)]
    _warn_missing_classes(np.array([r.split for r in out]), [r.label for r in out], _SPLIT_NAMES)
    return out


def fold_split(
    rows: Sequence[ManifestRow], fold: int, k: int, seed: int = 0, val_fraction: float = 0.15
) -> list[ManifestRow]:
    """Rows split for cross-validation round ``fold`` of ``k``: that fold is test, val is carved
    from the other folds' groups (``val_fraction`` of their rows), the rest is train.

    Splits already on the rows are replaced.
    """
    _check_fraction("val_fraction", val_fraction)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold!r}")
    rows = list(rows)
    folds = group_kfold([r.label for r in rows], [r.group for r in rows], k, seed)
    _, g, counts = _tabulate([r.label for r in rows], [r.group for r in rows])
    split_of = np.array(["train"] * len(counts), dtype=object)  # (G,)
    split_of[g[folds == fold]] = "test"
    rest = split_of == "train"
    if val_fraction > 0:
        if rest.sum() < 2:
            raise ValueError(f"fold {fold} leaves only {rest.sum()} group for train and val")
        rest_totals = counts[rest].sum(0)
        # Seeded by (seed, fold) so each round's val is reproducible on its own.
        rng = np.random.default_rng([seed, fold])
        fractions = {"train": 1 - val_fraction, "val": val_fraction}
        _fill(split_of, rest, ["train", "val"], fractions, counts, rest_totals, rng)
    out = [dataclasses.replace(r, split=split_of[gi]) for r, gi in zip(rows, g, strict=True)]
    _warn_missing_classes(np.array([r.split for r in out]), [r.label for r in out], _SPLIT_NAMES)
    return out


def _tabulate(labels: Sequence, groups: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class index per sample (N,), group index per sample (N,), class counts per group (G, C)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if labels.ndim != 1 or groups.shape != labels.shape:
        raise ValueError(
            f"labels and groups must be 1-D and of equal length, got {labels.shape} and {groups.shape}"
        )
    if len(labels) == 0:
        raise ValueError("no samples to split")
    _, y = np.unique(labels, return_inverse=True)
    group_names, g = np.unique(groups, return_inverse=True)
    counts = np.zeros((len(group_names), y.max() + 1), dtype=np.int64)
    np.add.at(counts, (g, y), 1)
    return y, g, counts


def _fill(
    split_of: np.ndarray,
    pick: np.ndarray,
    parts: list[str],
    fractions: dict[str, float],
    counts: np.ndarray,
    totals: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Assign the picked groups to parts in place; each hold-out wants its fraction of totals.

    The first part (train) takes what the others leave; hold-outs want at most what is there.
    """
    index = np.flatnonzero(pick)
    if len(index) == 0:
        return
    available = counts[index].sum(0)  # (C,)
    want = np.zeros((len(parts), counts.shape[1]))  # (B, C)
    for b, name in enumerate(parts[1:], start=1):
        want[b] = fractions[name] * totals
    scale = want[1:].sum(0)
    over = scale > available
    want[1:, over] *= available[over] / scale[over]
    want[0] = available - want[1:].sum(0)
    part = _greedy_assign(counts[index], want, rng)
    split_of[index] = np.array(parts, dtype=object)[part]


def _greedy_assign(counts: np.ndarray, want: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Part per group, filling parts toward their wanted class counts, largest groups first.

    Each group goes where it most reduces sum over parts and classes of
    ((have - want) / class total)^2; ties go to the part filled least relative to its want.
    Every part that wants something gets a group while there are enough groups.
    Shape: counts (G, C), want (B, C) -> (G,) int64.
    """
    n_groups, n_parts = len(counts), len(want)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]
    scale = np.maximum(counts.sum(0), 1).astype(np.float64) ** 2  # (C,)
    wanted = want.sum(1)  # (B,)
    open_parts = wanted > 0
    have = np.zeros_like(want)  # (B, C)
    members = np.zeros(n_parts, dtype=np.int64)
    out = np.empty(n_groups, dtype=np.int64)
    for done, gi in enumerate(order):
        candidates = open_parts.copy()
        empty = open_parts & (members == 0)
        if empty.sum() >= n_groups - done:
            candidates = empty  # the remaining groups are just enough to give each part one
        gap = have - want  # (B, C)
        delta = ((2 * gap + counts[gi]) * counts[gi] / scale).sum(1)  # cost change per part
        delta[~candidates] = np.inf
        tied = np.flatnonzero(delta <= delta.min() + 1e-12)
        fill = have[tied].sum(1) / np.maximum(wanted[tied], 1e-12)
        best = tied[np.argmin(fill)]
        out[gi] = best
        have[best] += counts[gi]
        members[best] += 1
    return out


def _check_fraction(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _warn_missing_classes(part: np.ndarray, labels: Sequence, names: dict) -> None:
    """Log a warning for each non-empty part (key -> name) lacking a label present in the data."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    for key, name in names.items():
        members = part == key
        if members.any():
            absent = np.setdiff1d(present, labels[members])
            if len(absent):
                logger.warning("%s has no samples of label %s", name, ", ".join(map(str, absent)))
