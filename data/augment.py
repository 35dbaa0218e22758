"""Flow-aware clip augmentation: the same geometry for RGB frames and flow fields, colour for RGB only.

Arrays are channels-last numpy: RGB (T, H, W, 3) uint8, flow (T, H, W, 2) float (dx right, dy
down, pixels, from frame t to t + 1). Moving a frame pair by one spatial map moves the flow with
it: a point x with flow u lands at A(x) and its partner x + u at A(x + u), so for an affine map
A(x) = L x + b the new field is u'(A(x)) = L u(x). Hence a horizontal flip negates dx, a zoom by s
scales the vectors by s (by s_x and s_y separately when the aspect changes), and a rotation
rotates them by the same angle as the image.

Angles are in degrees, positive = counter-clockwise as seen on screen (OpenCV and torchvision's
convention). With y pointing down the rotation is R = [[cos, sin], [-sin, cos]], so a vector
pointing right, (1, 0), rotated by +90 degrees points up, (0, -1). Areas that a warp brings in from
outside the frame are zero (black, no motion).

All randomness comes from a numpy Generator, so a clip's augmentation is reproducible from a seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time clip augmentation; defaults from the research report."""

    hflip_p: float = 0.5  # probability of a horizontal flip
    scale_range: tuple[float, float] = (0.85, 1.15)  # random zoom factor (> 1 zooms in) with a random crop position
    rotation_deg: float = 10.0  # rotation drawn from [-rotation_deg, rotation_deg]
    brightness: float = 0.2  # RGB brightness factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # RGB contrast factor drawn from [1 - c, 1 + c]
    saturation: float = 0.2  # RGB saturation factor drawn from [1 - s, 1 + s]
    frame_rate_range: tuple[float, float] = (0.8, 1.2)  # playback speed factor (> 1 = faster)
    temporal_dropout: float = 0.15  # share of frames replaced by the frame before them
    mixup: bool = False  # blend pairs of clips and labels (batch level, `mixup`)
    mixup_alpha: float = 0.2  # Beta(alpha, alpha) mixing coefficient

    def __post_init__(self) -> None:
        for name in ("hflip_p", "brightness", "contrast", "saturation", "temporal_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("scale_range", "frame_rate_range"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi:
                raise ValueError(f"AugmentConfig.{name} must be two numbers 0 < low <= high, got {[lo, hi]}")
        if not 0.0 <= self.rotation_deg <= 180.0:
            raise ValueError(f"AugmentConfig.rotation_deg must be in [0, 180], got {self.rotation_deg}")
        if self.mixup_alpha <= 0:
            raise ValueError(f"AugmentConfig.mixup_alpha must be > 0, got {self.mixup_alpha}")

    @classmethod
    def off(cls) -> AugmentConfig:
        """A config that leaves clips unchanged."""
        return cls(0.0, (1.0, 1.0), 0.0, 0.0, 0.0, 0.0, (1.0, 1.0), 0.0, False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        """Build from a plain dict; unknown keys raise ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"AugmentConfig: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        except TypeError as exc:  # e.g. a number where a pair is expected
            raise ValueError(f"AugmentConfig: {exc}") from None


@dataclass(frozen=True)
class ClipParams:
    """One draw of the per-clip augmentation; applying it twice gives the same result."""

    flip: bool = False  # mirror horizontally (applied first)
    zoom: float = 1.0  # scale about the crop centre
    offset: tuple[float, float] = (0.0, 0.0)  # crop centre minus frame centre, as fractions of (W, H)
    angle: float = 0.0  # degrees, counter-clockwise on screen, about the frame centre (applied last)
    brightness: float = 1.0  # RGB factors; 1 = unchanged
    contrast: float = 1.0
    saturation: float = 1.0
    rate: float = 1.0  # playback speed factor

    @property
    def is_spatial_identity(self) -> bool:
        return not self.flip and self.zoom == 1.0 and self.offset == (0.0, 0.0) and self.angle == 0.0


def sample_params(cfg: AugmentConfig, rng: np.random.Generator) -> ClipParams:
    """Draw one clip's augmentation from `cfg`."""
    zoom = float(rng.uniform(*cfg.scale_range))
    # Zooming in leaves room to move the crop inside the frame; zooming out, to move the frame
    # inside the crop: either way the shift stays within |1 - 1/zoom| / 2 of the frame size.
    room = abs(1.0 - 1.0 / zoom) / 2.0
    return ClipParams(
        flip=bool(rng.random() < cfg.hflip_p),
        zoom=zoom,
        offset=(float(rng.uniform(-room, room)), float(rng.uniform(-room, room))),
        angle=float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)),
        brightness=float(rng.uniform(1.0 - cfg.brightness, 1.0 + cfg.brightness)),
        contrast=float(rng.uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast)),
        saturation=float(rng.uniform(1.0 - cfg.saturation, 1.0 + cfg.saturation)),
        rate=float(rng.uniform(*cfg.frame_rate_range)),
    )


