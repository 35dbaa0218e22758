"""Batched image operators shared by the flow estimators: gradients, divergence, warping, pyramids, median.

All functions are pure, work on any device and keep the input's floating dtype. Images are
channels-first `(N, C, H, W)` (or any `(..., H, W)` where stated); flow fields follow the project's
convention `(N, H, W, 2)` with channel 0 = dx (right) and 1 = dy (down), in pixels.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def centered_gradient(img: Tensor) -> tuple[Tensor, Tensor]:
    """Image gradient by centred differences, one-sided half differences on the border.

    The border rule is IPOL's and OpenCV's (`0.5 * (I[1] - I[0])` on the first column, ...): the
    replicate padding below gives exactly that.

    Shape:
        img (..., H, W) -> dx, dy (..., H, W)
    """
    lead = img.shape[:-2]
    flat = img.reshape(-1, 1, *img.shape[-2:])
    pad = F.pad(flat, (1, 1, 1, 1), mode="replicate")  # (B, 1, H + 2, W + 2)
    dx = 0.5 * (pad[..., 1:-1, 2:] - pad[..., 1:-1, :-2])
    dy = 0.5 * (pad[..., 2:, 1:-1] - pad[..., :-2, 1:-1])
    return dx.reshape(*lead, *dx.shape[-2:]), dy.reshape(*lead, *dy.shape[-2:])


def forward_gradient(u: Tensor) -> tuple[Tensor, Tensor]:
    """Forward differences with a zero derivative across the last column / row (Chambolle 2004).

    Shape:
        u (..., H, W) -> ux, uy (..., H, W)
    """
    ux = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1))
    uy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return ux, uy


def divergence(px: Tensor, py: Tensor) -> Tensor:
    """Divergence by backward differences, the negative adjoint of `forward_gradient`.

    <forward_gradient(u), (px, py)> = -<u, divergence(px, py)> for every u and p: the last column of
    px and the last row of py are ignored, as the forward gradient is zero there (IPOL's boundary
    rule; OpenCV relies on those entries staying zero instead).

    Shape:
        px, py (..., H, W) -> (..., H, W)
    """
    # px with its last column set to zero, then d/dx by backward difference with px[-1] = 0.
    qx = F.pad(px[..., :, :-1], (0, 1))
    qy = F.pad(py[..., :-1, :], (0, 0, 0, 1))
    return (qx - F.pad(qx[..., :, :-1], (1, 0))) + (qy - F.pad(qy[..., :-1, :], (0, 0, 1, 0)))


def flow_grid(flow: Tensor) -> Tensor:
    """Sampling positions x + flow(x) in grid_sample's normalised coordinates (align_corners=True).

    Shape:
        flow (N, H, W, 2) pixels -> grid (N, H, W, 2) in [-1, 1] for positions inside the image
    """
    _, height, width, _ = flow.shape
    ys = torch.arange(height, device=flow.device, dtype=flow.dtype)
    xs = torch.arange(width, device=flow.device, dtype=flow.dtype)
    # Pixel i maps to 2 i / (size - 1) - 1; a one-pixel side maps everything to its only pixel.
    sx = 2.0 / max(width - 1, 1)
    sy = 2.0 / max(height - 1, 1)
    gx = (xs.view(1, 1, width) + flow[..., 0]) * sx - 1.0
    gy = (ys.view(1, height, 1) + flow[..., 1]) * sy - 1.0
    return torch.stack((gx, gy), dim=-1)


def warp(img: Tensor, flow: Tensor, mode: str = "bicubic", padding_mode: str = "border") -> Tensor:
    """Backward warp: out(x) = img(x + flow(x)), sampled with grid_sample.

    `bicubic` uses Keys' kernel with a = -0.75 (OpenCV's INTER_CUBIC); `border` replicates the edge
    pixels for taps outside the image (IPOL's choice; OpenCV's remap defaults to zeros there).

    Shape:
        img (N, C, H, W), flow (N, H, W, 2) pixels -> (N, C, H, W)
    """
    if img.shape[0] != flow.shape[0] or img.shape[-2:] != flow.shape[1:3] or flow.shape[-1] != 2:
        raise ValueError(f"warp: image {tuple(img.shape)} and flow {tuple(flow.shape)} do not match")
    return F.grid_sample(img, flow_grid(flow), mode=mode, padding_mode=padding_mode, align_corners=True)


def resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize mapping pixel centres (cv2.resize INTER_LINEAR; no antialiasing).

    Shape:
        img (N, C, H, W) -> (N, C, *size)
    """
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=32)
def _gaussian_taps(sigma: float) -> tuple[float, ...]:
    radius = max(1, math.ceil(3.0 * sigma))
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = sum(taps)
    return tuple(t / total for t in taps)


