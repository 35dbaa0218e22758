"""Farneback (2003) dense optical flow, batched over pairs, as OpenCV's calcOpticalFlowFarneback computes it.

G. Farneback, "Two-Frame Motion Estimation Based on Polynomial Expansion", SCIA 2003. Each image is
locally approximated by f(p) ~ p^T A p + b^T p + c (polynomial expansion, separable Gaussian-weighted
convolutions). For a displacement d, A1 d = -(b2 - b1) / 2 (eq. 7); averaging the equation over a
window and iterating over a pyramid gives the flow. Every step follows OpenCV's optflowgf.cpp (level
count, pre-smoothing, border weights, regularised 2x2 solve), so the same parameters give the same
flow up to float rounding.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class FarnebackParams:
    """cv2.calcOpticalFlowFarneback's parameters; defaults are the set OpenCV's own samples use."""

    pyr_scale: float = 0.5  # image scale between pyramid levels, in (0, 1)
    levels: int = 3  # pyramid levels above the full image (fewer when a level would be < 32 px)
    winsize: int = 15  # averaging window (box, or Gaussian with flags=256); larger = smoother, more robust
    iterations: int = 3  # displacement updates per pyramid level
    poly_n: int = 5  # radius of the polynomial-expansion neighbourhood (OpenCV uses 5 or 7)
    poly_sigma: float = 1.2  # Gaussian std of the expansion weights (1.1 for poly_n=5, 1.5 for 7)
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
            raise ValueError(f"flags must be 0 or 256 (OPTFLOW_FARNEBACK_GAUSSIAN), got {self.flags}")


def farneback(prev: Tensor, nxt: Tensor, params: FarnebackParams = FarnebackParams()) -> Tensor:
    """Dense flow from `prev` to `nxt` for a batch of grey image pairs.

    Shape:
        prev, nxt (N, H, W) grey levels in [0, 255] -> (N, H, W, 2) pixels, 0 = dx (right), 1 = dy (down).
    Device follows the input; floating dtypes are kept (half precision is computed in float32, whose
    range the squared coefficients need), integer images give float32.
    """
    _check_pair(prev, nxt)
    out_dtype = prev.dtype if prev.is_floating_point() else torch.float32
    work = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
    images = torch.cat([prev, nxt]).to(work).unsqueeze(1)  # (2N, 1, H, W): both frames share each op
    n, (height, width) = prev.shape[0], prev.shape[1:]
    levels = _level_count(height, width, params)
    flow = None
    for k in range(levels, -1, -1):
        scale = params.pyr_scale**k
        size = (round(height * scale), round(width * scale))  # cvRound: half to even, like round()
        level = _pyramid_level(images, scale, size)
        coeffs = polynomial_expansion(level.squeeze(1), params.poly_n, params.poly_sigma)
        r0, r1 = coeffs[:n], coeffs[n:]
        if flow is None:
            flow = r0.new_zeros(n, 2, *size)  # (N, 2, h, w)
        else:
            flow = F.interpolate(flow, size=size, mode="bilinear", align_corners=False) / params.pyr_scale
        flow = _refine(r0, r1, flow, params)
    return flow.permute(0, 2, 3, 1).contiguous().to(out_dtype)


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

    The Gaussian-weighted least-squares fit of the paper (section 3) reduces to six separable
    correlations, recombined through the inverse Gram matrix; image borders are replicated.
    In the paper's notation A = [[rxx, rxy / 2], [rxy / 2, ryy]] and b = (rx, ry).

    Shape:
        img (N, H, W) -> (N, 5, H, W) channels (rx, ry, rxx, ryy, rxy).
    """
    g, xg, xxg, ig11, ig03, ig33, ig55 = _poly_kernels(poly_n, poly_sigma)
    taps = lambda k: torch.tensor(k, dtype=img.dtype, device=img.device)  # noqa: E731
    g, xg, xxg = taps(g), taps(xg), taps(xxg)
    size = 2 * poly_n + 1
    # Vertical pass: zeroth, first and second moments along y.
    vert = torch.stack([g, xg, xxg]).view(3, 1, size, 1)
    cols = F.conv2d(_pad_replicate(img.unsqueeze(1), 0, poly_n), vert)  # (N, 3, H, W)
    # Horizontal pass fused with the inverse Gram matrix: output channel <- sum over the 3 moments.
    zero = torch.zeros_like(g)
    horiz = torch.stack(
        [
            torch.stack([ig11 * xg, zero, zero]),  # rx  <- x-moment of the y-average
            torch.stack([zero, ig11 * g, zero]),  # ry  <- y-moment
            torch.stack([ig03 * g + ig33 * xxg, zero, zero]),  # rxx <- 1 and x^2 moments
            torch.stack([ig03 * g, zero, ig33 * g]),  # ryy <- 1 and y^2 moments
            torch.stack([zero, ig55 * xg, zero]),  # rxy <- xy moment
        ]
    ).view(5, 3, 1, size)
    return F.conv2d(_pad_replicate(cols, poly_n, 0), horiz)


