"""The Farneback flow update's pieces, each rounding as OpenCV's optflowgf.cpp does.

Per pyramid level, cv2.calcOpticalFlowFarneback samples the second image's expansion at the
displaced pixels, down-weights the equations near the edges, averages them over a window
(running sums in float64, or a Gaussian in float32) and solves a regularised 2x2 system per pixel
in float64. Near-singular systems turn any last-bit difference into visible flow, so every step
here keeps OpenCV's float32/float64 split and operation order. Tensors are channel-major planes
(C, N, h, w), which keeps each op a contiguous stream.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

# OpenCV down-weights the equations of the five pixels nearest each image edge (0 = the edge pixel).
_BORDER_WEIGHTS = (0.14, 0.14, 0.4472, 0.4472, 0.4472)
_DET_EPS = 1e-3  # OpenCV's regulariser of det(G) in the 2x2 solve


class Sampler:
    """R1 sampled bilinearly at x + d as OpenCV does: float32 weights and sums in its order.

    A table holds, per cell, R1 at its four corners (the first two channels negated, as they
    enter delta b), so one lookup per pixel fetches all of them.
    """

    def __init__(self, r1: Tensor):
        _, n, height, width = r1.shape
        like = dict(dtype=r1.dtype, device=r1.device)
        signs = torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0], **like).view(5, 1, 1, 1)
        table = r1.new_empty(4, 5, n, height - 1, width - 1)
        for corner, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            window = r1[..., dy : dy + height - 1, dx : dx + width - 1]
            torch.mul(window, signs, out=table[corner])
        self.table = table.view(20, -1)  # (corner x channel, cell)
        ys, xs = torch.meshgrid(
            torch.arange(height, **like), torch.arange(width, **like), indexing="ij"
        )
        self.grid = torch.stack([xs, ys]).unsqueeze(1)  # (2, 1, h, w) pixel positions x, y
        self.low = torch.zeros(2, 1, 1, 1, **like)
        self.high = torch.tensor([width - 2, height - 2], **like).view(2, 1, 1, 1)
        self.stride = width - 1
        cells = (height - 1) * (width - 1)
        self.offsets = torch.arange(n, device=r1.device).view(n, 1, 1) * cells

    def __call__(self, flow: Tensor, fallback: Tensor) -> Tensor:
        """Shape: flow (2, N, h, w), fallback (5, N, h, w) -> (5, N, h, w)."""
        _, n, height, width = flow.shape
        pos = flow + self.grid  # where each pixel lands in the second image
        cell = pos.floor()
        weights = flow.new_empty(2, 2, n, height, width)  # ((1 - fx, 1 - fy), (fx, fy))
        torch.sub(pos, cell, out=weights[1])
        torch.sub(1.0, weights[1], out=weights[0])
        clamped = torch.clamp(cell, self.low, self.high)
        inside = clamped == cell
        inside = inside[0] & inside[1]  # all four neighbours in the image
        # Cell indices are exact in float32 below 2^24 cells per image (4096 x 4096).
        index = (clamped[1] * self.stride + clamped[0]).long() + self.offsets
        corners = self.table.index_select(1, index.view(-1)).view(4, 5, n, height, width)
        # Corner (i, j) (row, column) weighs (1 - fy, fy)[i] (1 - fx, fx)[j].
        corner_weights = weights[None, :, 0] * weights[:, None, 1]  # (2, 2, N, h, w)
        corners.mul_(corner_weights.view(4, 1, n, height, width))
        total = corners[0] + corners[1]
        total += corners[2]
        total += corners[3]
        return torch.where(inside, total, fallback, out=total)


def apply_border(t: Tensor, border: Tensor) -> None:
    """Scale (..., h, w) in place by the (h, w) border weights, on the edge strips if possible."""
    height, width = border.shape
    edge = len(_BORDER_WEIGHTS)
    if height <= 2 * edge or width <= 2 * edge:
        t.mul_(border)
        return
    for rows, cols in (
        (slice(0, edge), slice(None)),
        (slice(height - edge, height), slice(None)),
        (slice(edge, height - edge), slice(0, edge)),
        (slice(edge, height - edge), slice(width - edge, width)),
    ):
        t[..., rows, cols].mul_(border[rows, cols])


def solve(sums: Tensor, dtype: torch.dtype) -> Tensor:
    """d = G^-1 h per pixel in float64, det(G) regularised by 1e-3 (paper eq. 13; OpenCV's solve).

    Shape: sums (5, N, h, w) channels (gxx, gyy, hx, hy, gxy) -> (2, N, h, w) in `dtype`.
    """
    gxx, gyy, hx, hy, gxy = sums.to(torch.float64)
    inv_det = 1.0 / (gyy * gxx - gxy * gxy + _DET_EPS)
    flow = torch.empty(2, *sums.shape[1:], dtype=dtype, device=sums.device)
    torch.mul(gyy * hx - gxy * hy, inv_det, out=flow[0])
    torch.mul(gxx * hy - gxy * hx, inv_det, out=flow[1])
    return flow


def box_window(m: Tensor, radius: int, winsize: int) -> Tensor:
    """Mean over the (2 radius + 1)^2 window, replicated borders, as OpenCV's running sums.

    OpenCV slides a float64 sum down the rows, adding each step's difference of two rows taken
    in the input precision (whose rounding we keep), then slides along the columns in float64,
    and divides by winsize^2.

    Shape: m (..., h, w) -> (..., h, w) float64.
    """
    wide = torch.float64
    first = (m.narrow(-2, 0, 1) * (radius + 2)).to(wide)  # OpenCV's start: row 0, radius + 2 times
    for y in range(1, radius):
        first += m.narrow(-2, min(y, m.shape[-2] - 1), 1)
    vsum = running_sums(m, -2, radius, first)
    first = vsum.narrow(-1, 0, 1) * (radius + 2)
    for x in range(1, radius):
        first += vsum.narrow(-1, min(x, m.shape[-1] - 1), 1)
    return running_sums(vsum, -1, radius, first).mul_(1.0 / (winsize * winsize))


def running_sums(x: Tensor, dim: int, radius: int, first: Tensor) -> Tensor:
    """Window sums along `dim` from the sum at -1 (`first`), in float64, in OpenCV's order.

    Entry i adds entry i + radius and drops entry i - radius - 1 (indices clamped to the axis),
    the difference taken in x's precision: ((first + step 0) + step 1) + ...

    Shape: x (..., L, ...), first: x with L = 1 -> x's shape, float64.
    """
    length = x.shape[dim]
    span = 2 * radius + 1
    steps = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    if length >= span:  # three runs: the first entry dropped, none clamped, the last one added
        head, inner = radius + 1, length - span
        torch.sub(x.narrow(dim, radius, head), x.narrow(dim, 0, 1), out=steps.narrow(dim, 0, head))
        if inner > 0:
            out = steps.narrow(dim, head, inner)
            torch.sub(x.narrow(dim, span, inner), x.narrow(dim, 0, inner), out=out)
        tail = steps.narrow(dim, length - radius, radius)
        torch.sub(x.narrow(dim, length - 1, 1), x.narrow(dim, inner, radius), out=tail)
    else:
        index = functools.partial(torch.tensor, device=x.device)
        add = index([min(i + radius, length - 1) for i in range(length)])
        drop = index([max(i - radius - 1, 0) for i in range(length)])
        steps.copy_(x.index_select(dim, add) - x.index_select(dim, drop))
    steps.narrow(dim, 0, 1).add_(first)
    return steps.cumsum_(dim)


def gaussian_window(m: Tensor, radius: int, taps: tuple[float, ...]) -> Tensor:
    """Separable Gaussian window over replicated borders, in the input precision.

    Shape: m (..., h, w) -> (..., h, w).
    """
    x = m
    for dim in (-2, -1):
        length = x.shape[dim]
        ends = (x.narrow(dim, 0, 1), x.narrow(dim, length - 1, 1))
        padded = torch.cat([ends[0]] * radius + [x] + [ends[1]] * radius, dim)
        out = padded.narrow(dim, radius, length) * taps[0]
        for i in range(1, radius + 1):
            pair = padded.narrow(dim, radius + i, length) + padded.narrow(dim, radius - i, length)
            out = out + pair * taps[i]
        x = out
    return x


@functools.lru_cache(maxsize=16)
def window_taps(radius: int) -> tuple[float, ...]:
    """OpenCV's Gaussian window taps 0..radius (sigma = 0.3 radius), rounded to float32."""
    sigma = radius * 0.3
    raw = [1.0] + [
        float(np.float32(math.exp(-(i * i) / (2 * sigma * sigma)))) for i in range(1, radius + 1)
    ]
    scale = 1.0 / (raw[0] + sum(2 * t for t in raw[1:]))
    return tuple(float(np.float32(t * scale)) for t in raw)


def border_weight(height: int, width: int, like: Tensor) -> Tensor:
    """OpenCV's per-pixel weight of the equations near the image edges. Shape: (h, w).

    The result may be a shared cached tensor: read it, never write it.
    """
    return _border_weight(height, width).to(dtype=like.dtype, device=like.device)


@functools.lru_cache(maxsize=64)
def _border_weight(height: int, width: int) -> Tensor:
    """`border_weight` as a float32 CPU tensor (float32 values, whatever dtype they end up in).

    The factors multiply in float32 in OpenCV's order (left, right, top, bottom). OpenCV tests
    "near an edge" as (unsigned)(x - 5) >= (unsigned)(w - 10), which most pixels of images
    narrower than 10 px fail; those keep weight 1, and we follow.
    """
    size = len(_BORDER_WEIGHTS)
    edge = [np.float32(v) for v in _BORDER_WEIGHTS]
    one = np.float32(1.0)

    def axis(length: int) -> tuple[list[np.float32], list[np.float32], list[bool]]:
        low = [edge[i] if i < size else one for i in range(length)]
        high = [edge[length - 1 - i] if i >= length - size else one for i in range(length)]
        near = [(i - size) % 2**32 >= (length - 2 * size) % 2**32 for i in range(length)]
        return low, high, near

    (top, bottom, near_y), (left, right, near_x) = axis(height), axis(width)
    across = [lo * hi for lo, hi in zip(left, right)]
    weight = (
        np.asarray(across, dtype=np.float32)[None, :] * np.asarray(top, dtype=np.float32)[:, None]
    ) * np.asarray(bottom, dtype=np.float32)[:, None]
    near = np.asarray(near_y)[:, None] | np.asarray(near_x)[None, :]
    weight = np.where(near, weight, np.float32(1.0)).astype(np.float32)
    return torch.from_numpy(weight)
