"""Farneback (2003) dense optical flow on batches of pairs, as cv2.calcOpticalFlowFarneback does.

G. Farneback, "Two-Frame Motion Estimation Based on Polynomial Expansion", SCIA 2003. Each image is
locally approximated by f(p) ~ p^T A p + b^T p + c (polynomial expansion: separable
Gaussian-weighted correlations). A displacement d between the frames satisfies
A d = -(b2 - b1) / 2 (eq. 7); averaging over a window and iterating over a pyramid gives the flow.
Each step follows OpenCV's optflowgf.cpp (level count, pre-smoothing, border weights, regularised
2x2 solve), so the same parameters give the same flow up to float rounding. The work is
elementwise ops, shifted-slice sums and one grid_sample per iteration over the whole batch, on any
device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

OPTFLOW_FARNEBACK_GAUSSIAN = 256
_MIN_LEVEL_SIZE = 32  # OpenCV stops the pyramid before a level whose side would fall below this
# OpenCV down-weights the equations of the five pixels nearest each image edge (0 = the edge pixel).
_BORDER_WEIGHTS = (0.14, 0.14, 0.4472, 0.4472, 0.4472)
_DET_EPS = 1e-3  # OpenCV's regulariser of det(G) in the 2x2 solve
_FLT_EPSILON = 1.1920929e-07
_CPU_CHUNK_PIXELS = 1 << 17  # pixels per pass on a CPU (two 224x224 pairs)


@dataclass(frozen=True)
class FarnebackParams:
    """cv2.calcOpticalFlowFarneback's parameters; the defaults are the set of OpenCV's tutorial."""

    pyr_scale: float = 0.5  # image scale between pyramid levels, in (0, 1)
    levels: int = 3  # pyramid levels above the full image (fewer when a level would be < 32 px)
    winsize: int = 15  # averaging window side; larger = smoother and more robust to noise
    iterations: int = 3  # displacement updates per pyramid level
    poly_n: int = 5  # radius of the polynomial-expansion neighbourhood (OpenCV uses 5 or 7)
    poly_sigma: float = 1.2  # std of the expansion weights (OpenCV: 1.1 for poly_n 5, 1.5 for 7)
    flags: int = 0  # 256 = OPTFLOW_FARNEBACK_GAUSSIAN: Gaussian instead of box window

    def __post_init__(self):
        if not 0.0 < self.pyr_scale < 1.0:
            raise ValueError(f"pyr_scale must be in (0, 1), got {self.pyr_scale}")
        if self.levels < 0:
            raise ValueError(f"levels must be >= 0, got {self.levels}")
        if self.winsize < 1:
            raise ValueError(f"winsize must be >= 1, got {self.winsize}")
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.poly_n < 1:
            raise ValueError(f"poly_n must be >= 1, got {self.poly_n}")
        if self.poly_sigma < 0:
            raise ValueError(f"poly_sigma must be >= 0, got {self.poly_sigma}")
        if self.flags not in (0, OPTFLOW_FARNEBACK_GAUSSIAN):
            raise ValueError(
                f"flags must be 0 or 256 (OPTFLOW_FARNEBACK_GAUSSIAN), got {self.flags}"
            )


def farneback(prev: Tensor, nxt: Tensor, params: FarnebackParams = FarnebackParams()) -> Tensor:
    """Dense flow from `prev` to `nxt` for a batch of grey image pairs.

    Shape:
        prev, nxt (N, H, W) grey levels in [0, 255] -> (N, H, W, 2) pixels, 0 = dx (right),
        1 = dy (down).
    Device follows the input; float32 and float64 are kept, other dtypes are computed in float32
    (squared coefficients overflow half precision) and floating ones cast back. On a CPU shared
    with other busy processes, torch's spinning OpenMP threads can make this >5x slower; one
    thread (torch.set_num_threads(1)) or OMP_WAIT_POLICY=PASSIVE avoids that.
    """
    _check_pair(prev, nxt)
    out_dtype = prev.dtype if prev.is_floating_point() else torch.float32
    work = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    n, height, width = prev.shape
    # On a CPU every op streams its operands through the caches: a few pairs per pass keep them
    # there (a whole batch of 8 at 224x224 in one pass ran ~1.4x slower per pair than 2 at a time).
    chunk = n if prev.device.type != "cpu" else max(1, _CPU_CHUNK_PIXELS // (height * width))
    flows = [
        _farneback_batch(prev[i : i + chunk].to(work), nxt[i : i + chunk].to(work), params)
        for i in range(0, n, chunk)
    ]
    flow = flows[0] if len(flows) == 1 else torch.cat(flows)
    return flow.permute(0, 2, 3, 1).contiguous().to(out_dtype)


def _farneback_batch(prev: Tensor, nxt: Tensor, params: FarnebackParams) -> Tensor:
    """The whole pyramid for one batch. Shape: prev, nxt (N, H, W) -> (N, 2, H, W)."""
    images = torch.cat([prev, nxt]).unsqueeze(1)  # (2N, 1, H, W): both frames share each op
    n, (height, width) = prev.shape[0], prev.shape[1:]
    flow = None
    for k in range(_level_count(height, width, params), -1, -1):
        scale = 1.0
        for _ in range(k):  # repeated products, not pyr_scale**k, to round exactly as OpenCV does
            scale *= params.pyr_scale
        size = (round(height * scale), round(width * scale))  # cvRound: half to even, like round()
        coeffs = polynomial_expansion(
            _pyramid_level(images, scale, size)[:, 0], params.poly_n, params.poly_sigma
        )
        if flow is None:
            flow = coeffs.new_zeros(n, 2, *size)  # (N, 2, h, w)
        else:
            flow = F.interpolate(flow, size=size, mode="bilinear", align_corners=False)
            flow.mul_(1.0 / params.pyr_scale)  # a product by 1 / scale, which rounds as OpenCV's
        flow = _refine(coeffs[:n], coeffs[n:], flow, params)
    return flow


class Farneback:
    """A configured Farneback estimator; calling it runs `farneback` with its parameters."""

    def __init__(self, **params):
        self.params = FarnebackParams(**params)

    def __call__(self, prev: Tensor, nxt: Tensor) -> Tensor:
        return farneback(prev, nxt, self.params)

    def __repr__(self) -> str:
        return f"Farneback({', '.join(f'{k}={v}' for k, v in asdict(self.params).items())})"


def polynomial_expansion(img: Tensor, poly_n: int = 5, poly_sigma: float = 1.2) -> Tensor:
    """Per-pixel quadratic fit f(x0 + u, y0 + v) ~ c + rx u + ry v + rxx u^2 + ryy v^2 + rxy u v.

    The Gaussian-weighted least-squares fit of the paper (section 3) reduces to separable
    correlations recombined through the inverse Gram matrix (OpenCV's FarnebackPolyExp); borders
    are replicated. In the paper's notation A = [[rxx, rxy / 2], [rxy / 2, ryy]] and b = (rx, ry).

    Shape:
        img (N, H, W) -> (N, 5, H, W) channels (rx, ry, rxx, ryy, rxy).
    """
    g, xg, cg, ig11, ig33, ig55 = _poly_kernels(poly_n, poly_sigma)
    n = poly_n
    height, width = img.shape[-2:]
    # Vertical pass: per column, the moments under weights g, y g and (y^2 - m2) g, pairing the
    # rows at +-k since the weights are even or odd.
    src = _pad_replicate(img.unsqueeze(1), 0, n)[:, 0]  # (N, H + 2n, W)
    mom = src.new_empty(src.shape[0], 3, height, width)  # (N, 3, H, W)
    v0, v1, v2 = mom.unbind(1)
    centre = src[:, n : n + height]
    torch.mul(centre, g[n], out=v0)
    v1.zero_()
    torch.mul(centre, cg[n], out=v2)
    for k in range(1, n + 1):
        up, down = src[:, n - k : n - k + height], src[:, n + k : n + k + height]
        pair = up + down
        v0.add_(pair, alpha=g[n + k])
        v2.add_(pair, alpha=cg[n + k])
        v1.add_(down - up, alpha=xg[n + k])
    # Horizontal pass fused with the inverse Gram matrix, whose 1 - x^2 - y^2 block is folded into
    # the zero-sum weights cg. (Single-plane in-place updates beat stacked ones on the CPU.)
    mom = _pad_replicate(mom, n, 0)  # (N, 3, H, W + 2n)
    out = src.new_empty(src.shape[0], 5, height, width)
    rx, ry, rxx, ryy, rxy = out.unbind(1)
    c0, c1, c2 = mom[..., n : n + width].unbind(1)
    rx.zero_()
    rxy.zero_()
    torch.mul(c1, ig11 * g[n], out=ry)
    torch.mul(c0, ig33 * cg[n], out=rxx)
    torch.mul(c2, ig33 * g[n], out=ryy)
    for k in range(1, n + 1):
        left, right = mom[..., n - k : n - k + width], mom[..., n + k : n + k + width]
        pair = left + right  # (N, 3, H, W)
        diff = right[:, :2] - left[:, :2]
        rx.add_(diff[:, 0], alpha=ig11 * xg[n + k])
        ry.add_(pair[:, 1], alpha=ig11 * g[n + k])
        rxx.add_(pair[:, 0], alpha=ig33 * cg[n + k])
        ryy.add_(pair[:, 2], alpha=ig33 * g[n + k])
        rxy.add_(diff[:, 1], alpha=ig55 * xg[n + k])
    return out


def _refine(r0: Tensor, r1: Tensor, flow: Tensor, params: FarnebackParams) -> Tensor:
    """`iterations` displacement updates at one level (OpenCV's UpdateMatrices + UpdateFlow loop).

    Shape:
        r0, r1 (N, 5, h, w); flow (N, 2, h, w) -> (N, 2, h, w).
    """
    height, width = flow.shape[-2:]
    like = dict(dtype=flow.dtype, device=flow.device)
    # Halve once per level the coefficients that enter A and delta b as means or halves (paper
    # eqs. 9-10); A's off-diagonal entry is half of rxy.
    half = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.25], **like).view(1, 5, 1, 1)
    r0h, r1h = r0 * half, r1 * half
    fallback = r0h.clone()  # where x + d leaves the image OpenCV uses A1 alone and b2 = 0
    fallback[:, :2] = 0
    ys, xs = torch.arange(height, **like), torch.arange(width, **like)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy")).unsqueeze(0)  # (1, 2, h, w) x, y
    top = torch.tensor([width - 1, height - 1], **like).view(1, 2, 1, 1)
    span = torch.tensor([max(width - 1, 1), max(height - 1, 1)], **like).view(1, 2, 1, 1)
    weight2 = _border_weight(height, width, flow) ** 2  # (h, w)
    radius = params.winsize // 2
    if params.flags & OPTFLOW_FARNEBACK_GAUSSIAN:
        sigma = radius * 0.3
        taps = [math.exp(-(i * i) / (2 * sigma * sigma)) if i else 1.0 for i in range(radius + 1)]
        total = taps[0] + 2 * sum(taps[1:])
        taps, eps = [t / total for t in taps], _DET_EPS
    else:
        # Plain window sums; OpenCV's 1 / winsize^2 normalisation only rescales the regulariser.
        taps, eps = None, _DET_EPS * float(params.winsize) ** 4
    # M lives in the centre of a replicate-padded buffer so the window sums need no extra copy.
    m_pad = flow.new_empty(flow.shape[0], 5, height + 2 * radius, width + 2 * radius)
    m = m_pad[..., radius : radius + height, radius : radius + width]  # (gxx, gyy, hx, hy, gxy)

    def update_matrices(flow: Tensor) -> None:
        """G = A^T A and h = A^T delta b per pixel into m, with A = (A1(x) + A2(x + d)) / 2 and
        delta b = -(b2(x + d) - b1(x)) / 2 + A d (paper eqs. 9-10, 12-13)."""
        pos = flow + base  # (N, 2, h, w) where each pixel lands in the second image
        # OpenCV samples R1 bilinearly only where all four neighbours are inside.
        ok = (pos >= 0) & (pos < top)
        inside = (ok[:, 0] & ok[:, 1]).unsqueeze(1)  # (N, 1, h, w)
        # grid_sample's [-1, 1] coordinates, computed as pos / span * 2 - 1: a precomputed
        # 2 / span or offset grid rounds worse and shifts the samples by up to ~1e-5 px.
        grid = (pos / span).mul_(2).sub_(1).permute(0, 2, 3, 1)  # (N, h, w, 2)
        r1w = F.grid_sample(r1h, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        t = torch.where(inside, r1w, fallback)  # (N, 5, h, w) -> (db, A) in place
        torch.sub(r0h[:, :2], t[:, :2], out=t[:, :2])
        t[:, 2:].add_(r0h[:, 2:])
        dbx, dby, axx, ayy, axy = t.unbind(1)
        dx, dy = flow.unbind(1)
        bx = torch.addcmul(dbx, axx, dx).addcmul_(axy, dy)  # delta b = db + A d
        by = torch.addcmul(dby, ayy, dy).addcmul_(axy, dx)
        gxx, gyy, hx, hy, gxy = m.unbind(1)
        off2 = axy * axy
        torch.addcmul(off2, axx, axx, out=gxx)
        torch.addcmul(off2, ayy, ayy, out=gyy)
        torch.mul(axx, bx, out=hx).addcmul_(axy, by)
        torch.mul(ayy, by, out=hy).addcmul_(axy, bx)
        torch.add(axx, ayy, out=gxy).mul_(axy)
        m.mul_(weight2)
        _fill_replicate_border(m_pad, radius)

    update_matrices(flow)
    for i in range(params.iterations):
        gxx, gyy, hx, hy, gxy = _window_sum(m_pad, radius, taps).unbind(1)
        det = (gxx * gyy).addcmul_(gxy, gxy, value=-1).add_(eps)
        # d = G^-1 h, the least-squares solution of the windowed equations (paper eq. 13).
        flow = torch.empty_like(flow)
        torch.mul(gyy, hx, out=flow[:, 0]).addcmul_(gxy, hy, value=-1).div_(det)
        torch.mul(gxx, hy, out=flow[:, 1]).addcmul_(gxy, hx, value=-1).div_(det)
        if i < params.iterations - 1:
            update_matrices(flow)
    return flow


def _fill_replicate_border(x: Tensor, pad: int) -> None:
    """Fill the `pad`-wide frame of (N, C, H, W) in place by replicating the centre's edges."""
    if pad == 0:
        return
    x[..., :pad, pad:-pad] = x[..., pad : pad + 1, pad:-pad]
    x[..., -pad:, pad:-pad] = x[..., -pad - 1 : -pad, pad:-pad]
    x[..., :pad] = x[..., pad : pad + 1]
    x[..., -pad:] = x[..., -pad - 1 : -pad]


def _window_sum(xp: Tensor, radius: int, taps: list[float] | None) -> Tensor:
    """Separable (2 radius + 1)^2 window over a tensor padded by `radius` on each side.

    taps None is a plain box sum (binary doubling: about 2 log2(size) additions per axis);
    otherwise symmetric 1-D weights taps[0..radius].

    Shape:
        xp (N, C, h + 2 radius, w + 2 radius) -> (N, C, h, w).
    """
    x = xp
    for dim in (2, 3):
        size = x.shape[dim] - 2 * radius
        if taps is None:
            x = _box_sum(x, 2 * radius + 1, dim, size)
        else:
            out = x.narrow(dim, radius, size) * taps[0]
            for i in range(1, radius + 1):
                out.add_(
                    x.narrow(dim, radius - i, size) + x.narrow(dim, radius + i, size), alpha=taps[i]
                )
            x = out
    return x


def _box_sum(x: Tensor, length: int, dim: int, size: int) -> Tensor:
    """Sums of `length` consecutive entries along `dim` (x has size + length - 1 entries there)."""
    if length == 1:
        return x.clone()
    parts, offset, span = [], 0, 1
    block = x  # block[i] = sum of `span` consecutive entries from i
    while span <= length:
        if length & span:
            parts.append(block.narrow(dim, offset, size))
            offset += span
        if span * 2 <= length:
            cut = block.shape[dim] - span
            block = block.narrow(dim, 0, cut) + block.narrow(dim, span, cut)
        span *= 2
    out = parts[0] + parts[1] if len(parts) > 1 else parts[0].clone()
    for part in parts[2:]:
        out.add_(part)
    return out


def _pyramid_level(images: Tensor, scale: float, size: tuple[int, int]) -> Tensor:
    """OpenCV's pyramid level: Gaussian pre-smoothing of the full image, then bilinear resize.

    Shape:
        images (B, 1, H, W) -> (B, 1, h, w).
    """
    sigma = (1.0 / scale - 1.0) * 0.5
    ksize = max(round(sigma * 5) | 1, 3)
    taps = _gaussian_kernel(ksize, sigma)
    radius = ksize // 2
    blurred = images
    for dim in (2, 3):
        length = blurred.shape[dim]
        padded = _pad_reflect101(blurred, dim, radius)
        blurred = padded.narrow(dim, radius, length) * taps[radius]
        for i in range(1, radius + 1):
            pair = padded.narrow(dim, radius - i, length) + padded.narrow(dim, radius + i, length)
            blurred.add_(pair, alpha=taps[radius + i])
    if tuple(blurred.shape[-2:]) == size:
        return blurred
    return F.interpolate(blurred, size=size, mode="bilinear", align_corners=False, antialias=False)


def _gaussian_kernel(ksize: int, sigma: float) -> list[float]:
    """cv2.getGaussianKernel: the fixed binomial taps for size 3 when sigma <= 0."""
    if sigma <= 0 and ksize == 3:
        return [0.25, 0.5, 0.25]
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    taps = [math.exp(-((i - (ksize - 1) / 2) ** 2) / (2 * sigma * sigma)) for i in range(ksize)]
    total = sum(taps)
    return [t / total for t in taps]


def _pad_reflect101(x: Tensor, dim: int, pad: int) -> Tensor:
    """Pad axis `dim` (2 or 3) of (B, C, H, W) by OpenCV's default border: 2 1 | 0 1 2 .. | L-2."""
    length = x.shape[dim]
    if pad == 0:
        return x
    if pad < length:
        return F.pad(x, (0, 0, pad, pad) if dim == 2 else (pad, pad, 0, 0), mode="reflect")
    idx = torch.arange(
        -pad, length + pad, device=x.device
    )  # pads wider than the image fold repeatedly
    if length == 1:
        return x.index_select(dim, torch.zeros_like(idx))
    period = 2 * (length - 1)
    idx = idx.abs() % period
    return x.index_select(dim, torch.where(idx >= length, period - idx, idx))


def _pad_replicate(x: Tensor, pad_x: int, pad_y: int) -> Tensor:
    """Replicate-pad the last two axes of a (B, C, H, W) tensor."""
    if pad_x == 0 and pad_y == 0:
        return x
    return F.pad(x, (pad_x, pad_x, pad_y, pad_y), mode="replicate")


@functools.lru_cache(maxsize=16)
def _poly_kernels(
    n: int, sigma: float
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...], float, float, float]:
    """OpenCV's FarnebackPrepareGaussian: 1-D taps g, x g, (x^2 - m2) g and inverse-Gram entries.

    m2 = sum x^2 g. The Gram matrix of the basis (1, x, y, x^2, y^2, xy) under g(x) g(y) has
    inverse entries ig03 = -m2 ig33 and ig34 = 0, so the x^2 coefficient is
    ig33 sum (x^2 - m2) g(x) g(y) f: zero-sum weights, free of the cancellation between the
    1 and x^2 terms in flat regions.
    """
    if sigma < _FLT_EPSILON:
        sigma = n * 0.3
    xs = range(-n, n + 1)
    g = [math.exp(-x * x / (2 * sigma * sigma)) for x in xs]
    total = sum(g)
    g = [v / total for v in g]
    m2 = sum(x * x * v for x, v in zip(xs, g))
    m4 = sum(x**4 * v for x, v in zip(xs, g))
    gram = torch.zeros(6, 6, dtype=torch.float64)
    gram[0, 0] = 1.0
    gram[1, 1] = gram[2, 2] = gram[0, 3] = gram[3, 0] = gram[0, 4] = gram[4, 0] = m2
    gram[3, 3] = gram[4, 4] = m4
    gram[3, 4] = gram[4, 3] = gram[5, 5] = m2 * m2
    inv = torch.linalg.inv(gram)
    xg = tuple(x * v for x, v in zip(xs, g))
    cg = tuple((x * x - m2) * v for x, v in zip(xs, g))
    return tuple(g), xg, cg, float(inv[1, 1]), float(inv[3, 3]), float(inv[5, 5])


def _border_weight(height: int, width: int, like: Tensor) -> Tensor:
    """OpenCV's per-pixel weight of the equations near the image edges. Shape: (h, w).

    OpenCV tests "near an edge" as (unsigned)(x - 5) >= (unsigned)(w - 10), which most pixels of
    images narrower than 10 px fail; those keep weight 1, and we follow.
    """
    size = len(_BORDER_WEIGHTS)

    def axis(length: int) -> tuple[list[float], list[bool]]:
        w = [1.0] * length
        for i, value in enumerate(_BORDER_WEIGHTS[: min(size, length)]):
            w[i] *= value
            w[length - 1 - i] *= value
        near = [(i - size) % 2**32 >= (length - 2 * size) % 2**32 for i in range(length)]
        return w, near

    (wy, near_y), (wx, near_x) = axis(height), axis(width)
    weight = (
        torch.tensor(wy, dtype=torch.float64)[:, None]
        * torch.tensor(wx, dtype=torch.float64)[None, :]
    )
    near = torch.tensor(near_y)[:, None] | torch.tensor(near_x)[None, :]
    return torch.where(near, weight, 1.0).to(dtype=like.dtype, device=like.device)


def _level_count(height: int, width: int, params: FarnebackParams) -> int:
    """Levels above the full image, stopping before one with a side under 32 px, as OpenCV does."""
    scale = 1.0
    for k in range(params.levels):
        scale *= params.pyr_scale
        if width * scale < _MIN_LEVEL_SIZE or height * scale < _MIN_LEVEL_SIZE:
            return k
    return params.levels


def _check_pair(prev: Tensor, nxt: Tensor) -> None:
    if not isinstance(prev, Tensor) or not isinstance(nxt, Tensor):
        raise ValueError("farneback expects torch tensors; use flow.estimate for numpy arrays")
    if prev.ndim != 3:
        raise ValueError(f"farneback expects (N, H, W) grey images, got shape {tuple(prev.shape)}")
    if prev.shape != nxt.shape:
        raise ValueError(f"prev and nxt differ in shape: {tuple(prev.shape)} vs {tuple(nxt.shape)}")
    if prev.device != nxt.device:
        raise ValueError(f"prev and nxt are on different devices: {prev.device} vs {nxt.device}")
    if prev.numel() == 0:
        raise ValueError(f"farneback got an empty batch or image, shape {tuple(prev.shape)}")