def _refine(r0: Tensor, r1: Tensor, flow: Tensor, params: FarnebackParams) -> Tensor:
    """`iterations` displacement updates at one level (OpenCV's UpdateMatrices + UpdateFlow loop).

    Shape:
        r0, r1 (N, 5, h, w); flow (N, 2, h, w) -> (N, 2, h, w).
    """
    height, width = flow.shape[-2:]
    weight2 = _border_weight(height, width, flow) ** 2  # (h, w), scales the quadratic terms of M
    radius = params.winsize // 2
    if params.flags & OPTFLOW_FARNEBACK_GAUSSIAN:
        sigma = radius * 0.3
        taps = [math.exp(-(i * i) / (2 * sigma * sigma)) if i else 1.0 for i in range(-radius, radius + 1)]
        total = sum(taps)
        window = [t / total for t in taps]
    else:
        # OpenCV sums a (2 * radius + 1) box and divides by winsize^2 (equal unless winsize is even).
        window = [1.0 / params.winsize] * (2 * radius + 1)
    window = torch.tensor(window, dtype=flow.dtype, device=flow.device)
    grid = _base_grid(height, width, flow)
    m = _update_matrices(r0, r1, flow, grid, weight2)
    for i in range(params.iterations):
        g = _blur(m, window)
        gxx, gxy, gyy, hx, hy = g.unbind(1)
        idet = 1.0 / (gxx * gyy - gxy * gxy + _DET_EPS)
        # Least-squares d = G^-1 h of the windowed equations A d = delta b (paper eq. 13).
        flow = torch.stack([(gyy * hx - gxy * hy) * idet, (gxx * hy - gxy * hx) * idet], 1)
        if i < params.iterations - 1:
            m = _update_matrices(r0, r1, flow, grid, weight2)
    return flow


def _update_matrices(r0: Tensor, r1: Tensor, flow: Tensor, grid: Tensor, weight2: Tensor) -> Tensor:
    """The windowable terms (G = A^T A, h = A^T delta b) of each pixel's equation A d = delta b.

    With the current flow d~, A = (A1(x) + A2(x + d~)) / 2 and delta b = -(b2(x + d~) - b1(x)) / 2 + A d~
    (paper eqs. 9-10). Where x + d~ leaves the image (bilinear corners not all inside), OpenCV
    uses A1 alone and b2 = 0.

    Shape:
        r0, r1 (N, 5, h, w); flow (N, 2, h, w); grid (1, h, w, 2); weight2 (h, w) -> (N, 5, h, w).
    """
    height, width = flow.shape[-2:]
    pos = grid + flow.permute(0, 2, 3, 1)  # (N, h, w, 2) pixel coordinates of x + d~
    corner = pos.floor()
    valid = (corner[..., 0] >= 0) & (corner[..., 0] < width - 1) & (corner[..., 1] >= 0) & (corner[..., 1] < height - 1)
    norm = pos / torch.tensor([max(width - 1, 1), max(height - 1, 1)], dtype=pos.dtype, device=pos.device) * 2 - 1
    r1w = F.grid_sample(r1, norm, mode="bilinear", padding_mode="zeros", align_corners=True)  # (N, 5, h, w)
    valid = valid.unsqueeze(1)
    b2 = torch.where(valid, r1w[:, :2], 0.0)
    a2 = torch.where(valid, r1w[:, 2:], r0[:, 2:])
    a = (r0[:, 2:] + a2) * torch.tensor([0.5, 0.5, 0.25], dtype=r0.dtype, device=r0.device).view(1, 3, 1, 1)
    axx, ayy, axy = a.unbind(1)  # axy is A's off-diagonal entry, half the rxy coefficient
    dx, dy = flow.unbind(1)
    db = (r0[:, :2] - b2) * 0.5
    bx = db[:, 0] + axx * dx + axy * dy
    by = db[:, 1] + axy * dx + ayy * dy
    terms = torch.stack(
        [axx * axx + axy * axy, (axx + ayy) * axy, ayy * ayy + axy * axy, axx * bx + axy * by, axy * bx + ayy * by], 1
    )
    return terms * weight2


def _blur(m: Tensor, window: Tensor) -> Tensor:
    """Separable window sum of each channel with replicated borders. Shape: (N, C, h, w) -> same."""
    n, c, height, width = m.shape
    radius = (window.numel() - 1) // 2
    flat = m.reshape(n * c, 1, height, width)
    flat = F.conv2d(_pad_replicate(flat, 0, radius), window.view(1, 1, -1, 1))
    flat = F.conv2d(_pad_replicate(flat, radius, 0), window.view(1, 1, 1, -1))
    return flat.view(n, c, height, width)


def _pyramid_level(images: Tensor, scale: float, size: tuple[int, int]) -> Tensor:
    """OpenCV's pyramid level: Gaussian pre-smoothing of the full image, then bilinear resize.

    Shape:
        images (B, 1, H, W) -> (B, 1, h, w).
    """
    sigma = (1.0 / scale - 1.0) * 0.5
    ksize = max(round(sigma * 5) | 1, 3)
    kernel = torch.tensor(_gaussian_kernel(ksize, sigma), dtype=images.dtype, device=images.device)
    blurred = _gaussian_blur_reflect101(images, kernel)
    if tuple(blurred.shape[-2:]) == size:
        return blurred
    return F.interpolate(blurred, size=size, mode="bilinear", align_corners=False, antialias=False)


