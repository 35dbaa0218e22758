"""Checking a batch of image pairs before a torch flow estimator touches it."""

from __future__ import annotations

import torch
from torch import Tensor


def check_pair(prev: Tensor, nxt: Tensor, method: str) -> None:
    """Raise ValueError unless `prev` and `nxt` are (N, H, W) real tensors of one shape on one
    device with finite grey levels (a NaN would otherwise spread over the whole flow field)."""
    if not isinstance(prev, Tensor) or not isinstance(nxt, Tensor):
        raise ValueError(f"{method} expects torch tensors; use flow.estimate for numpy arrays")
    if prev.shape != nxt.shape:
        raise ValueError(f"prev and nxt differ in shape: {tuple(prev.shape)} vs {tuple(nxt.shape)}")
    if prev.ndim != 3:
        raise ValueError(f"{method} expects (N, H, W) grey images, got shape {tuple(prev.shape)}")
    if prev.device != nxt.device:
        raise ValueError(f"prev and nxt are on different devices: {prev.device} vs {nxt.device}")
    if prev.is_complex() or prev.dtype == torch.bool:
        raise ValueError(f"{method} expects real grey levels, got dtype {prev.dtype}")
    if prev.is_floating_point() and not bool(torch.isfinite(prev).all() & torch.isfinite(nxt).all()):
        raise ValueError(f"{method} got NaN or infinite grey levels")