def spatial_matrix(params: ClipParams, height: int, width: int) -> np.ndarray:
    """The forward 2x3 affine map (input pixel -> output pixel) of `params` for a frame of this size.

    x_out = R(angle) zoom (F x_in - crop_centre) + frame_centre, with pixel centres at integers.
    """
    c = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    flip = np.diag([-1.0, 1.0]) if params.flip else np.eye(2)
    flip_t = np.array([width - 1.0, 0.0]) if params.flip else np.zeros(2)
    a = math.radians(params.angle)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    crop_centre = c + np.array([params.offset[0] * width, params.offset[1] * height])
    lin = params.zoom * rot @ flip
    shift = params.zoom * rot @ (flip_t - crop_centre) + c
    return np.concatenate([lin, shift[:, None]], axis=1)


def warp_affine(x: np.ndarray, matrix: np.ndarray, size: tuple[int, int] | None = None,
                vectors: bool = False) -> np.ndarray:
    """Warp frames (..., H, W, C) by a forward 2x3 affine map into `size` (H', W') (default: same size).

    With `vectors`, the last axis holds (dx, dy) and is transformed by the map's linear part.
    """
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"frames must be (..., H, W, C), got shape {x.shape}")
    out_h, out_w = size if size is not None else x.shape[-3:-1]
    work = x if x.dtype in (np.uint8, np.float32) else x.astype(np.float32)
    m = np.asarray(matrix, np.float64)
    out = _per_frame(work, lambda img: cv2.warpAffine(img, m, (out_w, out_h), flags=cv2.INTER_LINEAR,
                                                      borderMode=cv2.BORDER_CONSTANT, borderValue=0),
                     (out_h, out_w))
    if vectors:
        if out.shape[-1] != 2:
            raise ValueError(f"vectors need a last axis of (dx, dy), got shape {out.shape}")
        # u' = L u per pixel; OpenCV's transform does it in one pass, far faster than a numpy matmul.
        if out.size:
            flat = np.ascontiguousarray(out, np.float32).reshape(-1, out_w, 2)
            out = cv2.transform(flat, m[:, :2].astype(np.float32)).reshape(out.shape)
    return out


def _per_frame(x: np.ndarray, op, out_hw: tuple[int, int]) -> np.ndarray:
    """Apply an OpenCV image op to each (H, W, C) frame of (..., H, W, C), giving (..., H', W', C).

    One frame per call: OpenCV's fast paths cover 1-4 channels, and frames stacked along
    channels hit its channel limits (128 for warps, 4 for area resizing) on long clips.
    """
    h, w, c = x.shape[-3:]
    frames = x.reshape(-1, h, w, c)
    out = np.empty((len(frames), *out_hw, c), x.dtype)
    for i, f in enumerate(frames):
        out[i] = op(np.ascontiguousarray(f)).reshape(*out_hw, c)  # a 1-channel result comes back 2-D
    return out.reshape(*x.shape[:-3], *out_hw, c)


def hflip_flow(flow):
    """Mirror a flow field left-right and negate dx. Shape: (..., H, W, 2), numpy array or tensor."""
    if isinstance(flow, torch.Tensor):
        out = torch.flip(flow, dims=[-2])
        return torch.cat([-out[..., :1], out[..., 1:]], dim=-1)
    out = np.flip(flow, axis=-2).copy()
    out[..., 0] *= -1
    return out