def _gaussian_kernel(ksize: int, sigma: float) -> list[float]:
    """cv2.getGaussianKernel: fixed binomial taps for small sizes when sigma <= 0."""
    if sigma <= 0 and ksize == 3:
        return [0.25, 0.5, 0.25]
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    taps = [math.exp(-((i - (ksize - 1) / 2) ** 2) / (2 * sigma * sigma)) for i in range(ksize)]
    total = sum(taps)
    return [t / total for t in taps]


def _gaussian_blur_reflect101(images: Tensor, kernel: Tensor) -> Tensor:
    """Separable blur with OpenCV's default border (reflect without repeating the edge), any size."""
    radius = (kernel.numel() - 1) // 2
    height, width = images.shape[-2:]
    rows = _reflect101_index(height, radius, images.device)
    cols = _reflect101_index(width, radius, images.device)
    out = F.conv2d(images.index_select(2, rows), kernel.view(1, 1, -1, 1))
    return F.conv2d(out.index_select(3, cols), kernel.view(1, 1, 1, -1))


def _reflect101_index(length: int, radius: int, device: torch.device) -> Tensor:
    """Source indices of a reflect-101 padded axis: ... 2 1 | 0 1 2 ... L-1 | L-2 L-3 ..."""
    idx = torch.arange(-radius, length + radius, device=device)
    if length == 1:
        return torch.zeros_like(idx)
    period = 2 * (length - 1)
    idx = idx.abs() % period
    return torch.where(idx >= length, period - idx, idx)


def _pad_replicate(x: Tensor, pad_x: int, pad_y: int) -> Tensor:
    """Replicate-pad the last two axes of a (B, C, H, W) tensor; any pad, any size."""
    if pad_x == 0 and pad_y == 0:
        return x
    height, width = x.shape[-2:]
    if pad_y:
        rows = torch.arange(-pad_y, height + pad_y, device=x.device).clamp(0, height - 1)
        x = x.index_select(2, rows)
    if pad_x:
        cols = torch.arange(-pad_x, width + pad_x, device=x.device).clamp(0, width - 1)
        x = x.index_select(3, cols)
    return x


def _poly_kernels(n: int, sigma: float) -> tuple[list[float], list[float], list[float], float, float, float, float]:
    """OpenCV's FarnebackPrepareGaussian: 1-D taps g, x g, x^2 g and the needed inverse-Gram entries."""
    if sigma < 1.1920929e-07:  # FLT_EPSILON
        sigma = n * 0.3
    xs = range(-n, n + 1)
    g = [math.exp(-x * x / (2 * sigma * sigma)) for x in xs]
    total = sum(g)
    g = [v / total for v in g]
    xg = [x * v for x, v in zip(xs, g)]
    xxg = [x * x * v for x, v in zip(xs, g)]
    # Gram matrix of the basis (1, x, y, x^2, y^2, xy) under the separable weights g(x) g(y).
    m2 = sum(xxg)
    m4 = sum(x * x * v for x, v in zip(xs, xxg))
    gram = torch.zeros(6, 6, dtype=torch.float64)
    gram[0, 0] = 1.0
    gram[1, 1] = gram[2, 2] = gram[0, 3] = gram[3, 0] = gram[0, 4] = gram[4, 0] = m2
    gram[3, 3] = gram[4, 4] = m4
    gram[3, 4] = gram[4, 3] = gram[5, 5] = m2 * m2
    inv = torch.linalg.inv(gram)
    return g, xg, xxg, float(inv[1, 1]), float(inv[0, 3]), float(inv[3, 3]), float(inv[5, 5])


def _border_weight(height: int, width: int, like: Tensor) -> Tensor:
    """OpenCV's per-pixel weight of the equations near the image edges. Shape: (h, w)."""

    def axis(length: int) -> Tensor:
        w = torch.ones(length, dtype=like.dtype, device=like.device)
        for i, value in enumerate(_BORDER_WEIGHTS[: min(len(_BORDER_WEIGHTS), length)]):
            w[i] *= value
            w[length - 1 - i] *= value
        return w

    return axis(height)[:, None] * axis(width)[None, :]


def _base_grid(height: int, width: int, like: Tensor) -> Tensor:
    """Pixel coordinates (x, y) of every pixel. Shape: (1, h, w, 2)."""
    ys = torch.arange(height, dtype=like.dtype, device=like.device)
    xs = torch.arange(width, dtype=like.dtype, device=like.device)
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).unsqueeze(0)


def _level_count(height: int, width: int, params: FarnebackParams) -> int:
    """Levels above the full image, stopping before one whose side is below 32 px, as OpenCV does."""
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
    if min(prev.shape) == 0:
        raise ValueError(f"farneback got an empty batch or image, shape {tuple(prev.shape)}")
