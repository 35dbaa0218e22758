"""Clip datasets over the store: T time steps per video, one RGB frame or one stack of L flow fields each.

Which frames a clip holds (P = usable positions: n frames for RGB; for flow, with F = n - 1 fields,
P = max(F - L + 1, 1) so that every stack fits whole when the video allows):

- Evaluation (`train=False`, view 0): T positions spread evenly over 0..P-1,
  round(linspace(0, P - 1, T)). A video with fewer than T positions gives each once, then the
  last one again until there are T (edge padding; the repeats show in `index`).
- Training (`train=True`) and augmented views (view > 0 with an AugmentConfig): a random temporal
  crop. The T steps cover a share min(c * r, 1) of the video at a random start, c ~ U(min_crop, 1)
  and r the playback rate drawn from `AugmentConfig.frame_rate_range` (1 without augmentation);
  then `temporal_dropout` repeats some steps. A faster replay also scales the flow vectors by r,
  as `augment_clip` does.
- A flow step at position p stacks fields p, p + 1, ..., p + L - 1 (field i is the motion from
  frame i to frame i + 1); past the last field it repeats the last field (only videos with fewer
  than L fields get there).

Augmentation draws come from a numpy Generator seeded by (seed, video id, view, epoch) and the
spatial ones (flip, zoom, crop, rotation, colour) are drawn first, so the RGB and the flow dataset
of one video draw the same geometry: a flip mirrors the frames and negates dx alike.

The store opens lazily in each process (`Store` pickles without its file handles), so a dataset
built in the parent can go to DataLoader workers. Only the frames a clip needs are read, each
once, in whatever order the clip takes them (the store reads runs of consecutive frames as slices
and decodes each frame once).
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from data.augment import (
    AugmentConfig,
    ClipParams,
    color_jitter,
    sample_params,
    spatial_matrix,
    temporal_dropout,
    temporal_resample,
    warp_affine,
)
from data.manifest import SPLITS, ManifestRow
from data.splits import assign_splits, fold_split
from data.store import Store

log = logging.getLogger(__name__)

# The per-channel statistics RGB frames are normalised with: ImageNet's, which every torchvision
# backbone was trained with (streams.backbones.normalize_rgb uses them too).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

STREAMS = ("rgb", "flow")
_CV_MAX_CHANNELS = 128  # OpenCV's warp and resize refuse images with more channels than this


@dataclass(frozen=True)
class ClipConfig:
    """How a clip is cut from a stored video."""

    steps: int = 16  # T time steps per clip
    flow_stack: int = 5  # L consecutive flow fields stacked per step (flow stream: 2L channels)
    size: int | None = None  # output side (square) after the (augmented) crop; None = store size
    train: bool = False  # random temporal crop + augmentation when True, uniform steps when False
    min_crop: float = 0.8  # training: smallest share of the video a random temporal crop covers

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"ClipConfig.steps must be >= 1, got {self.steps}")
        if self.flow_stack < 1:
            raise ValueError(f"ClipConfig.flow_stack must be >= 1, got {self.flow_stack}")
        if self.size is not None and self.size < 16:
            raise ValueError(f"ClipConfig.size must be at least 16 pixels (or None), got {self.size}")
        if not 0.0 < self.min_crop <= 1.0:
            raise ValueError(f"ClipConfig.min_crop must be in (0, 1], got {self.min_crop}")

    def channels(self, stream: str) -> int:
        """Input channels of a stream's clips: 3 for "rgb", 2L for "flow"."""
        return 3 if _check_stream(stream) == "rgb" else 2 * self.flow_stack

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ClipConfig: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d)


# --- which positions a clip takes ---------------------------------------------------------------


