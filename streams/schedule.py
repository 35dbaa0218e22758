"""Learning rate as a pure function of the step: linear warm-up, then cosine decay, with optional warm restarts.

    warm-up (step < w):   lr = base * (step + 1) / (w + 1)
    cosine:               lr = min + (base - min) * (1 + cos(pi * k / (n - 1))) / 2

where k counts steps from the start of the current cycle and n is the cycle's length. The decay
steps after warm-up are split into `restarts + 1` equal cycles (SGDR, Loshchilov & Hutter 2017),
each starting again at `base` and ending at `min` on its last step; the last step of the schedule
(`total_steps - 1`) always runs at `min`. Steps past the end stay at `min`.
"""

from __future__ import annotations

import math

import torch


def lr_at(
    step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, min_lr: float = 0.0, restarts: int = 0
) -> float:
    """The learning rate of optimiser step `step` (0-based) in a schedule of `total_steps`."""
    if total_steps < 1 or step < 0:
        raise ValueError(f"need total_steps >= 1 and step >= 0, got total_steps={total_steps}, step={step}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be in [0, total_steps) with total_steps={total_steps}")
    if not 0.0 <= min_lr <= base_lr:
        raise ValueError(f"need 0 <= min_lr <= base_lr, got min_lr={min_lr}, base_lr={base_lr}")
    decay = total_steps - warmup_steps
    if restarts < 0 or restarts + 1 > decay:
        raise ValueError(f"restarts must be in [0, {decay - 1}] for {decay} decay steps, got {restarts}")
    if step < warmup_steps:
        return base_lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return min_lr
    cycles = restarts + 1
    k = step - warmup_steps
    bounds = [c * decay // cycles for c in range(cycles + 1)]  # cycle c spans [bounds[c], bounds[c + 1])
    cycle = max(c for c in range(cycles) if bounds[c] <= k)
    start, end = bounds[cycle], bounds[cycle + 1]
    length = end - start
    if length == 1:
        return min_lr
    progress = (k - start) / (length - 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group to `lr * group["lr_scale"]`, keeping the groups' ratios.

    A group without `lr_scale` gets one on the first call: its current lr over the largest
    current lr among the groups.
    """
    groups = optimizer.param_groups
    if any("lr_scale" not in g for g in groups):
        top = max(g["lr"] for g in groups)
        for g in groups:
            g.setdefault("lr_scale", g["lr"] / top if top > 0 else 1.0)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]


class WarmupCosine:
    """Drives an optimiser with `lr_at`; holds no state beyond its settings, so resuming needs only the step."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, base_lr: float, warmup_steps: int = 0,
                 min_lr: float = 0.0, restarts: int = 0) -> None:
        lr_at(0, total_steps, base_lr, warmup_steps, min_lr, restarts)  # validate the settings once, up front
        self.optimizer = optimizer
        self.total_steps, self.base_lr, self.warmup_steps = total_steps, base_lr, warmup_steps
        self.min_lr, self.restarts = min_lr, restarts

    def step(self, step: int) -> float:
        """Set the learning rate for optimiser step `step` and return it."""
        lr = lr_at(step, self.total_steps, self.base_lr, self.warmup_steps, self.min_lr, self.restarts)
        set_lr(self.optimizer, lr)
        return lr
