"""OpenCV-exact image resampling for the Farneback pyramid: Gaussian blur, linear resizes.

cv2.calcOpticalFlowFarneback builds each pyramid level with cv2.GaussianBlur and cv2.resize and
upsamples the flow between levels with cv2.resize; near-singular flow equations later turn any
last-bit difference into visible flow, so these functions round as the OpenCV wheels do on a CPU
with FMA: the same operation order, with fused multiply-adds exactly where OpenCV's vectorised
code uses them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def level_blur(scale: float) -> tuple[int, float]:
    """Kernel size and sigma of the Gaussian smoothing before a pyramid level of `scale` (< 1), as OpenCV's Farneback."""
    sigma = (1.0 / scale - 1.0) * 0.5
    return max(round(sigma * 5) | 1, 3), sigma


def pyramid_level(images: Tensor, scale: float, size: tuple[int, int]) -> Tensor:
    """OpenCV's pyramid level: Gaussian pre-smoothing of the full image, then a linear resize.

    cv2.resize of single-channel float images (the OpenCV wheels): an exact halving averages 2x2
    blocks (OpenCV's INTER_AREA fast path); other sizes go through Intel IPP, which places the
    samples in float64 and interpolates a + t (b - a) with fused multiply-adds, rows then
    columns. Only the rows and columns that interpolation reads are smoothed.

    Shape:
        images (B, 1, H, W) -> (B, 1, h, w).
    """
    ksize, sigma = level_blur(scale)
    height, width = images.shape[-2:]
    if (height, width) == size:
        return gaussian_blur(images, ksize, sigma)
    if (height, width) == (2 * size[0], 2 * size[1]):
        x = gaussian_blur(images, ksize, sigma)
        top = x[..., ::2, ::2] + x[..., ::2, 1::2]
        return (top + (x[..., 1::2, ::2] + x[..., 1::2, 1::2])) * 0.25
    (rows, r0, r1, ty), (cols, c0, c1, tx) = (
        _lerp_axis(src, dst, images.device) for src, dst in zip((height, width), size)
    )
    x = gaussian_blur(images, ksize, sigma, rows, cols)  # (B, 1, len(rows), len(cols))
    left = x.index_select(3, c0)
    x = _fma(x.index_select(3, c1) - left, tx.to(x.dtype), left)
    top = x.index_select(2, r0)
    return _fma(x.index_select(2, r1) - top, ty.to(x.dtype).view(-1, 1), top)


