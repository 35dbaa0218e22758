"""Out-of-fold predictions of a cross-validation fold's non-test part: what fusion and thresholds are fitted on.

A fold's validation part is a handful of videos on a small dataset, too few to place a threshold
or to learn fusion weights. Stacking (nested cross-validation) gives every non-test video a
prediction instead: the non-test videos (the fold's train and val parts) are split into K
stratified group folds (`data.splits.group_kfold`, so no recording is in two), each stream's head
is trained K times on K-1 of them and predicts the one held out. The test videos never enter.

The inner heads repeat the fold's final head as closely as they can without seeing the videos they
predict: the final run's saved config and cached features, and the epoch its best.pt holds (chosen
on the fold's validation part). Picking each inner head's epoch on its held-out part instead would
fit the epoch to exactly the videos whose predictions then fit fusion and thresholds, so they would
look better than the test predictions of the final model they stand in for. The inner training
loop evaluates a few of its own training videos only because `fit_stage` needs a validation set;
with the epoch fixed and no early stopping that evaluation decides nothing.

The K inner heads also predict the fold's test videos (`FOLD/<stream>/predictions_test_inner.csv`,
one view per head; read back as the mean logit). Scoring the test fold with the mean of the very
heads whose out-of-fold predictions fitted fusion and thresholds is the usual stacking protocol
(cross-validation bagging): the fitted threshold meets scores of the same models, and averaging K
heads lowers the variance a single head trained on a few dozen videos has.

Written per fold: `FOLD/<stream>/predictions_oof.csv` (as predictions_val.csv), the inner heads'
test predictions and `FOLD/oof.json` (K, seed, the epoch per stream and the inner fold of every
video), reused while best.pt is older.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fusion.pipeline import ViewModel
from fusion.predictions import Predictions, read_predictions, write_atomic, write_predictions
from fusion.tta import check_tta

logger = logging.getLogger(__name__)

STREAMS = ("rgb", "flow")
OOF_SPLIT = "oof"
INNER_TEST_SPLIT = "test_inner"
_META = "oof.json"


@dataclass(frozen=True)
class OutOfFold:
    """What the inner heads of one outer fold predict: stream -> Predictions."""

    fit: dict[str, Predictions]  # out-of-fold predictions of every non-test video
    test: dict[str, Predictions]  # the fold's test videos, mean logit of the K inner heads


@dataclass(frozen=True)
class InnerFolds:
    """The non-test videos of one outer fold and their inner group fold. Shape: every field (N,)."""

    video_ids: np.ndarray  # (N,) str, the fold's train + val videos in store order
    labels: np.ndarray  # (N,) int64, 1 = violent
    groups: np.ndarray  # (N,) str, source recording
    folds: np.ndarray  # (N,) int64 in 0..K-1

    @property
    def k(self) -> int:
        return int(self.folds.max()) + 1


def check_inner_folds(inner_folds: int) -> int:
    """K itself: 0 (off) or at least 2."""
    if isinstance(inner_folds, bool) or not isinstance(inner_folds, (int, np.integer)) or inner_folds < 0 \
            or inner_folds == 1:
        raise ValueError(f"--inner-folds must be 0 (off) or at least 2, got {inner_folds}")
    return int(inner_folds)


def inner_folds(store: str | Path, train_cfg, k: int) -> InnerFolds:
    """K stratified group folds over the non-test videos of the outer fold `train_cfg.fold`.

    Raises ValueError when a class is in fewer than K recordings of the non-test part (an inner
    training part could then lack it).
    """
    from data.splits import group_kfold
    from streams.train import parse_fold

    check_inner_folds(k)
    non_test, labels, groups = _non_test_part(store, train_cfg)
    where = f"fold {parse_fold(train_cfg.fold)[0]}'s non-test part" if train_cfg.fold else "the non-test part"
    for label, name in ((1, "violent"), (0, "non-violent")):
        n = len(np.unique(groups[labels == label]))
        if k > n:
            raise ValueError(f"--inner-folds {k} is more than the {n} recordings with {name} videos in {where}; "
                             f"use at most {n}")
    # Seeded by the run's seed: the same K parts for both streams and on a rerun.
    folds = group_kfold(labels, groups, k, seed=train_cfg.seed)
    order = np.argsort(non_test, kind="stable")
    return InnerFolds(non_test[order], labels[order], groups[order], folds[order])


def max_inner_folds(store: str | Path, train_cfg) -> int:
    """The most inner folds `inner_folds` accepts for the outer fold `train_cfg.fold`: the fewest
    recordings holding one class in its non-test part (may be below 2)."""
    _, labels, groups = _non_test_part(store, train_cfg)
    return min(len(np.unique(groups[labels == label])) for label in (0, 1))


def _non_test_part(store: str | Path, train_cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Video ids (str), labels (int64) and groups (str) of the outer fold's train + val videos, each (N,)."""
    from streams.launch import split_ids

    ids = split_ids(store, train_cfg)
    non_test = ids["train"] + ids["val"]
    return labels_groups(store, non_test)