def scale_flow(flow: np.ndarray, factor: float | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """Resize a flow field by `factor` or to `size` (H', W'); vectors scale by W'/W and H'/H.

    Shape: (..., H, W, 2) -> (..., H', W', 2).
    """
    flow = np.asarray(flow, np.float32)
    h, w = flow.shape[-3:-1]
    if (factor is None) == (size is None):
        raise ValueError("scale_flow needs exactly one of factor and size")
    if factor is not None and factor <= 0:
        raise ValueError(f"scale_flow factor must be > 0, got {factor}")
    out_h, out_w = size if size is not None else (max(1, round(h * factor)), max(1, round(w * factor)))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"scale_flow: target size must be positive, got {(out_h, out_w)}")
    # Area averaging when shrinking avoids aliasing of fine motion; bilinear when growing.
    interp = cv2.INTER_AREA if out_h * out_w < h * w else cv2.INTER_LINEAR
    out = _per_frame(flow, lambda img: cv2.resize(img, (out_w, out_h), interpolation=interp), (out_h, out_w))
    return out * np.array([out_w / w, out_h / h], np.float32)


def rotate_flow(flow: np.ndarray, angle: float) -> np.ndarray:
    """Rotate a flow field about the frame centre by `angle` degrees counter-clockwise on screen,
    moving the field and turning its vectors alike. Shape: (..., H, W, 2)."""
    h, w = np.shape(flow)[-3:-1]
    return warp_affine(flow, spatial_matrix(ClipParams(angle=angle), h, w), vectors=True)


def resized_crop(x: np.ndarray, top: float, left: float, height: float, width: float,
                 size: tuple[int, int], vectors: bool = False) -> np.ndarray:
    """Crop the box (top, left, height, width) and resize it to `size` (H', W'), as torchvision's
    `resized_crop`. With `vectors` (flow), dx scales by W'/width and dy by H'/height."""
    if height <= 0 or width <= 0:
        raise ValueError(f"crop box must have a positive size, got {height}x{width}")
    sx, sy = size[1] / width, size[0] / height
    # Pixel centres: output pixel j covers input left + (j + 0.5) / sx - 0.5.
    matrix = np.array([[sx, 0.0, sx * (0.5 - left) - 0.5], [0.0, sy, sy * (0.5 - top) - 0.5]])
    return warp_affine(x, matrix, size, vectors)


def color_jitter(rgb: np.ndarray, brightness: float = 1.0, contrast: float = 1.0,
                 saturation: float = 1.0) -> np.ndarray:
    """Brightness, contrast, saturation factors (1 = unchanged) applied in that order, as torchvision's
    ColorJitter does per image (contrast blends with the frame's mean grey, saturation with each
    pixel's grey). Shape: (..., H, W, 3) uint8 (or float in 0..255) -> same."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1] != 3:
        raise ValueError(f"color_jitter needs RGB frames (..., H, W, 3), got shape {rgb.shape}")
    if min(brightness, contrast, saturation) < 0:
        raise ValueError("color_jitter factors must be >= 0")
    if rgb.dtype == np.uint8:
        # OpenCV's saturating uint8 arithmetic is several times faster than float numpy here;
        # like torchvision on uint8, each step rounds back to uint8.
        return _per_frame(rgb, lambda img: _jitter_u8(img, brightness, contrast, saturation), rgb.shape[-3:-1])
    x = rgb.astype(np.float32)
    gray_w = np.array([0.299, 0.587, 0.114], np.float32)
    x = np.clip(x * brightness, 0, 255)
    if contrast != 1.0:
        mean = (x @ gray_w).mean(axis=(-2, -1), keepdims=True)[..., None]  # (..., 1, 1, 1)
        x = np.clip(contrast * x + (1.0 - contrast) * mean, 0, 255)
    if saturation != 1.0:
        x = np.clip(saturation * x + (1.0 - saturation) * (x @ gray_w)[..., None], 0, 255)
    return x.astype(rgb.dtype)


def _jitter_u8(img: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """`color_jitter` on one (H, W, 3) uint8 frame."""
    if brightness != 1.0:
        img = cv2.convertScaleAbs(img, alpha=brightness)
    if contrast != 1.0:
        mean = float(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).mean())
        img = cv2.addWeighted(img, contrast, img, 0.0, (1.0 - contrast) * mean)
    if saturation != 1.0:
        gray = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        img = cv2.addWeighted(img, saturation, gray, 1.0 - saturation, 0.0)
    return img


def temporal_resample(indices: np.ndarray, factor: float, length: int | None = None) -> np.ndarray:
    """Replay frame indices at `factor` times the speed: position k takes indices[floor(k * factor)].

    `length` defaults to ceil(len / factor), the whole input; a longer request repeats the last index.
    """
    indices = np.asarray(indices)
    if factor <= 0 or indices.size == 0:
        raise ValueError(f"temporal_resample needs factor > 0 and some indices, got factor={factor}")
    length = math.ceil(indices.size / factor) if length is None else length
    pos = np.minimum(np.floor(np.arange(length) * factor + 1e-9).astype(np.int64), indices.size - 1)
    return indices[pos]


def temporal_dropout(indices: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Replace round(p * len) frames (never the first) by the last kept frame before them, keeping the length."""
    out = np.array(indices, copy=True)
    k = min(int(round(p * out.size)), max(out.size - 1, 0))
    dropped = np.sort(rng.choice(np.arange(1, out.size), size=k, replace=False)) if k else []
    for i in dropped:  # ascending, so a run of dropped frames all repeat the frame before the run
        out[i] = out[i - 1]
    return out


