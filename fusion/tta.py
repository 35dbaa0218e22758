"""Test-time augmentation: K fixed views per video and stream, averaged as logits before fusion.

A view is one temporal clip (the uniform steps shifted by a fraction of their spacing, the
multi-clip testing of TSN/SlowFast/mmaction2) seen through one spatial transform (the full frame
or a crop, mirrored or not). The views are a fixed grid walked in this order::

    view i:  flip  = i % 2                          (mirror; flow: dx negated)
             phase = PHASES[(i // 2) % 4]           (0, +1/2, -1/4, +1/4 of the step spacing)
             crop  = CROPS[i // 8]                  (full frame, centre, four corners)

so view 0 is the plain uniform clip the streams were validated on, K = 2 adds its mirror image,
K = 8 covers four temporal clips with and without the mirror, and crops come in from K = 9 on
(48 views at most). Crops keep 7/8 of each side (mmaction2's 224-of-256) and are resized back.

Geometry goes through `data.augment`, so a mirrored or cropped view moves flow vectors with the
pixels (a flip negates dx, a crop resized back scales the vectors). Validation and test
predictions use the same views, so the fusion weights are fitted on what they are applied to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.augment import ClipParams, spatial_matrix, warp_affine
from data.clips import (
    ClipConfig,
    channels_first,
    clip_inputs,
    flow_positions,
    resize_clip,
    stack_fields,
    uniform_positions,
)
from data.store import Store
from fusion.predictions import Predictions, average_views

logger = logging.getLogger(__name__)

PHASES = (0.0, 0.5, -0.25, 0.25)  # temporal shifts, in units of the spacing between uniform steps
CROP_SHARE = 7 / 8  # side of a crop view relative to the frame
_CORNER = (1 - CROP_SHARE) / 2  # crop-centre offset of a corner crop, as a fraction of the side
CROPS = (  # (zoom, (x offset, y offset)); zoom 1 = the full frame
    (1.0, (0.0, 0.0)),
    (1 / CROP_SHARE, (0.0, 0.0)),
    (1 / CROP_SHARE, (-_CORNER, -_CORNER)),
    (1 / CROP_SHARE, (_CORNER, -_CORNER)),
    (1 / CROP_SHARE, (-_CORNER, _CORNER)),
    (1 / CROP_SHARE, (_CORNER, _CORNER)),
)
MAX_VIEWS = 2 * len(PHASES) * len(CROPS)


@dataclass(frozen=True)
class ViewSpec:
    """One test-time view of a clip."""

    phase: float = 0.0  # temporal shift of the uniform steps, in units of their spacing
    flip: bool = False  # mirror left-right (flow: dx negated)
    zoom: float = 1.0  # > 1 crops 1/zoom of each side about the crop centre and resizes it back
    offset: tuple[float, float] = (0.0, 0.0)  # crop centre minus frame centre, fractions of (W, H)

    @property
    def params(self) -> ClipParams:
        """The spatial part as `data.augment` parameters."""
        return ClipParams(flip=self.flip, zoom=self.zoom, offset=self.offset)

    @property
    def name(self) -> str:
        crop = "full" if self.zoom == 1.0 else f"crop{self.offset[0]:+.3f},{self.offset[1]:+.3f}"
        return f"t{self.phase:+.2f}/{crop}" + ("/flip" if self.flip else "")


def check_tta(k: int) -> int:
    """`k` as a view count, or ValueError in the words of the `--tta` option."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"--tta must be at least 1, got {k}")
    if k > MAX_VIEWS:
        raise ValueError(f"--tta must be at most {MAX_VIEWS} (the distinct views), got {k}")
    return int(k)