def _lerp_axis(src: int, dst: int, device: torch.device) -> tuple[Tensor, ...]:
    """IPP's linear sampling along one axis.

    Returns the source indices read (sorted), each output's left and right neighbour as
    positions in that list, and the float32 weights of the right neighbours (as float64).
    """
    pos = (np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5
    left = np.floor(pos)
    frac = (pos - left).astype(np.float32)
    left = left.astype(np.int64)
    frac[(left < 0) | (left >= src - 1)] = 0
    left = left.clip(0, src - 1)
    right = np.minimum(left + 1, src - 1)
    used, inverse = np.unique(np.concatenate([left, right]), return_inverse=True)
    tensors = (used, inverse[:dst], inverse[dst:], frac.astype(np.float64))
    return tuple(torch.as_tensor(v, device=device) for v in tensors)


def gaussian_blur(
    x: Tensor, ksize: int, sigma: float, rows: Tensor | None = None, cols: Tensor | None = None
) -> Tensor:
    """cv2.GaussianBlur of float images (reflect-101 borders): rows, then columns.

    The sums are ordered and fused as OpenCV's separable filters on a CPU with FMA: a symmetric
    form for 3 and 5 taps along rows, a running fused sum over all taps for longer rows, and
    symmetric pairs along columns. Other orders differ in the last bit, and near-singular flow
    equations later amplify that. `rows` and `cols` (sorted indices) restrict the output.

    Shape: x (B, C, H, W) -> (B, C, len(rows) or H, len(cols) or W).
    """
    taps = _gaussian_kernel(ksize, sigma)
    r = ksize // 2
    width, height = x.shape[-1], x.shape[-2]
    padded = _pad_reflect101(x, 3, r)

    def col(j: int) -> Tensor:  # the input shifted by j - r columns
        return padded.narrow(3, j, width)

    if ksize == 3:
        out = _fma(col(1), taps[1], (col(0) + col(2)) * taps[2])
    elif ksize == 5:
        out = _fma(col(0) + col(4), taps[4], _fma(col(2), taps[2], (col(1) + col(3)) * taps[3]))
    else:
        out = col(0) * taps[0]
        for j in range(1, ksize):
            out = _fma(col(j), taps[j], out)
    # Whole rows and columns through each pass, then the wanted ones: shifted views cost less
    # than gathering the inputs of each tap.
    if cols is not None:
        out = out.index_select(3, cols)
    padded = _pad_reflect101(out, 2, r)

    def row(i: int) -> Tensor:  # the row pass shifted by i - r rows
        return padded.narrow(2, i, height)

    out = row(r) * taps[r]
    for i in range(1, r + 1):
        out = _fma(row(r - i) + row(r + i), taps[r + i], out)
    return out if rows is None else out.index_select(2, rows)


def resize_flow(flow: Tensor, size: tuple[int, int]) -> Tensor:
    """cv2.resize(..., INTER_LINEAR) of a two-channel flow (OpenCV's own code, not IPP's).

    Samples at float32 positions, weights (1 - t, t) applied as separate products, rows then
    columns; columns clamp to the edge, rows clamp their indices but keep their weights.

    Shape: flow (..., h, w) -> (..., H, W), any leading axes (channels, batch).
    """
    height, width = flow.shape[-2:]

    def axis(src: int, dst: int, clamp: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        first, second, w0, w1 = _flow_axis(src, dst, clamp)
        return (
            torch.as_tensor(first, device=flow.device),
            torch.as_tensor(second, device=flow.device),
            torch.as_tensor(w0, device=flow.device, dtype=flow.dtype),
            torch.as_tensor(w1, device=flow.device, dtype=flow.dtype),
        )

    i0, i1, w0, w1 = axis(width, size[1], clamp=True)
    rows = flow.index_select(-1, i0) * w0 + flow.index_select(-1, i1) * w1
    i0, i1, w0, w1 = axis(height, size[0], clamp=False)
    w0, w1 = w0.view(-1, 1), w1.view(-1, 1)
    return rows.index_select(-2, i0) * w0 + rows.index_select(-2, i1) * w1


def _flow_axis(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, ...]:
    """resize_flow's sampling along one axis: left and right source indices (int64) and their
    float32 weights (1 - t, t) at float32 positions; with `clamp`, t = 0 outside the source."""
    pos = ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    left = np.floor(pos)
    frac = (pos - left).astype(np.float32)
    left = left.astype(np.int64)
    if clamp:
        frac[(left < 0) | (left >= src - 1)] = 0
    right = (left + 1).clip(0, src - 1)
    left = left.clip(0, src - 1)
    return left, right, (np.float32(1) - frac).astype(np.float32), frac


def _fma(a: Tensor, b: Tensor | float, c: Tensor) -> Tensor:
    """a * b + c rounded once, as a fused multiply-add (float64 inputs: a * b + c unfused).

    torch's add with alpha and addcmul use the CPU's FMA instructions where it has them; where a
    probe finds they do not fuse, float32 products are taken exactly in float64 instead.
    """
    if a.dtype == torch.float64:
        return a * b + c
    if _fuses(a.device.type):
        if isinstance(b, Tensor):
            return torch.addcmul(c, a, b)
        return torch.add(c, a, alpha=b)
    return (a.double() * b + c.double()).to(a.dtype)


@functools.lru_cache(maxsize=8)
def _fuses(device_type: str) -> bool:
    """Whether float32 add-with-alpha and addcmul round once on this device type."""
    # (1 + 2^-20)^2 - 1 = 2^-19 + 2^-40 exactly; a separate product rounds the 2^-40 away. The
    # length covers vectorised loops and their scalar tails.
    one = 1.0 + 2.0**-20
    a = torch.full((37,), one, device=device_type)
    c = torch.full((37,), -1.0, device=device_type)
    want = 2.0**-19 + 2.0**-40
    fused_add = torch.add(c, a, alpha=one)
    fused_mul = torch.addcmul(c, a, a)
    return bool(((fused_add == want) & (fused_mul == want)).all())


@functools.lru_cache(maxsize=16)
def _gaussian_kernel(ksize: int, sigma: float) -> tuple[float, ...]:
    """cv2.getGaussianKernel(ksize, sigma, CV_32F): the binomial taps for size 3 when sigma <= 0."""
    if sigma <= 0 and ksize == 3:
        return (0.25, 0.5, 0.25)
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    taps = [math.exp(-((i - (ksize - 1) / 2) ** 2) / (2 * sigma * sigma)) for i in range(ksize)]
    total = sum(taps)
    return tuple(float(np.float32(t / total)) for t in taps)


def _pad_reflect101(x: Tensor, dim: int, pad: int) -> Tensor:
    """Pad axis `dim` (2 or 3) of (B, C, H, W) by OpenCV's default border: 2 1 | 0 1 2 .. | L-2."""
    length = x.shape[dim]
    if pad == 0:
        return x
    if pad < length:
        return F.pad(x, (0, 0, pad, pad) if dim == 2 else (pad, pad, 0, 0), mode="reflect")
    idx = torch.arange(-pad, length + pad, device=x.device)  # wider pads fold repeatedly
    if length == 1:
        return x.index_select(dim, torch.zeros_like(idx))
    period = 2 * (length - 1)
    idx = idx.abs() % period
    return x.index_select(dim, torch.where(idx >= length, period - idx, idx))