def mixup(x, y, alpha: float, rng: np.random.Generator):
    """Blend each clip of a batch with a random partner (Zhang et al. 2018): lam x + (1 - lam) x[perm].

    `x` is a batch (N, ...) or a tuple of batches (e.g. RGB and flow) mixed with the same lam and
    partners; numpy arrays or tensors. `y` (N,) labels become soft targets. Returns (x, y) as float.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    lam = float(rng.beta(alpha, alpha))
    n = len(y)
    perm = rng.permutation(n)

    def mix(a):
        if len(a) != n:
            raise ValueError(f"mixup: batch of {len(a)} clips for {n} labels")
        if isinstance(a, torch.Tensor):
            a = a if a.is_floating_point() else a.float()
            return lam * a + (1.0 - lam) * a[torch.as_tensor(perm, device=a.device)]
        a = np.asarray(a, np.float32)
        return lam * a + (1.0 - lam) * a[perm]

    mixed = tuple(mix(a) for a in x) if isinstance(x, tuple) else mix(x)
    return mixed, mix(y)


def augment_clip(
    rgb: np.ndarray | None,
    flow: np.ndarray | None,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    length: int | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Augment one clip's RGB frames and/or flow fields with one shared draw.

    rgb (T, H, W, 3) uint8 and flow (T', h, w, 2) float, usually T' = T - 1; the two may differ in
    resolution (the geometry is shared in relative terms). Time: the clip is replayed at a random
    speed (`temporal_resample`, flow vectors scaled by the speed factor since frames are further
    apart) and frames are dropped (`temporal_dropout`); both streams get the same frame indices.
    `length` is the RGB output length (default: T); pass a longer clip than `length` so a faster
    replay does not run out of frames. Space: one flip/zoom/crop/rotation for both. Colour: RGB only.
    """
    if rgb is None and flow is None:
        raise ValueError("augment_clip needs rgb, flow or both")
    if rgb is not None and (rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8):
        raise ValueError(f"rgb must be (T, H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    if flow is not None and (flow.ndim != 4 or flow.shape[-1] != 2):
        raise ValueError(f"flow must be (T, H, W, 2), got shape {flow.shape}")
    params = sample_params(cfg, rng)
    n = len(rgb) if rgb is not None else len(flow)
    lag = n - len(flow) if rgb is not None and flow is not None else 0  # flow has T - 1 fields for T frames
    length = n if length is None else length
    if length - lag < 1 or lag < 0:
        raise ValueError(f"clip of {n} frames and {n - lag} flow fields cannot give {length} frames")
    idx = temporal_dropout(temporal_resample(np.arange(n), params.rate, length), cfg.temporal_dropout, rng)
    if rgb is not None:
        rgb = rgb[idx]
        if not params.is_spatial_identity:
            rgb = warp_affine(rgb, spatial_matrix(params, *rgb.shape[1:3]))
        if (params.brightness, params.contrast, params.saturation) != (1.0, 1.0, 1.0):
            rgb = color_jitter(rgb, params.brightness, params.contrast, params.saturation)
    if flow is not None:
        flow = np.asarray(flow, np.float32)[np.minimum(idx[: length - lag], len(flow) - 1)]
        if params.rate != 1.0:
            flow = flow * np.float32(params.rate)
        if not params.is_spatial_identity:
            flow = warp_affine(flow, spatial_matrix(params, *flow.shape[1:3]), vectors=True)
    return rgb, flow
