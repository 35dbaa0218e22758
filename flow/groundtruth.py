"""Optical-flow ground truth: synthetic warped pairs, Middlebury .flo files and end-point error."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

_FLO_MAGIC = 202021.25  # 'PIEH' read as a little-endian float32


def textured_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth multi-octave random texture, (H, W) float32 in [0, 255]."""
    img = np.zeros((height, width), np.float32)
    for octave, weight in ((2, 0.5), (4, 1.0), (8, 0.6), (16, 0.35), (32, 0.2)):
        gh, gw = max(2, height // octave), max(2, width // octave)
        noise = rng.standard_normal((gh, gw)).astype(np.float32)
        img += weight * cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    img -= img.min()
    img *= 255.0 / max(float(img.max()), 1e-6)
    return img


def smooth_flow(height: int, width: int, rng: np.random.Generator, max_px: float = 5.0) -> np.ndarray:
    """A smooth random field (H, W, 2) float32: global translation plus a few Gaussian swirls."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    flow = np.zeros((height, width, 2), np.float32)
    flow[..., 0] += rng.uniform(-1, 1) * max_px * 0.4
    flow[..., 1] += rng.uniform(-1, 1) * max_px * 0.4
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma = rng.uniform(0.15, 0.35) * min(height, width)
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        flow[..., 0] += rng.uniform(-1, 1) * max_px * 0.6 * bump
        flow[..., 1] += rng.uniform(-1, 1) * max_px * 0.6 * bump
    return flow


def synthetic_pair(
    height: int, width: int, seed: int = 0, max_px: float = 5.0, noise: float = 2.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A textured pair with known flow from the first image to the second.

    The second image is a texture I1; the first samples it along the flow, I0(x) = I1(x + u(x)),
    so u is exactly the flow from prev to nxt at every pixel of prev. Independent Gaussian sensor
    noise of std `noise` grey levels is added to each image.

    Returns:
        prev (H, W) uint8, nxt (H, W) uint8, flow (H, W, 2) float32 (dx, dy) in pixels.
    """
    rng = np.random.default_rng(seed)
    margin = int(np.ceil(max_px * 2)) + 2
    big = textured_image(height + 2 * margin, width + 2 * margin, rng)
    flow = smooth_flow(height, width, rng, max_px)
    nxt = big[margin : margin + height, margin : margin + width]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    map_x = xx + flow[..., 0] + margin
    map_y = yy + flow[..., 1] + margin
    prev = cv2.remap(big, map_x, map_y, interpolation=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    to_u8 = lambda a: np.clip(np.rint(a + rng.normal(0, noise, a.shape)), 0, 255).astype(np.uint8)  # noqa: E731
    return to_u8(prev), to_u8(nxt), flow


def synthetic_pairs(
    n: int, height: int, width: int, seed: int = 0, max_px: float = 5.0, noise: float = 2.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` synthetic pairs stacked: (N, H, W) uint8, (N, H, W) uint8, (N, H, W, 2) float32."""
    pairs = [synthetic_pair(height, width, seed + i, max_px, noise) for i in range(n)]
    return tuple(np.stack(parts) for parts in zip(*pairs))  # type: ignore[return-value]


def read_flo(path: str | Path) -> np.ndarray:
    """Read a Middlebury .flo file into (H, W, 2) float32."""
    with open(path, "rb") as fh:
        magic = np.fromfile(fh, np.float32, 1)
        if magic.size != 1 or magic[0] != _FLO_MAGIC:
            raise ValueError(f"{path}: not a .flo file (bad magic)")
        width, height = (int(v) for v in np.fromfile(fh, np.int32, 2))
        data = np.fromfile(fh, np.float32, width * height * 2)
    if data.size != width * height * 2:
        raise ValueError(f"{path}: truncated .flo file")
    return data.reshape(height, width, 2)


def write_flo(path: str | Path, flow: np.ndarray) -> None:
    """Write (H, W, 2) float32 as a Middlebury .flo file."""
    height, width = flow.shape[:2]
    with open(path, "wb") as fh:
        np.array([_FLO_MAGIC], np.float32).tofile(fh)
        np.array([width, height], np.int32).tofile(fh)
        np.ascontiguousarray(flow, np.float32).tofile(fh)


def epe(flow: np.ndarray, gt: np.ndarray, border: int = 0) -> float:
    """Mean end-point error in pixels between (…, H, W, 2) fields, optionally ignoring a border."""
    flow, gt = np.asarray(flow, np.float64), np.asarray(gt, np.float64)
    if border:
        flow = flow[..., border:-border, border:-border, :]
        gt = gt[..., border:-border, border:-border, :]
    return float(np.sqrt(((flow - gt) ** 2).sum(-1)).mean())


def flyingchairs_pairs(folder: str | Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The (prev gray, next gray, gt flow) triples of a FlyingChairs folder (NNNNNNN-img0/img1.png, -gt.flo)."""
    triples = []
    for gt_path in sorted(Path(folder).glob("*-gt.flo")):
        stem = gt_path.name[: -len("-gt.flo")]
        img0 = cv2.imread(str(gt_path.with_name(f"{stem}-img0.png")), cv2.IMREAD_GRAYSCALE)
        img1 = cv2.imread(str(gt_path.with_name(f"{stem}-img1.png")), cv2.IMREAD_GRAYSCALE)
        if img0 is None or img1 is None:
            raise ValueError(f"{folder}: missing images for {stem}")
        triples.append((img0, img1, read_flo(gt_path)))
    return triples
