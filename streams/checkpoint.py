"""Training checkpoints: tensors and plain data only, written atomically, loadable with weights_only=True.

A checkpoint is one dict:

    format, version        "twostream-checkpoint", 1
    stage                  1 (head on cached features) or 2 (end-to-end fine-tuning)
    module                 "head" (state of a TemporalHead) or "model" (a whole StreamModel)
    model                  the module's state dict
    optimizer, scaler      their state dicts (scaler {} without fp16 loss scaling)
    step, epoch            optimiser steps taken in the stage; the last finished epoch (0-based)
    stage_finished         True once the stage ran all its epochs or stopped early
    best, stage_best       {"value", "epoch", "stage"} of the run's and the stage's best val metric
    bad_epochs             epochs since the stage's best (early stopping)
    rng                    torch / numpy / python (+ cuda) generator states
    config, metrics        the resolved run config and the epoch's metrics, as plain dicts

No pickled objects (argparse namespaces, numpy arrays, dataclasses): `torch.load(path,
weights_only=True)` reads every checkpoint, so loading one never runs code from the file. The
file is written beside its final name, fsynced and renamed over it: a kill at any moment leaves
the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.h5files import write_file_atomic

FORMAT = "twostream-checkpoint"
VERSION = 1


def rng_state() -> dict[str, Any]:
    """The global generators' states as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": _plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (the CUDA part only where CUDA is in use)."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (with format and version added) atomically to `path`."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    return write_file_atomic(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; a missing or foreign file raises a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a checkpoint of ours"
        raise ValueError(f"{path} is not a readable twostream checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a twostream checkpoint")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer twostream (checkpoint version {state['version']})")
    return state


def _plain(value: Any) -> Any:
    """Tuples become lists, recursively: the weights-only unpickler takes lists of ints as they are."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