def uniform_positions(count: int, steps: int) -> np.ndarray:
    """T positions spread evenly over 0..count-1; short videos repeat the last. Shape: -> (T,) int64."""
    if count < 1 or steps < 1:
        raise ValueError(f"need count >= 1 and steps >= 1, got {count} and {steps}")
    if count < steps:
        return np.concatenate([np.arange(count), np.full(steps - count, count - 1)]).astype(np.int64)
    if steps == 1:
        return np.array([(count - 1) // 2], np.int64)
    # Spacing >= 1, so rounding half up never picks a position twice.
    return np.floor(np.linspace(0, count - 1, steps) + 0.5).astype(np.int64)


def crop_positions(count: int, steps: int, share: float, rng: np.random.Generator) -> np.ndarray:
    """T positions covering `share` (<= 1) of what the uniform ones cover, from a random start.

    The spacing is the uniform one times `share` (below 1 the clip replays slower and repeats
    positions). Shape: -> (T,) int64.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"crop share must be in (0, 1], got {share}")
    uniform = (count - 1) / (steps - 1) if count > steps and steps > 1 else 1.0
    spacing = uniform * share
    room = max(0.0, count - 1 - (steps - 1) * spacing)
    start = int(rng.random() * (np.floor(room + 1e-9) + 1))
    return temporal_resample(np.arange(start, count, dtype=np.int64), spacing, steps)


def stack_fields(positions: np.ndarray, num_fields: int, stack: int) -> np.ndarray:
    """Field indices of the L-stack starting at each position, clamped to the last field.

    Shape: (T,) -> (T, L) int64.
    """
    if num_fields < 1:
        raise ValueError("a video needs at least one flow field (two frames)")
    return np.minimum(np.asarray(positions)[:, None] + np.arange(stack), num_fields - 1).astype(np.int64)


def flow_positions(num_frames: int, stack: int) -> int:
    """Usable stack starts of a video of `num_frames` frames: max(F - L + 1, 1), F = num_frames - 1."""
    return max(num_frames - stack, 1)


# --- geometry on channels-last arrays -----------------------------------------------------------


def _chunked(fn, x: np.ndarray) -> np.ndarray:
    """Apply an OpenCV-backed fn to (..., H, W, C) in slices of at most 128 channels once stacked."""
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    per = max(1, _CV_MAX_CHANNELS // x.shape[-1])
    out = np.concatenate([fn(flat[i : i + per]) for i in range(0, len(flat), per)])
    return out.reshape(*lead, *out.shape[-3:])


def resize_clip(x: np.ndarray, side: int, vectors: bool = False) -> np.ndarray:
    """(..., H, W, C) -> (..., side, side, C); area averaging when shrinking. Flow vectors rescale."""
    h, w, c = x.shape[-3:]
    if (h, w) == (side, side):
        return x
    interp = cv2.INTER_AREA if side * side < h * w else cv2.INTER_LINEAR
    flat = x.reshape(-1, h, w, c)
    # One image at a time: OpenCV's area resize takes at most 4 channels at non-integer scales.
    out = np.stack([cv2.resize(img, (side, side), interpolation=interp) for img in flat])
    out = out.reshape(*x.shape[:-3], side, side, c)
    if vectors:
        out = out * np.array([side / w, side / h], np.float32)
    return out


def _warp(x: np.ndarray, params: ClipParams, vectors: bool = False) -> np.ndarray:
    """The clip's flip/zoom/crop/rotation on (..., H, W, C) frames, or on flow with `vectors`."""
    if params.is_spatial_identity:
        return x
    matrix = spatial_matrix(params, *x.shape[-3:-1])
    return _chunked(lambda chunk: warp_affine(chunk, matrix, vectors=vectors), x)


def read_rows(fetch, index: np.ndarray) -> np.ndarray:
    """Rows `index` (any order, repeats allowed) of a stored array, read as runs of consecutive rows.

    `fetch(slice)` reads one run. Slices, because h5py's point selections of sorted rows are
    ~10x slower than reading each row as its own slice. `Store.rgb`/`Store.flow` take any index
    form themselves; this is for other row sources.
    """
    uniq, inverse = np.unique(np.asarray(index, np.int64), return_inverse=True)
    runs = np.split(uniq, np.flatnonzero(np.diff(uniq) != 1) + 1)
    rows = np.concatenate([fetch(slice(int(run[0]), int(run[-1]) + 1)) for run in runs])
    return rows[inverse.reshape(-1)]


# --- the dataset --------------------------------------------------------------------------------


class ClipDataset(torch.utils.data.Dataset):
    """Clips of one stream from a store, one item per video.

    `__getitem__(i)` returns exactly:

        {"video_id": str,
         "label": float32 tensor (),                1 = violent, 0 = non-violent
         "clip": tensor (T, C, H, W),               not yet normalised (`normalize_clip` does that on
                                                    the device): "rgb": uint8 frames, C = 3;
                                                    "flow": float16 flow in pixels, C = 2L (dx_1,
                                                    dy_1, dx_2, ...)
         "bound": float32 tensor (),                "flow" only: the video's flow bound in pixels
         "index": int64 tensor (T,)}                frame index of each step (the first frame of a
                                                    flow stack)

    Clips travel to the device at a quarter (RGB) or half (flow) of the bytes of normalised
    float32 clips; `normalize_clip(batch["clip"], stream, batch.get("bound"))` (or `clip_inputs`)
    then gives exactly what this dataset used to return. All augmentation happens here, before
    that step: RGB in uint8 (warps and colour jitter round to uint8 as torchvision does on uint8
    frames), flow on float32 pixels before the float16 rounding (relative error 2^-11, about
    0.01 px at 20 px; none for float16 and "qwebp" stores, whose values float16 holds exactly).

    With `cfg.train` every epoch draws a new crop and augmentation (call `set_epoch` each epoch,
    as with DistributedSampler; `augment` None gives the temporal crop alone). Without it, view 0
    is the plain uniform clip and, when `augment` is given, view v > 0 is a fixed augmented draw
    for test-time augmentation and feature caching.
    """

    def __init__(
        self,
        store: str | Path | Store,
        video_ids: Sequence[str],
        stream: str,
        cfg: ClipConfig = ClipConfig(),
        augment: AugmentConfig | None = None,
        seed: int = 0,
        view: int = 0,
    ) -> None:
        # Building a Store reads nothing; its files open on first access in each worker.
        self.store = store if isinstance(store, Store) else Store(store)
        self.video_ids = [str(v) for v in video_ids]
        self.stream = _check_stream(stream)
        self.cfg = cfg
        self.augment = augment
        self.seed = int(seed)
        if view < 0:
            raise ValueError(f"view must be >= 0, got {view}")
        self.view = int(view)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Training draws depend on the epoch, so each epoch sees new crops (workers re-read this)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.video_ids)

    def _rng(self, video_id: str) -> np.random.Generator | None:
        """The item's generator, or None for the plain uniform clip."""
        if self.cfg.train:
            key = [self.seed, 1, self.epoch, self.view]
        elif self.view > 0 and self.augment is not None:
            key = [self.seed, 2, self.view]
        else:
            return None
        # crc32, not hash(): the same id must draw the same in every process and run.
        return np.random.default_rng([*key, zlib.crc32(video_id.encode())])

    def __getitem__(self, i: int) -> dict[str, Any]:
        video_id = self.video_ids[i]
        n = self.store.num_frames(video_id)
        rng = self._rng(video_id)
        aug = self.augment if rng is not None else None
        # Spatial draws first: their count never depends on the stream, so both streams agree.
        params = sample_params(aug, rng) if aug is not None else ClipParams()
        count = n if self.stream == "rgb" else flow_positions(n, self.cfg.flow_stack)
        if rng is None:
            positions = uniform_positions(count, self.cfg.steps)
        else:
            share = min(float(rng.uniform(self.cfg.min_crop, 1.0)) * params.rate, 1.0)
            positions = crop_positions(count, self.cfg.steps, share, rng)
            if aug is not None and aug.temporal_dropout > 0:
                positions = temporal_dropout(positions, aug.temporal_dropout, rng)
        if self.stream == "rgb":
            clip = self._rgb(video_id, positions, params)
        else:
            clip = self._flow(video_id, n, positions, params)
        return self._item(video_id, clip, positions)

    def _rgb(self, video_id: str, positions: np.ndarray, params: ClipParams) -> torch.Tensor:
        frames = self.store.rgb(video_id, positions)  # (T, H, W, 3) uint8
        if self.cfg.size is not None:
            # Resizing first: the augmentation's geometry is relative to the frame, and it then
            # warps only the output pixels.
            frames = resize_clip(frames, self.cfg.size)
        frames = _warp(frames, params)
        if (params.brightness, params.contrast, params.saturation) != (1.0, 1.0, 1.0):
            frames = color_jitter(frames, params.brightness, params.contrast, params.saturation)
        return channels_first(frames)  # (T, 3, H, W) uint8

    def _flow(self, video_id: str, n: int, positions: np.ndarray, params: ClipParams) -> torch.Tensor:
        fields = stack_fields(positions, n - 1, self.cfg.flow_stack)  # (T, L)
        flow = self.store.flow(video_id, fields.reshape(-1))  # (T*L, H, W, 2) px
        flow = flow.reshape(*fields.shape, *flow.shape[1:])  # (T, L, H, W, 2)
        if params.rate != 1.0:
            flow = flow * np.float32(params.rate)  # a faster replay moves further per field
        if self.cfg.size is not None:
            flow = resize_clip(flow, self.cfg.size, vectors=True)
        flow = _warp(flow, params, vectors=True)
        return channels_first(flow, torch.float16)  # (T, 2L, H, W) px

    def _item(self, video_id: str, clip: torch.Tensor, positions: np.ndarray) -> dict[str, Any]:
        item = {
            "video_id": video_id,
            "label": torch.tensor(float(self.store.label(video_id)), dtype=torch.float32),
            "clip": clip,
            "index": torch.from_numpy(positions.astype(np.int64)),
        }
        if self.stream == "flow":  # recorded per video, else the store's, else 20
            item["bound"] = torch.tensor(self.store.flow_bound(video_id), dtype=torch.float32)
        return item


def channels_first(x: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Channels-last frames or flow stacks as a contiguous channels-first tensor.

    Shape: RGB (T, H, W, C) -> (T, C, H, W); flow stacks (T, L, H, W, 2) -> (T, 2L, H, W), channels
    dx_1, dy_1, dx_2, ... `dtype` (default: the input's) is converted to first, so that the
    transposing copy moves the narrower elements.
    """
    if dtype is None or torch.from_numpy(x[:0]).dtype == dtype:
        # numpy's transposing copy of small elements is about twice torch's.
        out = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))
    else:
        out = torch.from_numpy(np.ascontiguousarray(x)).to(dtype).movedim(-1, -3).contiguous()
    return out.flatten(-4, -3) if x.ndim == 5 else out  # (T, [L,] C, H, W)


def normalize_clip(clip: torch.Tensor, stream: str, bound: float | torch.Tensor | None = None) -> torch.Tensor:
    """Clips as `ClipDataset` yields them to network input, on the clip's device.

    "rgb": uint8 (or float in 0..255) -> (x - 255 mean) / (255 std) per channel with ImageNet's
    mean and std, exactly `streams.backbones.normalize_rgb`. "flow": pixels -> x / bound clipped to
    [-1, 1], exactly `normalize_flow`; `bound` is a number or one per clip (a batch's "bound", (B,)).

    Shape: (..., T, C, H, W) -> float32 (..., T, C, H, W).
    """
    if clip.ndim < 4:
        raise ValueError(f"clips must be (..., T, C, H, W), got {tuple(clip.shape)}")
    if _check_stream(stream) == "rgb":
        if clip.shape[-3] != 3:
            raise ValueError(f"RGB clips must have 3 channels in (..., T, C, H, W), got {tuple(clip.shape)}")
        mean = torch.tensor(IMAGENET_MEAN, device=clip.device) * 255.0
        std = torch.tensor(IMAGENET_STD, device=clip.device) * 255.0
        # uint8 - float32 gives a new float32 tensor in one pass; the division then works in place.
        return torch.sub(clip, mean[:, None, None]).div_(std[:, None, None])
    if bound is None:
        raise ValueError("flow clips need their bound (the batch's \"bound\") to be normalised")
    x = clip.float()
    if isinstance(bound, torch.Tensor) and bound.ndim > 0:
        if bound.shape != clip.shape[:-4]:
            raise ValueError(f"one bound per clip expected, got {tuple(bound.shape)} for clips {tuple(clip.shape)}")
        bound = bound.to(x.device, x.dtype).reshape(*bound.shape, 1, 1, 1, 1)
    elif float(bound) <= 0:
        raise ValueError(f"flow bound must be > 0, got {float(bound)}")
    else:
        bound = float(bound)
    return (x / bound).clamp_(-1.0, 1.0)


def clip_inputs(batch: dict[str, Any], device: torch.device | str) -> torch.Tensor:
    """A batch's clips moved to `device` and normalised there (`normalize_clip`).

    The batch says its stream: flow batches carry "bound"; uint8 clips are RGB frames; float
    clips without a bound are taken as already normalised. Shape: (B, T, C, H, W) -> float32.
    """
    clip = batch["clip"].to(device, non_blocking=True)
    if "bound" in batch:
        return normalize_clip(clip, "flow", batch["bound"].to(device, non_blocking=True))
    if clip.dtype == torch.uint8:
        return normalize_clip(clip, "rgb")
    return clip.float()


def _check_stream(stream: str) -> str:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; expected 'rgb' or 'flow'")
    return stream


# --- splits -------------------------------------------------------------------------------------


def video_ids_for_split(
    store: str | Path | Store,
    split: str | None = None,
    fold: tuple[int, int] | None = None,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Video ids per split: {"train": [...], "val": [...], "test": [...]}, each in store order.

    Without `fold` the store's `split` attrs decide; videos without one are placed by
    `data.splits.assign_splits` (by group, stratified). With `fold=(k, K)`, round k of a
    stratified group K-fold over the store's label and group attrs: fold k is test, val is carved
    from the others. `split` keeps only that key.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    owned = not isinstance(store, Store)
    s = Store(store) if owned else store
    try:
        rows = [_row(video_id, s.attrs(video_id)) for video_id in s.video_ids]
    finally:
        if owned:
            s.close()  # DataLoader workers forked later must not inherit an open file
    if not rows:
        raise ValueError(f"{s.path} holds no videos; run `twostream extract` first")
    if fold is not None:
        if len(fold) != 2:
            raise ValueError(f"fold must be (k, K): round k of a K-fold split, got {fold!r}")
        rows = fold_split(rows, int(fold[0]), int(fold[1]), seed=seed)
    elif any(not r.split for r in rows):
        log.info("%d video(s) without a split in %s: assigning them by group", sum(not r.split for r in rows), s.path)
        rows = assign_splits(rows, seed=seed)
    out = {name: [r.video_id for r in rows if r.split == name] for name in SPLITS}
    return {split: out[split]} if split is not None else out


def _row(video_id: str, attrs: dict) -> ManifestRow:
    split = attrs.get("split") or ""
    return ManifestRow(
        video_id=video_id,
        path=str(attrs.get("source_path", "")),
        label=int(attrs["label"]),
        group=str(attrs.get("group") or video_id),  # a video without a group is its own recording
        split=str(split),
    )
