"""The closed-form logistic head: L2-regularised logistic regression on pooled clip statistics.

For hand-crafted descriptors and a few dozen training videos the classical classifier is linear on
temporally pooled statistics (Laptev et al. 2008; Hassner et al. 2012), fitted as the convex
problem it is: to its optimum, with no epochs, learning rate, dropout or epoch picked on a handful
of validation videos. Trained by mini-batch SGD instead (the `stats_pool` head), the same model
lands wherever the epoch chosen on 5-8 validation videos leaves it.

`LogisticHead` is a `StatsPoolHead` (the same statistics, affine, linear embedding and logit), so
checkpoints, TTA views and scoring treat it like any head; only its stage-1 weights come from
`fit_logistic` instead of gradient steps: the statistics of each training video's plain view
(view 0 of the features cache, the clip evaluation sees) are standardised into the head's affine,
scikit-learn's class-balanced `LogisticRegression` with `ModelConfig.logistic_c` is fitted on them
(L-BFGS), and its weights become the first row of the embedding, read out by the logit.
`fit_closed_form` is stage 1 for it: fit, evaluate on validation, write best.pt and last.pt
(epoch 0) as `streams.train.fit_stage` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch
from torch import nn

from streams.heads import StatsPoolHead, masked_statistics

if TYPE_CHECKING:
    from streams.rundir import RunDir
    from streams.train import Precision

log = logging.getLogger(__name__)



class LogisticHead(StatsPoolHead):
    """A StatsPoolHead whose stage-1 weights are fitted in closed form (`fit_logistic`).

    Stage 2, when a run asks for it, fine-tunes it with the backbone by gradient steps from there.
    """


def view0_features(dataset) -> tuple[torch.Tensor, np.ndarray]:
    """The plain view of every video of a `streams.features.FeatureDataset`: features (N, T, D) float32, labels (N,)."""
    with h5py.File(dataset.path, "r") as f:
        videos = f["videos"]
        x = np.stack([videos[v]["features"][0] for v in dataset.video_ids]) if len(dataset) else np.zeros((0, 0, 0))
    return torch.from_numpy(x.astype(np.float32)), np.asarray(dataset.labels, np.int64)


@torch.no_grad()
def fit_logistic(head: LogisticHead, features: torch.Tensor, labels: np.ndarray, c: float) -> LogisticHead:
    """Fit `head` as class-balanced L2 logistic regression (inverse strength `c`) on `features` (N, T, D)."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels, np.int64)
    if features.ndim != 3 or features.shape[0] != len(labels):
        raise ValueError(f"features must be (N, T, D) with one label per clip, got {tuple(features.shape)} "
                         f"and {len(labels)} labels")
    if len(np.unique(labels)) < 2:
        raise ValueError("the logistic head needs training videos of both classes")
    stats = masked_statistics(features.double())  # (N, 4D)
    head._initialize(stats)  # the head's own standardisation, from these videos
    z = ((stats - head.shift.double()) * head.log_scale.double().exp()).numpy()
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=10_000).fit(z, labels)
    head.proj.weight.zero_()
    head.proj.bias.zero_()
    head.proj.weight[0] = torch.as_tensor(lr.coef_[0])
    head.out.weight.zero_()
    head.out.weight[0, 0] = 1.0
    head.out.bias.fill_(float(lr.intercept_[0]))
    return head


def fit_closed_form(
    model: nn.Module,
    train_ds,
    val_batches: Callable[[], Iterable[dict]],
    loss_fn: nn.Module,
    *,
    c: float,
    device: torch.device,
    precision: Precision,
    metric: str,
    run: RunDir | None = None,
    extra: dict | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> dict:
    """Stage 1 of a logistic head: fit it, evaluate on validation, write best.pt and last.pt (epoch 0).

    `model` is the head, or the head under DDP (every process fits the same one). Returns what
    `streams.train.fit_stage` returns.
    """
    from streams.train import STAGE_NAMES, _finite, _unwrap, evaluate, rng_state

    head = _unwrap(model)
    start = time.perf_counter()
    features, labels = view0_features(train_ds)
    fit_logistic(head, features, labels, c)
    metrics, *_ = evaluate(model, val_batches(), device, loss_fn, precision)
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        train_logits = head(features.to(device)).float().cpu()
        train_loss = float(loss_fn(train_logits, torch.as_tensor(labels, dtype=torch.float32)))
    best = {"value": metrics[metric], "epoch": 0, "stage": 1}
    record = {"stage": STAGE_NAMES[1], "epoch": 0, "lr": 0.0, "train_loss": train_loss,
              **{f"val_{k}": v for k, v in metrics.items()}, "clips_per_s": len(labels) / max(seconds, 1e-9),
              "seconds": seconds, "best": True, "step": 1, "time": time.time()}
    if run is not None:
        run.append_metrics(record)
        state = {"stage": 1, "model": head.state_dict(), "optimizer": {}, "scaler": {}, "step": 1, "epoch": 0,
                 "stage_finished": True, "best": best, "stage_best": best, "bad_epochs": 0, "rng": rng_state(),
                 "metrics": _finite(record), **(extra or {})}
        run.save_checkpoint("last", state)
        run.save_checkpoint("best", state)
    log.info("head fitted in closed form on %d videos in %.2f s: val %s %.4f", len(labels), seconds, metric,
             metrics[metric])
    if on_event is not None:
        on_event({"event": "epoch", "epochs": 1, **record})
    return {"best": best, "stage_best": best, "epochs_run": 1, "stopped_early": False, "step": 1}