def labels_groups(store: str | Path, video_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids (str), labels (int64) and source recordings (str) of `video_ids` (default: every video) in a store, each (N,)."""
    from data.store import Store

    with Store(store) as s:
        ids = s.video_ids if video_ids is None else video_ids
        return (np.asarray(ids, dtype=str), np.array([s.label(v) for v in ids], np.int64),
                np.array([s.recording(v) for v in ids], dtype=str))


def oof_path(fold_dir: str | Path, stream: str, split: str = OOF_SPLIT) -> Path:
    return Path(fold_dir) / stream / f"predictions_{split}.csv"


def out_of_fold(
    store: str | Path, fold_dir: str | Path, k: int, devices: Sequence[str] = ("cpu", "cpu"), tta: int = 1
) -> OutOfFold:
    """The inner heads' predictions for the trained fold run `fold_dir`: out-of-fold on its non-test
    videos, and their mean on its test videos.

    With `tta` views > 1 every prediction is the mean logit over the same test-time views
    (`fusion.tta`) that a run's own TTA uses, computed by the fold's backbone with each inner head.
    Written to FOLD/<stream>/predictions_oof.csv, FOLD/<stream>/predictions_test_inner.csv and
    FOLD/oof.json; reused when all are there for the same K and views and newer than the streams'
    best.pt.
    """
    from flow.devices import resolve_device
    from streams.features import features_mismatch
    from streams.launch import split_ids
    from streams.rundir import RunDir

    fold_dir = Path(fold_dir)
    runs = {s: RunDir(fold_dir, s) for s in STREAMS}
    cfgs = {s: runs[s].read_config() for s in STREAMS}  # stream -> (RunConfig, [run] table)
    split = inner_folds(store, cfgs["rgb"][0].train, k)
    tta = check_tta(tta)
    test_ids = sorted(split_ids(store, cfgs["rgb"][0].train)["test"])
    cached = _cached(fold_dir, split, tta, test_ids)
    if cached is not None:
        return cached
    # Files of another setting may be half rewritten below: the marker goes first, and comes back last.
    (fold_dir / _META).unlink(missing_ok=True)
    _, test_labels, _ = labels_groups(store, test_ids)
    epochs = {}
    for i, stream in enumerate(STREAMS):
        cfg, info = cfgs[stream]
        best = runs[stream].load_checkpoint("best")
        if best.get("module") != "head":
            raise ValueError(f"--inner-folds retrains heads on cached features; {runs[stream].path} was fine-tuned "
                             "end to end (stage 2): use head-only training (stage = head) or --inner-folds 0")
        epochs[stream] = int(best["epoch"])
        mismatch = features_mismatch(info["features"], cfg, info)
        if mismatch:
            raise ValueError(f"inner folds refit heads on the features {runs[stream].path} was trained on, but "
                             f"{info['features']} {mismatch}; delete {fold_dir} to retrain it, or use "
                             "--inner-folds 0")
        device = resolve_device(devices[i] if i < len(devices) else "auto")
        views = ViewModel(fold_dir / stream, device) if tta > 1 else None  # the fold's model, loaded once
        ids, labels, logits, test_logits = [], [], [], []
        for fold in range(split.k):
            held = split.folds == fold
            logger.info("%s: inner fold %d/%d, %d held-out videos", stream, fold + 1, split.k, int(held.sum()))
            held_ids = split.video_ids[held].tolist()
            train_ids = split.video_ids[~held].tolist()
            if views is None:  # the cached plain view
                z = train_inner_head(Path(info["features"]), cfg, train_ids, held_ids + test_ids, epochs[stream],
                                     device)
            else:
                head = fit_inner_head(Path(info["features"]), cfg, train_ids, epochs[stream], device)
                z = view_logits(views, head, held_ids + test_ids, tta)
            ids += held_ids
            labels.append(split.labels[held])
            logits.append(z[: len(held_ids)])
            test_logits.append(z[len(held_ids):])
        write_predictions(oof_path(fold_dir, stream), ids, np.concatenate(labels), np.concatenate(logits))
        write_predictions(oof_path(fold_dir, stream, INNER_TEST_SPLIT), test_ids * split.k,
                          np.tile(test_labels, split.k), np.concatenate(test_logits),
                          views=np.repeat(np.arange(split.k), len(test_ids)))
    meta = {"inner_folds": split.k, "seed": cfgs["rgb"][0].train.seed, "epoch": epochs, "tta": tta,
            "fold_of": {v: int(f) for v, f in zip(split.video_ids, split.folds, strict=True)},
            "group_of": {v: str(g) for v, g in zip(split.video_ids, split.groups, strict=True)},
            "test": test_ids}
    write_atomic(fold_dir / _META, json.dumps(meta, indent=2) + "\n")
    return _read(fold_dir)


def _read(fold_dir: Path) -> OutOfFold:
    return OutOfFold({s: read_predictions(oof_path(fold_dir, s)) for s in STREAMS},
                     {s: read_predictions(oof_path(fold_dir, s, INNER_TEST_SPLIT)) for s in STREAMS})


def _cached(fold_dir: Path, split: InnerFolds, tta: int, test_ids: list[str]) -> OutOfFold | None:
    meta_path = fold_dir / _META
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    fold_of = {v: int(f) for v, f in zip(split.video_ids, split.folds, strict=True)}
    same = meta.get("tta", 1) == tta and meta.get("fold_of") == fold_of and meta.get("test") == test_ids
    fresh = all(oof_path(fold_dir, s, name).is_file()
                and meta_path.stat().st_mtime >= (fold_dir / s / "best.pt").stat().st_mtime
                for s in STREAMS for name in (OOF_SPLIT, INNER_TEST_SPLIT))
    if not (same and fresh):
        return None
    logger.info("%s: reusing out-of-fold predictions", fold_dir)
    return _read(fold_dir)


class _EpochReached(Exception):
    """Ends an inner head's training once the epoch it is taken at has been snapshotted."""


def train_inner_head(
    features: Path, cfg, train_ids: Sequence[str], predict_ids: Sequence[str], epoch: int, device: torch.device
) -> np.ndarray:
    """Logits (len(predict_ids),) float64, on their cached plain view, of `fit_inner_head`'s head."""
    from streams.features import FeatureDataset
    from streams.train import FeatureBank, predict, resolve_precision

    head = fit_inner_head(features, cfg, train_ids, epoch, device)
    targets = FeatureBank(FeatureDataset(features, list(predict_ids)))
    ids, _, logits, _ = predict(head, targets.batches(np.arange(len(targets)), cfg.train.batch_size), device,
                                resolve_precision(cfg.train.amp, device))
    if ids != list(predict_ids):
        raise RuntimeError("inner-fold predictions came back in another order than the videos asked for")
    return logits


def view_logits(views: ViewModel, head: torch.nn.Module, video_ids: Sequence[str], tta: int) -> np.ndarray:
    """Mean logit (len(video_ids),) float64 over `tta` test-time views of a run's stream model with
    `head` in place of its own head (`views`: that model, `fusion.pipeline.ViewModel`)."""
    from fusion.tta import average_predictions

    views.model.head.load_state_dict(head.state_dict())
    ids, labels, logits, _ = views.predict(video_ids, tta)
    mean = average_predictions(ids, labels, logits)  # sorted by video id
    order = np.searchsorted(mean.video_ids, np.asarray(video_ids, dtype=str))
    if not np.array_equal(mean.video_ids[np.minimum(order, len(mean) - 1)], np.asarray(video_ids, dtype=str)):
        raise RuntimeError("test-time views came back without some of the videos asked for")
    return mean.logits[order]


def fit_inner_head(
    features: Path, cfg, train_ids: Sequence[str], epoch: int, device: torch.device
) -> torch.nn.Module:
    """A head (eval mode, on `device`) trained on `train_ids` as `cfg` trains, taken after `epoch`
    (a closed-form logistic head has no epochs: it is fitted once).

    The run's learning-rate schedule is kept (its total epochs are not cut); training stops once
    `epoch` (0-based) is done, since later epochs cannot change the model taken.
    """
    from streams.config import CLOSED_FORM_HEADS
    from streams.features import FeatureDataset
    from streams.heads import build_head
    from streams.launch import head_param_groups, make_optimizer
    from streams.logistic import fit_logistic, view0_features
    from streams.losses import build_loss
    from streams.train import (
        EpochSampler,
        FeatureBank,
        fit_stage,
        resolve_precision,
        use_fused_lstm,
    )

    t = replace(cfg.train, patience=0)  # a fixed epoch: nothing is chosen on validation
    train_ds = FeatureDataset(features, list(train_ids), train=True, seed=t.seed)
    if cfg.model.head in CLOSED_FORM_HEADS:  # fitted in closed form: no epochs
        head = build_head(cfg.model, train_ds.feature_dim)
        return fit_logistic(head, *view0_features(train_ds), cfg.model.logistic_c).to(device).eval()
    bank = FeatureBank(train_ds)
    sampler = EpochSampler(train_ds.labels, t.seed, t.sampler, t.minority_share)
    # fit_stage wants a validation set; a few training videos stand in, and decide nothing.
    nominal = FeatureBank(FeatureDataset(features, list(train_ids[: t.batch_size])))

    def train_batches(ep: int):
        sampler.set_epoch(ep)
        return bank.batches(sampler.indices(), t.batch_size, ep)

    # Seeded as streams.launch seeds the final head: its weights from a fork, dropout from the seed itself.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        with torch.random.fork_rng(devices=[]):
            head = build_head(cfg.model, train_ds.feature_dim)
        if device.type == "cpu":
            use_fused_lstm(head)
        head.to(device)
        optimizer = make_optimizer(head_param_groups(head, cfg.optim.stage_lr(1), cfg.optim.weight_decay), cfg.optim)
        loss_fn = build_loss(cfg.loss, train_ds.labels).to(device)
        taken: dict = {}

        def on_event(event: dict) -> None:
            if event.get("event") == "epoch" and event["epoch"] == epoch:
                taken.update(copy.deepcopy(head.state_dict()))
                raise _EpochReached

        try:
            fit_stage(head, train_batches, lambda: nominal.batches(np.arange(len(nominal)), t.batch_size), loss_fn,
                      optimizer, stage=1, steps_per_epoch=-(-len(sampler) // t.batch_size), cfg=t, optim=cfg.optim,
                      device=device, precision=resolve_precision(t.amp, device), on_event=on_event)
        except _EpochReached:
            pass
    if not taken:
        raise ValueError(f"the head was to be taken after epoch {epoch}, but training has only {t.epochs} epochs")
    head.load_state_dict(taken)
    return head.eval()