def gaussian_blur(img: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflecting borders (radius ceil(3 sigma)); sigma <= 0 is a no-op.

    Shape:
        img (N, C, H, W) -> (N, C, H, W)
    """
    if sigma <= 0:
        return img
    taps = torch.tensor(_gaussian_taps(float(sigma)), device=img.device, dtype=img.dtype)
    radius = (taps.numel() - 1) // 2
    n, c, h, w = img.shape
    flat = img.reshape(n * c, 1, h, w)
    # Reflect padding needs radius < side; replicate is the sane fallback for tiny images.
    mode_x = "reflect" if radius < w else "replicate"
    mode_y = "reflect" if radius < h else "replicate"
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode=mode_x), taps.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode=mode_y), taps.view(1, 1, -1, 1))
    return flat.reshape(n, c, h, w)


def pyramid_sizes(height: int, width: int, nscales: int, scale_step: float, min_side: int = 16) -> list[tuple[int, int]]:
    """(H, W) of each pyramid level, finest first, rounded like cv2.resize(fx=fy=scale_step).

    Stops before the first level whose side would fall below `min_side` (OpenCV's DualTVL1 rule),
    so small images get fewer levels than asked for; the full-size level is always there.
    """
    sizes = [(height, width)]
    for _ in range(1, nscales):
        h, w = sizes[-1]
        nh, nw = round(h * scale_step), round(w * scale_step)
        if nh < min_side or nw < min_side:
            break
        sizes.append((nh, nw))
    return sizes


def median_filter(x: Tensor, ksize: int) -> Tensor:
    """Exact k x k median with replicated borders (cv2.medianBlur's result for float images).

    Elementwise min/max networks over shifted views, no unfold copy: each column of k pixels is
    sorted once, adjacent sorted columns are merged once (both are shared by the k windows that
    overlap them), and each window merges its pairs and last column only as far as its median
    needs: 116 min/max per pixel for 5 x 5 instead of 202 for a pruned 25-input sort. The three
    stages are separate functions so that a compiler keeps their shared results in memory
    instead of recomputing them for every window.

    Shape:
        x (..., H, W) -> (..., H, W); ksize odd >= 1
    """
    if ksize < 1 or ksize % 2 == 0:
        raise ValueError(f"median filter size must be odd and positive, got {ksize}")
    if ksize == 1:
        return x
    r = ksize // 2
    h, w = x.shape[-2:]
    flat = x if x.ndim == 4 else x.reshape(-1, 1, h, w)
    pad = F.pad(flat, (r, r, r, r), mode="replicate")  # (B, C, H + 2r, W + 2r)
    cols = median_columns(pad, ksize)
    return median_windows(median_pairs(cols, ksize), cols, ksize).reshape(x.shape)


def median_columns(pad: Tensor, ksize: int) -> list[Tensor | None]:
    """Stage 1: cols[i] = i-th smallest of the k rows y .. y + k - 1, at every padded column.

    Shape: pad (B, C, H + 2r, W + 2r) -> k tensors (B, C, H, W + 2r), None for ranks no one reads.
    """
    h = pad.shape[-2] - 2 * (ksize // 2)
    return _run_network(_median_networks(ksize)[0], [pad[..., i : i + h, :] for i in range(ksize)])


def median_pairs(cols: list[Tensor | None], ksize: int) -> list[Tensor | None]:
    """Stage 2: pairs[i] = i-th smallest of the 2k values of sorted columns j and j + 1.

    Shape: k tensors (B, C, H, W + 2r) -> 2k tensors (B, C, H, W + 2r - 1), None where unread.
    """
    left = [c[..., :-1] if c is not None else None for c in cols]
    right = [c[..., 1:] if c is not None else None for c in cols]
    return _run_network(_median_networks(ksize)[1], left + right)


def median_windows(pairs: list[Tensor | None], cols: list[Tensor | None], ksize: int) -> Tensor:
    """Stage 3: the median of each window from its pairs (x, x + 2, ...) and its last column x + 2r.

    Shape: stage 2 and stage 1 outputs -> (B, C, H, W)
    """
    r = ksize // 2
    w = next(c for c in cols if c is not None).shape[-1] - 2 * r
    inputs = [p[..., 2 * m : 2 * m + w] if p is not None else None for m in range(r) for p in pairs]
    inputs += [c[..., 2 * r : 2 * r + w] if c is not None else None for c in cols]
    return _run_network(_median_networks(ksize)[2], inputs)[0]


Network = tuple[int, tuple[tuple[int, int, bool, bool], ...], tuple[int, ...]]


def _run_network(net: Network, wires: list) -> list:
    """Apply a min/max network; returns its output wires (None where no later stage reads them)."""
    _, comps, outputs = net
    vals = list(wires)
    for i, j, keep_lo, keep_hi in comps:
        a, b = vals[i], vals[j]
        vals[i] = torch.minimum(a, b) if keep_lo else None
        vals[j] = torch.maximum(a, b) if keep_hi else None
    return [vals[o] if o >= 0 else None for o in outputs]


_NETWORKS: dict[int, tuple[Network, Network, Network]] = {}


def _median_networks(k: int) -> tuple[Network, Network, Network]:
    """The three networks of `median_filter` for a k x k window, built once per size."""
    # A plain dict rather than lru_cache: torch.compile traces through this lookup.
    if k not in _NETWORKS:
        _NETWORKS[k] = _build_median_networks(k)
    return _NETWORKS[k]


def _build_median_networks(k: int) -> tuple[Network, Network, Network]:
    """The three min/max networks of `median_filter` for a k x k window, pruned back to front.

    Each network is (inputs, comparators (i, j, keep_min_at_i, keep_max_at_j), outputs): the
    comparator writes min(v[i], v[j]) to wire i and the max to wire j; an output of -1 is unused.
    """
    r = k // 2
    # Window stage: merge the r sorted pairs (2k values each) and the last sorted column.
    lists = [list(range(m * 2 * k, (m + 1) * 2 * k)) for m in range(r)] + [list(range(2 * r * k, 2 * r * k + k))]
    best = None
    # The merge order changes the pruned size (5 x 5: 72 min/max instead of 88); try the few orders.
    orders = itertools.permutations(lists) if len(lists) <= 5 else [lists]
    for order in orders:
        comps: list[tuple[int, int]] = []
        merged = order[0]
        for nxt in order[1:]:
            more, merged = _merge_network(merged, nxt)
            comps += more
        median = merged[(k * k) // 2]
        pruned, needed_in = _prune(comps, [median])
        cost = sum(lo + hi for *_, lo, hi in pruned)
        if best is None or cost < best[0]:
            best = (cost, pruned, needed_in, median)
    _, window, needed_in, median = best
    window_net = (len(lists) * 2 * k, window, (median,))
    # Pair stage: wires 0..k-1 are column j sorted, k..2k-1 column j + 1; output i = i-th of 2k.
    pair_needed = sorted({w % (2 * k) for w in needed_in if w < 2 * r * k})
    more, pair_out = _merge_network(list(range(k)), list(range(k, 2 * k)))
    pair_comps, pair_in = _prune(more, [pair_out[i] for i in pair_needed])
    pair_net = (2 * k, pair_comps, tuple(pair_out[i] if i in pair_needed else -1 for i in range(2 * k)))
    # Column stage: a full sort of k values, pruned to the ranks the later stages read.
    col_needed = sorted({wire % k for wire in pair_in} | {w - 2 * r * k for w in needed_in if w >= 2 * r * k})
    size = 1 << max(0, (k - 1).bit_length())
    sort = [(i, j) for i, j in _batcher_pairs(size) if j < k]
    col_comps, _ = _prune(sort, col_needed)
    col_net = (k, col_comps, tuple(i if i in col_needed else -1 for i in range(k)))
    return col_net, pair_net, window_net


def _prune(comps: list[tuple[int, int]], outputs: list[int]) -> tuple[tuple[tuple[int, int, bool, bool], ...], set[int]]:
    """Drop every comparator output no requested output depends on; also returns the inputs read."""
    needed = set(outputs)
    kept = []
    for i, j in reversed(comps):
        lo, hi = i in needed, j in needed
        if lo or hi:
            kept.append((i, j, lo, hi))
            needed |= {i, j}
    return tuple(reversed(kept)), needed


def _merge_network(a: list[int], b: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Batcher's odd-even merge of two ascending wire lists; returns comparators and the merged order.

    Both lists are padded with +inf to a common power of two; comparators touching padding never
    swap or only move the padding up, so they become relabellings and cost nothing.
    """
    size = 1 << max(0, (max(len(a), len(b)) - 1).bit_length())
    wires: list[int | None] = a + [None] * (size - len(a)) + b + [None] * (size - len(b))
    comps = []
    for i, j in _odd_even_merge(0, 2 * size, 1):
        lo, hi = wires[i], wires[j]
        if lo is None:
            wires[i], wires[j] = hi, None
        elif hi is not None:
            comps.append((lo, hi))
    return comps, [wire for wire in wires if wire is not None]


def _odd_even_merge(lo: int, n: int, r: int):
    """Comparator positions merging the two sorted halves of positions lo .. lo + n - 1 (stride r)."""
    step = r * 2
    if step < n:
        yield from _odd_even_merge(lo, n, step)
        yield from _odd_even_merge(lo + r, n, step)
        for i in range(lo + r, lo + n - r, step):
            yield (i, i + r)
    else:
        yield (lo, lo + r)


def _batcher_pairs(size: int) -> list[tuple[int, int]]:
    """Comparator list (i < j) of Batcher's odd-even merge sort for `size` (a power of two) keys."""
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs
