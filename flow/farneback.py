"""Farneback (2003) dense optical flow on batches of pairs, as cv2.calcOpticalFlowFarneback does.

G. Farneback, "Two-Frame Motion Estimation Based on Polynomial Expansion", SCIA 2003. Each image is
locally approximated by f(p) ~ p^T A p + b^T p + c (polynomial expansion: separable
Gaussian-weighted correlations). A displacement d between the frames satisfies
A d = -(b2 - b1) / 2 (eq. 7); averaging over a window and iterating over a pyramid gives the flow.
Each step follows OpenCV's optflowgf.cpp (level count, pre-smoothing, border weights, regularised
2x2 solve) and also its arithmetic: float32 operations in OpenCV's order, without fusing products
into sums where OpenCV does not and with fused multiply-adds where its vectorised filters use
them, and float64 where OpenCV accumulates in double (the horizontal expansion pass, the window
sums and the solve). That matters on real images: in flat, saturated or one-dimensional regions
the 2x2 systems are near-singular, the coefficients that should vanish keep rounding residues,
and the flow there follows those residues; on FlyingChairs an implementation that only agreed to
~1e-7 px elsewhere differed from OpenCV by up to 50 px in such regions (mean EPE off by 0.002 px
with OpenCV's tutorial parameters, 0.09 px with FarnebackOpticalFlow_create's). Agreement is to
the last bit on a CPU with FMA for images whose width is a multiple of 8 (the last columns of
other widths go through OpenCV's scalar code, which rounds differently). The work is elementwise
ops, shifted-slice sums, running sums and one gather of 20 values per pixel per iteration over
the whole batch, on any device; flow/_farneback_ops.py holds the per-level update's pieces and
flow/cvresize.py the OpenCV-exact pyramid and flow resizing. On a CPU, float32 work goes through
C kernels that repeat those operations bit for bit (flow/_farneback_native.py; ~5 CPU-ms per
224x224 pair against ~23 for the eager ops and ~7.7 for OpenCV), the eager ops staying the
fallback where no C compiler is found.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flow import _farneback_native as _native
from flow import _farneback_ops as _ops
from flow import cvresize
from flow.cpu_parallel import intra_op_threads, map_pairs
from flow.pairs import check_pair

OPTFLOW_FARNEBACK_GAUSSIAN = 256
_MIN_LEVEL_SIZE = 32  # OpenCV stops the pyramid before a level whose side would fall below this
_FLT_EPSILON = 1.1920929e-07
_CPU_CHUNK_PIXELS = 1 << 16  # pixels per pass on a CPU (one 224x224 or 256x256 pair)


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
    (squared coefficients overflow half precision) and floating ones cast back. On a CPU the
    pairs are spread over torch.get_num_threads() threads, each op running on one of them.
    """
    _check_pair(prev, nxt)
    out_dtype = prev.dtype if prev.is_floating_point() else torch.float32
    work = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    height, width = prev.shape[1:]

    def run(p: Tensor, q: Tensor) -> Tensor:
        with torch.inference_mode():  # no autograd bookkeeping; thread-local, so per call
            return _farneback_batch(p.to(work), q.to(work), params)

    if prev.device.type != "cpu":
        return run(prev, nxt).to(out_dtype).clone(memory_format=torch.contiguous_format)
    # The C kernels release the GIL, so the pairs' threads scale; their speed per pair hardly
    # depends on the chunk (within 5% from 1 to 8 pairs at 224x224). For the eager ops: every
    # op streams its operands through the caches, so one pair per pass keeps them there
    # (two at 224x224 ran ~4% slower per pair, four ~30%). The ops are short, and their OpenMP
    # barriers cost more than a second thread brings, ruinously on shared cores (10x slower on
    # a busy 2-core box), so each op runs on one thread and the pairs are spread over threads,
    # as OpenCV's are. The copy out stays single-threaded too: a 2-thread op leaves its second
    # thread spinning into the next call.
    flow = map_pairs(run, prev, nxt, max_chunk=max(1, _CPU_CHUNK_PIXELS // (height * width)))
    with intra_op_threads(1):
        return flow.to(out_dtype).clone(memory_format=torch.contiguous_format)


def _farneback_batch(prev: Tensor, nxt: Tensor, params: FarnebackParams) -> Tensor:
    """The whole pyramid for one batch. Shape: prev, nxt (N, H, W) -> (N, H, W, 2)."""
    images = torch.cat([prev, nxt]).unsqueeze(1)  # (2N, 1, H, W): both frames share each op
    n, (height, width) = prev.shape[0], prev.shape[1:]
    resample = _native if _native.resampling_available(images) else cvresize
    flow = None
    for k in range(_level_count(height, width, params), -1, -1):
        scale = 1.0
        for _ in range(k):  # repeated products, not pyr_scale**k, to round exactly as OpenCV does
            scale *= params.pyr_scale
        size = (round(height * scale), round(width * scale))  # cvRound: half to even, like round()
        level = resample.pyramid_level(images, scale, size)[:, 0]  # (2N, h, w)
        coeffs = _expand(level, params.poly_n, params.poly_sigma)  # (5, 2N, h, w)
        if flow is None:
            flow = coeffs.new_zeros(2, n, *size)  # (2, N, h, w)
        else:
            flow = resample.resize_flow(flow, size)
            flow.mul_(1.0 / params.pyr_scale)  # a product by 1 / scale, which rounds as OpenCV's
        flow = _refine(coeffs[:, :n], coeffs[:, n:], flow, params)
    return flow.permute(1, 2, 3, 0)  # (N, H, W, 2) view


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
    return _expand(img, poly_n, poly_sigma).transpose(0, 1)[:, [0, 1, 2, 4, 3]]


def _expand(img: Tensor, n: int, sigma: float) -> Tensor:
    """`polynomial_expansion` in the layout the flow updates read, with OpenCV's rounding.

    The vertical pass runs in the input's precision and the horizontal one accumulates in
    float64, with OpenCV's operation order and its float32 products where it takes them: in flat
    or one-dimensional regions the coefficients that should be zero keep rounding residues, and
    the flow there is decided by them.

    Shape:
        img (B, H, W) -> (5, B, H, W) channels (rx, ry, rxx, rxy, ryy), img's dtype.
    """
    kernels = _poly_kernels(n, sigma, img.dtype != torch.float64)
    if _native.available(img):
        return _native.expand(img, kernels)
    g, xg, xxg, ig11, ig03, ig33, ig55 = kernels
    batch, height, width = img.shape
    wide = torch.float64
    src = _pad_replicate(img.unsqueeze(1), 0, n)[:, 0]  # (B, H + 2n, W)
    # Vertical pass: per column, the moments under weights g, y g and y^2 g, pairing the rows at
    # +-k since the weights are even or odd; products and sums stay separate operations (a fused
    # multiply-add rounds differently from OpenCV's code). The result lands in the middle of a
    # buffer that also holds the horizontal pass's replicated borders.
    mom = img.new_empty(3, batch, height, width + 2 * n)  # (3, B, H, W + 2n)
    centre = mom[..., n : n + width]
    torch.mul(src[:, n : n + height], g[0], out=centre[0])
    centre[1:].zero_()
    terms = img.new_empty(3, batch, height, width)  # (p, d, p) with p = up + down, d = down - up
    for k in range(1, n + 1):
        up, down = src[:, n - k : n - k + height], src[:, n + k : n + k + height]
        torch.add(up, down, out=terms[0])
        torch.sub(down, up, out=terms[1])
        terms[2].copy_(terms[0])
        terms.mul_(img.new_tensor([g[k], xg[k], xxg[k]]).view(3, 1, 1, 1))
        centre.add_(terms)
    mom[..., :n] = mom[..., n : n + 1]
    mom[..., n + width :] = mom[..., n + width - 1 : n + width]
    # Horizontal pass into float64 sums b1..b6 (weights 1, x, y, x^2, y^2, xy), kept in the order
    # (b4, b1, b3, b5, b2, b6). OpenCV multiplies the even moment of the first channel in
    # float64 and rounds the other products to the input precision before summing them.
    sums = torch.empty(6, batch, height, width, dtype=wide, device=img.device)
    sums[1:4] = centre * g[0]  # b1, b3, b5: float32 products
    sums[0].zero_()
    sums[4:].zero_()
    pd = img.new_empty(5, batch, height, width)  # pairs and differences (s0, s1, s2, d0, d1)
    for k in range(1, n + 1):
        left, right = mom[..., n - k : n - k + width], mom[..., n + k : n + k + width]
        torch.add(right, left, out=pd[:3])
        torch.sub(right[:2], left[:2], out=pd[3:])
        # Products rounded to the input precision, then summed in float64: b3, b5, b2, b6.
        sums[2:].add_(pd[1:] * img.new_tensor([g[k], g[k], xg[k], xg[k]]).view(4, 1, 1, 1))
        # Products of two float32 numbers are exact in float64, so fusing them into the sums
        # rounds as OpenCV's separate product and sum do: b4, b1.
        sums[:2].addcmul_(pd[0], sums.new_tensor([xxg[k], g[k]]).view(2, 1, 1, 1))
    b4, b1, b3, b5, b2, b6 = sums
    out = img.new_empty(5, batch, height, width)
    torch.mul(b2, ig11, out=out[0])  # rx
    torch.mul(b3, ig11, out=out[1])  # ry
    constant = b1 * ig03
    torch.add(constant, b4 * ig33, out=out[2])  # rxx
    torch.mul(b6, ig55, out=out[3])  # rxy
    torch.add(constant, b5 * ig33, out=out[4])  # ryy
    return out


def _refine(r0: Tensor, r1: Tensor, flow: Tensor, params: FarnebackParams) -> Tensor:
    """`iterations` displacement updates at one level (OpenCV's UpdateMatrices + UpdateFlow loop).

    Shape:
        r0, r1 (5, N, h, w) channels (rx, ry, rxx, rxy, ryy); flow (2, N, h, w) -> (2, N, h, w).
    """
    height, width = r0.shape[-2:]
    radius = params.winsize // 2
    taps = _ops.window_taps(radius) if params.flags & OPTFLOW_FARNEBACK_GAUSSIAN else None
    border = _ops.border_weight(height, width, flow)  # (h, w), 1 away from the edges
    if _native.available(flow):
        return _native.refine(r0, r1, flow, border, params.winsize, params.iterations, taps)
    like = dict(dtype=flow.dtype, device=flow.device)
    sample = _ops.Sampler(r1) if height > 1 and width > 1 else None  # else no pixel is inside
    # Where the displaced pixel's neighbours leave the image OpenCV uses A1 alone and b2 = 0:
    # these values in place of R1's samples give exactly that in the shared arithmetic below.
    fallback = r0 * torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], **like).view(5, 1, 1, 1)
    half = torch.tensor([0.5, 0.5, 0.5, 0.25, 0.5], **like).view(5, 1, 1, 1)  # A = mean; rxy / 2

    def update_matrices(flow: Tensor) -> Tensor:
        """G = A^T A and h = A^T delta b per pixel, with A = (A1(x) + A2(x + d)) / 2 and
        delta b = -(b2(x + d) - b1(x)) / 2 + A d (paper eqs. 9-10, 12-13).

        Shape: flow (2, N, h, w) -> (5, N, h, w) channels (gxx, gyy, hx, hy, gxy).
        """
        t = fallback.clone() if sample is None else sample(flow, fallback)  # (-rx, -ry, ...) of R1
        t.add_(r0).mul_(half)  # (bx, by, axx, axy, ayy), delta b before A d
        t[0:2] += t[3:5] * flow[1] + t[2:4] * flow[0]  # delta b += A d
        _ops.apply_border(t, border)
        m = torch.empty_like(t)
        sq = t[2:5] * t[2:5]  # axx^2, axy^2, ayy^2
        torch.add(sq[0::2], sq[1], out=m[0:2])  # gxx, gyy
        torch.add(t[2:4] * t[0], t[3:5] * t[1], out=m[2:4])  # hx, hy
        torch.mul(t[2] + t[4], t[3], out=m[4])  # gxy
        return m

    if taps is not None:
        window = lambda m: _ops.gaussian_window(m, radius, taps)  # noqa: E731
    else:
        window = lambda m: _ops.box_window(m, radius, params.winsize)  # noqa: E731
    m = update_matrices(flow)
    for i in range(params.iterations):
        flow = _ops.solve(window(m), flow.dtype)
        if i < params.iterations - 1:
            m = update_matrices(flow)
    return flow


def _pad_replicate(x: Tensor, pad_x: int, pad_y: int) -> Tensor:
    """Replicate-pad the last two axes of a (B, C, H, W) tensor."""
    if pad_x == 0 and pad_y == 0:
        return x
    return F.pad(x, (pad_x, pad_x, pad_y, pad_y), mode="replicate")


@functools.lru_cache(maxsize=16)
def _poly_kernels(n: int, sigma: float, single: bool = True) -> tuple[tuple[float, ...], ...]:
    """OpenCV's FarnebackPrepareGaussian: taps g, x g, x^2 g and inverse-Gram entries.

    Returns (g, xg, xxg, ig11, ig03, ig33, ig55) with the taps indexed 0..n (they are even or
    odd). With `single`, the taps and the products summed into the Gram matrix of the basis
    (1, x, y, x^2, y^2, xy) under g(x) g(y) are rounded to float32 as OpenCV does, so the
    coefficients round as OpenCV's; otherwise everything stays float64.
    """
    if sigma < _FLT_EPSILON:
        sigma = n * 0.3
    rnd = np.float32 if single else np.float64
    raw = [rnd(math.exp(-x * x / (2 * sigma * sigma))) for x in range(-n, n + 1)]
    scale = 1.0 / sum(float(v) for v in raw)
    g = [rnd(float(v) * scale) for v in raw]
    gram = np.zeros((6, 6))
    for y in range(-n, n + 1):
        for x in range(-n, n + 1):
            gg, fx, fy = g[y + n] * g[x + n], rnd(x), rnd(y)
            gram[0, 0] += gg
            gram[1, 1] += gg * fx * fx
            gram[3, 3] += gg * fx * fx * fx * fx
            gram[5, 5] += gg * fx * fx * fy * fy
    gram[2, 2] = gram[0, 3] = gram[0, 4] = gram[3, 0] = gram[4, 0] = gram[1, 1]
    gram[4, 4] = gram[3, 3]
    gram[3, 4] = gram[4, 3] = gram[5, 5]
    inv = _cholesky_inverse(gram.tolist())
    taps = [g[n + k] for k in range(n + 1)]
    return (
        tuple(float(t) for t in taps),
        tuple(float(rnd(k) * t) for k, t in enumerate(taps)),
        tuple(float(rnd(k * k) * t) for k, t in enumerate(taps)),
        inv[1][1],
        inv[0][3],
        inv[3][3],
        inv[5][5],
    )


def _cholesky_inverse(a: list[list[float]]) -> list[list[float]]:
    """Inverse of a symmetric positive-definite matrix, in the order of OpenCV's Cholesky solver.

    (LAPACK's or numpy's inverse differ in the last bits, which the flow can amplify.)
    """
    size = len(a)
    low = [row[:] for row in a]  # the factor L, with 1 / L[i][i] kept on the diagonal
    for i in range(size):
        for j in range(i):
            s = low[i][j]
            for k in range(j):
                s -= low[i][k] * low[j][k]
            low[i][j] = s * low[j][j]
        s = low[i][i]
        for k in range(i):
            s -= low[i][k] * low[i][k]
        low[i][i] = 1.0 / math.sqrt(s)
    out = [[float(i == j) for j in range(size)] for i in range(size)]
    for i in range(size):  # L y = I
        for j in range(size):
            s = out[i][j]
            for k in range(i):
                s -= low[i][k] * out[k][j]
            out[i][j] = s * low[i][i]
    for i in range(size - 1, -1, -1):  # L^T x = y
        for j in range(size):
            s = out[i][j]
            for k in range(size - 1, i, -1):
                s -= low[k][i] * out[k][j]
            out[i][j] = s * low[i][i]
    return out


def _level_count(height: int, width: int, params: FarnebackParams) -> int:
    """Levels above the full image, stopping before one with a side under 32 px, as OpenCV does."""
    scale = 1.0
    for k in range(params.levels):
        scale *= params.pyr_scale
        if width * scale < _MIN_LEVEL_SIZE or height * scale < _MIN_LEVEL_SIZE:
            return k
    return params.levels


def _check_pair(prev: Tensor, nxt: Tensor) -> None:
    check_pair(prev, nxt, "farneback")
    if prev.numel() == 0:
        raise ValueError(f"farneback got an empty batch or image, shape {tuple(prev.shape)}")
