"""Resolving a device name ("auto", "cpu", "cuda", "cuda:N") once, with a clear error when it cannot exist."""

from __future__ import annotations

import os

import torch


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` picks the first CUDA device when there is one, else the CPU; a CUDA name needs CUDA."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = str(spec).strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device '{spec}' was asked for but torch sees no CUDA device here; use --device cpu")
        index = 0 if name == "cuda" else _parse_index(name[5:], spec)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device '{spec}' does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N")


def _parse_index(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ValueError(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N")
    return int(text)


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