def tta_views(k: int) -> list[ViewSpec]:
    """The first `k` views of the fixed grid (module docstring); view 0 is the plain clip."""
    views = []
    for i in range(check_tta(k)):
        zoom, offset = CROPS[i // (2 * len(PHASES))]
        views.append(ViewSpec(PHASES[(i // 2) % len(PHASES)], bool(i % 2), zoom, offset))
    return views


def view_positions(count: int, steps: int, view: ViewSpec) -> np.ndarray:
    """T positions of a view among `count`: the uniform ones shifted by phase x spacing.

    The shifted span is cut at the ends of the video, so every position stays in 0..count-1 and
    view phase 0 gives exactly `data.clips.uniform_positions`. Shape: -> (T,) int64.
    """
    base = uniform_positions(count, steps)
    if view.phase == 0.0 or count <= steps or steps < 2:
        return base  # with every position already taken there is nothing to shift
    shift = view.phase * (count - 1) / (steps - 1)
    lo, hi = max(0.0, shift), min(count - 1.0, count - 1.0 + shift)
    return np.floor(np.linspace(lo, hi, steps) + 0.5).astype(np.int64)


def _warp(x: np.ndarray, view: ViewSpec, vectors: bool) -> np.ndarray:
    params = view.params
    if params.is_spatial_identity:
        return x
    return warp_affine(x, spatial_matrix(params, *x.shape[-3:-1]), vectors=vectors)


def rgb_view(frames: np.ndarray, view: ViewSpec, size: int | None = None) -> torch.Tensor:
    """A view's spatial transform on RGB frames, channels first and not yet normalised.

    Shape: (T, H, W, 3) uint8 -> (T, 3, S, S) uint8, S = size or the frames' side.
    """
    frames = _warp(np.asarray(frames), view, vectors=False)
    if size is not None:
        frames = resize_clip(frames, size)
    return channels_first(frames)


def flow_view(flow: np.ndarray, view: ViewSpec, size: int | None = None) -> torch.Tensor:
    """A view's spatial transform on stacks of flow fields, channels first, in pixels.

    Shape: (T, L, H, W, 2) float32 px -> (T, 2L, S, S) float16 px (`normalize_clip` divides by the bound).
    """
    flow = _warp(np.asarray(flow, np.float32), view, vectors=True)
    if size is not None:
        flow = resize_clip(flow, size, vectors=True)
    return channels_first(flow, torch.float16)


def clip_from_arrays(
    stream: str,
    frames: np.ndarray | None,
    flow: np.ndarray | None,
    cfg: ClipConfig,
    view: ViewSpec,
) -> tuple[torch.Tensor, np.ndarray]:
    """One view's clip from in-memory frames (rgb) or flow fields (flow), e.g. a scoring window.

    The clip is what `ViewDataset` yields (uint8 RGB, float16 flow in px); `normalize_clip` turns
    it into network input on the device. Shape: frames (n, H, W, 3) uint8 or flow (n - 1, H, W, 2)
    float32 px -> clip (T, C, S, S), positions (T,).
    """
    if stream == "rgb":
        if frames is None or len(frames) < 1:
            raise ValueError("an RGB clip needs at least one frame")
        pos = view_positions(len(frames), cfg.steps, view)
        return rgb_view(frames[pos], view, cfg.size), pos
    if stream == "flow":
        if flow is None or len(flow) < 1:
            raise ValueError("a flow clip needs at least one flow field (two frames)")
        pos = view_positions(flow_positions(len(flow) + 1, cfg.flow_stack), cfg.steps, view)
        fields = stack_fields(pos, len(flow), cfg.flow_stack)  # (T, L)
        return flow_view(flow[fields], view, cfg.size), pos
    raise ValueError(f"unknown stream {stream!r}; expected 'rgb' or 'flow'")


class ViewDataset(torch.utils.data.Dataset):
    """One view's clips of one stream from a store, one item per video.

    Items are exactly `data.clips.ClipDataset`'s: {"video_id": str, "label": float32 tensor (),
    "clip": (T, C, H, W) uint8 RGB or float16 flow in px, "bound": float32 tensor () (flow only),
    "index": int64 tensor (T,)}; view 0 gives the same clip as an evaluation `ClipDataset`. Only the frames a clip needs are read; the store opens lazily
    in each process.
    """

    def __init__(
        self, store: str | Path | Store, video_ids: Sequence[str], stream: str, cfg: ClipConfig, view: ViewSpec
    ) -> None:
        if stream not in ("rgb", "flow"):
            raise ValueError(f"unknown stream {stream!r}; expected 'rgb' or 'flow'")
        self.store = store if isinstance(store, Store) else Store(store)
        self.video_ids = [str(v) for v in video_ids]
        self.stream, self.cfg, self.view = stream, cfg, view

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> dict:
        video_id = self.video_ids[i]
        n = self.store.num_frames(video_id)
        if self.stream == "rgb":
            pos = view_positions(n, self.cfg.steps, self.view)
            clip = rgb_view(self.store.rgb(video_id, pos), self.view, self.cfg.size)
        else:
            pos = view_positions(flow_positions(n, self.cfg.flow_stack), self.cfg.steps, self.view)
            fields = stack_fields(pos, n - 1, self.cfg.flow_stack)  # (T, L)
            flow = self.store.flow(video_id, fields.reshape(-1))  # (T*L, H, W, 2)
            flow = flow.reshape(*fields.shape, *flow.shape[1:])  # (T, L, H, W, 2)
            clip = flow_view(flow, self.view, self.cfg.size)
        item = {
            "video_id": video_id,
            "label": torch.tensor(float(self.store.label(video_id)), dtype=torch.float32),
            "clip": clip,
            "index": torch.from_numpy(pos.astype(np.int64)),
        }
        if self.stream == "flow":
            item["bound"] = torch.tensor(self.store.flow_bound(video_id), dtype=torch.float32)
        return item


def predict_views(
    forward: Callable[[torch.Tensor], torch.Tensor],
    store: str | Path | Store,
    video_ids: Sequence[str],
    stream: str,
    cfg: ClipConfig,
    views: Sequence[ViewSpec],
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run `forward` (normalised clips (N, T, C, H, W) -> logits (N,)) over every view of every video.

    Returns per-row video ids, labels, logits and view numbers (V x N rows, view-major), the
    layout `fusion.predictions.write_predictions` writes with its view column.
    """
    if not video_ids:
        raise ValueError(f"no videos to predict for the {stream} stream")
    device = torch.device(device)
    ids, labels, logits, view_of = [], [], [], []
    for v, view in enumerate(views):
        data = ViewDataset(store, video_ids, stream, cfg, view)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
        with torch.inference_mode():
            for batch in loader:
                out = forward(clip_inputs(batch, device))  # (B,)
                ids.extend(batch["video_id"])
                labels.append(batch["label"].numpy())
                logits.append(out.float().reshape(-1).cpu().numpy())
                view_of.extend([v] * len(batch["video_id"]))
        logger.info("%s view %d/%d (%s): %d videos", stream, v + 1, len(views), view.name, len(data))
    return (
        np.asarray(ids, dtype=str),
        np.concatenate(labels).astype(np.int64),
        np.concatenate(logits).astype(np.float64),
        np.asarray(view_of, np.int64),
    )


def average_predictions(
    video_ids: np.ndarray, labels: np.ndarray, logits: np.ndarray
) -> Predictions:
    """Per-view rows merged into one prediction per video: the mean logit of its views."""
    ids, lab, mean, _ = average_views(video_ids, labels, logits)
    return Predictions(ids, lab, mean)
