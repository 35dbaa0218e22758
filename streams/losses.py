"""Binary losses on violence logits: focal loss (Lin et al. 2017) and BCE, with label smoothing and class weights.

Labels: 1 = violent, 0 = non-violent. Targets may be soft (mixup); smoothing maps a target y to
y (1 - e) + e / 2. With p = sigmoid(z), smoothed target s, focal weights a_1 (class 1) and a_0:

    FL = -[ a_1 s (1 - p)^g log p  +  a_0 (1 - s) p^g log(1 - p) ]

which is the usual FL(p_t) = -a_t (1 - p_t)^g log p_t for hard targets. `alpha` weights the class
named by `minority_label` (non-violent in CCTV data), the other class gets 1 - alpha. gamma = 0 and
alpha = 0.5 give half the BCE. Class weights multiply each sample's loss by w_1 y + w_0 (1 - y) of
its unsmoothed target; "mean" divides by the batch size, as Keras' class_weight does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streams.config import LossConfig


def class_weights(labels) -> torch.Tensor:
    """Balanced class weights (w_0, w_1) = N / (2 n_c) from 0/1 labels (list, array or tensor). Shape: (2,)."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if y.size == 0:
        raise ValueError("class weights need at least one label")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    counts = np.bincount(y.astype(np.int64), minlength=2)
    if (counts == 0).any():
        raise ValueError(f"class weights need both classes; the labels hold only class {int(np.argmax(counts))}")
    return torch.tensor(y.size / (2.0 * counts), dtype=torch.float32)


def smooth_targets(targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Pull binary targets toward 1/2: y (1 - e) + e / 2."""
    return targets * (1.0 - label_smoothing) + 0.5 * label_smoothing


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.7,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
    minority_label: int = 0,
    class_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary focal loss (module docstring). Shape: logits (N,), targets (N,) in [0, 1] -> scalar, or (N,) for "none"."""
    z, t = _check(logits, targets, minority_label, reduction)
    s = smooth_targets(t, label_smoothing)
    a1, a0 = (1.0 - alpha, alpha) if minority_label == 0 else (alpha, 1.0 - alpha)
    # log p = logsigmoid(z) and 1 - p = sigmoid(-z) stay finite for any logit.
    pos = a1 * s * torch.sigmoid(-z).pow(gamma) * F.logsigmoid(z)
    neg = a0 * (1.0 - s) * torch.sigmoid(z).pow(gamma) * F.logsigmoid(-z)
    return _reduce(-(pos + neg), t, class_weight, reduction)


def bce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    class_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary cross-entropy with label smoothing and class weights. Shape: (N,), (N,) -> scalar or (N,)."""
    z, t = _check(logits, targets, 0, reduction)
    loss = F.binary_cross_entropy_with_logits(z, smooth_targets(t, label_smoothing), reduction="none")
    return _reduce(loss, t, class_weight, reduction)


class FocalLoss(nn.Module):
    """`focal_loss` with fixed settings; class weights live in a buffer so they follow `.to(device)`."""

    def __init__(self, alpha: float = 0.7, gamma: float = 2.0, label_smoothing: float = 0.0,
                 minority_label: int = 0, class_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.alpha, self.gamma, self.label_smoothing, self.minority_label = alpha, gamma, label_smoothing, minority_label
        self.register_buffer("class_weight", None if class_weight is None else torch.as_tensor(class_weight).float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.alpha, self.gamma, self.label_smoothing, self.minority_label,
                          self.class_weight)


class BCELoss(nn.Module):
    """`bce_loss` with fixed settings; class weights live in a buffer."""

    def __init__(self, label_smoothing: float = 0.0, class_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weight", None if class_weight is None else torch.as_tensor(class_weight).float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return bce_loss(logits, targets, self.label_smoothing, self.class_weight)


def build_loss(cfg: LossConfig, labels=None) -> nn.Module:
    """The loss of `cfg`; "balanced" class weights are computed from the training `labels`."""
    weight = None
    if cfg.class_weights == "balanced":
        if labels is None:
            raise ValueError("balanced class weights need the training labels")
        weight = class_weights(labels)
    if cfg.kind == "focal":
        return FocalLoss(cfg.alpha, cfg.gamma, cfg.label_smoothing, cfg.minority_label, weight)
    return BCELoss(cfg.label_smoothing, weight)


def _check(logits: torch.Tensor, targets: torch.Tensor, minority_label: int, reduction: str):
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    if minority_label not in (0, 1):
        raise ValueError(f"minority_label must be 0 or 1, got {minority_label}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return logits, targets.to(logits.dtype)


def _reduce(loss: torch.Tensor, targets: torch.Tensor, class_weight: torch.Tensor | None, reduction: str):
    if class_weight is not None:
        w = class_weight.to(device=loss.device, dtype=loss.dtype)
        loss = loss * (w[1] * targets + w[0] * (1.0 - targets))
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss
