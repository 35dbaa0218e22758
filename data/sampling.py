"""Which frames of a video to keep and at what size: target-fps or uniform-N sampling, resizing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

_NONE = "none"  # HDF5 attributes cannot hold None, so an unset field is stored as this string
_MIN_SIDE = 16  # below this the backbones' pooling stages run out of pixels
# Frame timestamps are i / source_fps in floating point; a tick that lands exactly on a frame
# (25 -> 10 fps: frame 5 at 0.2 s) must count as reached despite rounding.
_EPS = 1e-9


@dataclass(frozen=True)
class Sampling:
    """Frame selection and output size for reading a video."""

    fps: float | None = None  # target rate: one step is the same time at any source fps; None = all
    frames: int | None = None  # N frames spread uniformly over the whole video (exclusive with fps)
    size: int | None = 224  # square output side (aspect not kept); None = keep
    short_side: int | None = None  # short side after an aspect-keeping resize (exclusive with size)

    def __post_init__(self) -> None:
        if self.fps is not None and self.frames is not None:
            raise ValueError("sampling: set either fps or frames, not both")
        if self.size is not None and self.short_side is not None:
            raise ValueError("sampling: set either size or short_side, not both")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"sampling: fps must be a positive number, got {self.fps}")
        if self.frames is not None and self.frames < 2:
            raise ValueError(
                f"sampling: frames must be at least 2 (flow needs pairs), got {self.frames}"
            )
        for name in ("size", "short_side"):
            value = getattr(self, name)
            if value is not None and value < _MIN_SIDE:
                raise ValueError(
                    f"sampling: {name} must be at least {_MIN_SIDE} pixels, got {value}"
                )

    def to_attrs(self, prefix: str = "") -> dict[str, float | int | str]:
        """Plain values for HDF5 attrs: every field is present, an unset (None) field is "none".

        Writing "none" rather than omitting the key keeps `size=None` distinguishable from a
        missing key (whose default would be 224).
        """
        return {
            prefix + f.name: _NONE if getattr(self, f.name) is None else getattr(self, f.name)
            for f in fields(self)
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], prefix: str = "") -> Sampling:
        """Inverse of `to_attrs`; accepts numpy scalars and bytes as h5py returns them.

        Keys without `prefix` are ignored; a missing field takes its default.
        """
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if prefix + f.name not in attrs:
                continue
            value = attrs[prefix + f.name]
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, str):
                if value != _NONE:
                    raise ValueError(
                        f"sampling attrs: {prefix + f.name}={value!r} is not a number or {_NONE!r}"
                    )
                kwargs[f.name] = None
            else:
                kwargs[f.name] = float(value) if f.name == "fps" else int(value)
        return cls(**kwargs)


def fps_ticks(indices: np.ndarray | int, source_fps: float, target_fps: float) -> np.ndarray:
    """The target-rate tick reached by each source frame: floor(i / source_fps * target_fps).

    Frame i is kept when its tick is larger than the previous frame's, i.e. when its timestamp
    i / source_fps reaches the next k / target_fps. Shared by `sample_indices` and the streaming
    reader so both keep exactly the same frames.
    """
    return np.floor(np.asarray(indices, np.float64) * (target_fps / source_fps) + _EPS).astype(
        np.int64
    )


def sample_indices(n_decoded: int, source_fps: float, sampling: Sampling) -> np.ndarray:
    """Sorted, distinct int64 indices of the frames to keep out of `n_decoded`.

    Target fps: frame i is kept when its timestamp reaches the next 1/fps tick, so 30 -> 10 fps
    keeps every 3rd frame and a target at or above the source rate keeps every frame (never
    duplicates). Uniform-N: `round(linspace(0, n-1, N))`; a video with fewer than N frames gives
    all of its frames, so the result can be shorter than N (callers that need exactly N pad).
    """
    if n_decoded < 0:
        raise ValueError(f"n_decoded must be >= 0, got {n_decoded}")
    if sampling.frames is not None:
        if n_decoded <= sampling.frames:
            return np.arange(n_decoded, dtype=np.int64)
        # Spacing > 1 between samples, so rounding half up can never give the same index twice.
        return np.floor(np.linspace(0, n_decoded - 1, sampling.frames) + 0.5).astype(np.int64)
    if sampling.fps is None or n_decoded == 0:
        return np.arange(n_decoded, dtype=np.int64)
    if not (math.isfinite(source_fps) and source_fps > 0):
        raise ValueError(f"source_fps must be a positive number, got {source_fps}")
    ticks = fps_ticks(np.arange(n_decoded), source_fps, sampling.fps)
    keep = np.empty(n_decoded, bool)
    keep[0] = True
    keep[1:] = ticks[1:] > ticks[:-1]
    return np.flatnonzero(keep).astype(np.int64)


def output_size(width: int, height: int, sampling: Sampling) -> tuple[int, int]:
    """(out_w, out_h) of a width x height source under `sampling`; short_side keeps the aspect."""
    if width <= 0 or height <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    if sampling.size is not None:
        return sampling.size, sampling.size
    if sampling.short_side is not None:
        scale = sampling.short_side / min(width, height)
        if width <= height:
            return sampling.short_side, max(1, round(height * scale))
        return max(1, round(width * scale)), sampling.short_side
    return width, height
