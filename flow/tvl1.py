"""TV-L1 optical flow (Zach, Pock & Bischof 2007), batched over pairs, in plain PyTorch.

The scheme is the one detailed in J. Sanchez, E. Meinhardt-Llopis and G. Facciolo, "TV-L1 Optical
Flow Estimation", IPOL 2013, and implemented by OpenCV's DualTVL1: a coarse-to-fine pyramid, a few
warps per level (the data term is linearised around the current flow), and per warp the alternation
of a pointwise thresholding step (eq. 20) with Chambolle's dual projection for the TV term
(eqs. 21-23), a 5x5 median filter of the flow before each outer iteration, and a stop once the mean
squared update falls below epsilon^2.

Speed comes from batching pairs, stopping each pair on its own test (converged pairs are frozen by
a mask and dropped from the batch), solving a CPU batch's pairs on one thread per core, and fusing
each iteration's elementwise ops with torch.compile where that pays. Accuracy beats OpenCV's by
dropping the data term where x + u leaves the image.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from flow._ops import (
    centered_gradient,
    divergence,
    forward_gradient,
    gaussian_blur,
    median_columns,
    median_pairs,
    median_windows,
    pyramid_sizes,
    resize,
    warp,
)
from flow.batching import is_out_of_memory
from flow.cpu_parallel import map_pairs
from flow.pairs import check_pair

log = logging.getLogger(__name__)

_GRAD_EPS = 1e-10  # |grad I1|^2 below this counts as zero (IPOL's GRAD_IS_ZERO)
_ZOOM_SIGMA = 0.6  # IPOL: blur sigma before zooming out by z is 0.6 * sqrt(1 / z^2 - 1)


@dataclass(frozen=True)
class TVL1Params:
    """cv2.optflow.DualTVL1OpticalFlow's parameters (snake_case) with OpenCV's defaults."""

    tau: float = 0.25  # time step of the dual (TV) update; <= 0.25 keeps it stable
    lambda_: float = 0.15  # weight of the data term: larger = sharper, noisier flow
    theta: float = 0.3  # coupling of u and v (the auxiliary flow); small = tight coupling
    nscales: int = 5  # pyramid levels (fewer when a level would have a side < 16 px)
    warps: int = 5  # linearisations of the data term per level
    epsilon: float = 0.01  # stop a warp once the mean squared flow update is below epsilon^2
    inner_iterations: int = 30  # iterations between median filterings
    outer_iterations: int = 10  # median filterings per warp (so at most inner * outer iterations)
    scale_step: float = 0.8  # size ratio between consecutive pyramid levels, in (0, 1)
    gamma: float = 0.0  # weight of the illumination-change term (0 = brightness constancy)
    median_filtering: int = 5  # median filter size applied to the flow (1 = off; odd)

    def __post_init__(self):
        positive = ("tau", "lambda_", "theta", "epsilon")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"TV-L1 {name} must be > 0, got {getattr(self, name)}")
        for name in ("nscales", "warps", "inner_iterations", "outer_iterations", "median_filtering"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or value < 1:
                raise ValueError(f"TV-L1 {name} must be an integer >= 1, got {value!r}")
        if not 0.0 < self.scale_step < 1.0:
            raise ValueError(f"TV-L1 scale_step must be in (0, 1), got {self.scale_step}")
        if self.gamma < 0:
            raise ValueError(f"TV-L1 gamma must be >= 0, got {self.gamma}")
        if self.median_filtering % 2 == 0:
            raise ValueError(f"TV-L1 median_filtering must be odd (1 = off), got {self.median_filtering}")


def tvl1(prev: Tensor, nxt: Tensor, params: TVL1Params = TVL1Params()) -> Tensor:
    """Dense TV-L1 flow from `prev` to `nxt` for a batch of grey image pairs.

    Shape:
        prev, nxt (N, H, W) grey levels in [0, 255] -> (N, H, W, 2) pixels, 0 = dx (right), 1 = dy (down).
    Device follows the input; float32/float64 are kept, other dtypes are computed in float32 and
    half precision is cast back.
    """
    return _tvl1(prev, nxt, params)


class TVL1:
    """TV-L1 with fixed parameters, e.g. `TVL1(warps=3)(prev, nxt)`; instances share the compiled steps."""

    def __init__(self, **params):
        unknown = sorted(set(params) - set(TVL1Params.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown TV-L1 parameter(s) {', '.join(unknown)}; known: {', '.join(TVL1Params.__dataclass_fields__)}")
        self.params = TVL1Params(**params)

    def __call__(self, prev: Tensor, nxt: Tensor) -> Tensor:
        """See `tvl1`."""
        return tvl1(prev, nxt, self.params)


# ---------------------------------------------------------------------------------------------
# Solver

_CPU_GROUP_PIXELS = 8 * 224 * 224  # pairs x pixels solved together on the CPU (see _tvl1)
# Converged pairs stay in the batch, frozen by the mask, until they make up this fraction of it;
# then the batch is compacted to the active pairs (a copy of every per-pair tensor). Compacting at
# every convergence copies too often and never compacting computes frozen pairs until the slowest
# one stops: 0.5 beat both by 10-25% at batch 8 and 32 (benchmarks/tvl1_compare.py --no-compaction
# sets it above 1, never).
_COMPACT_FROZEN = 0.5


def _tvl1(prev: Tensor, nxt: Tensor, p: TVL1Params, sync_every: int | None = None) -> Tensor:
    check_pair(prev, nxt, "tvl1")
    n, height, width = prev.shape
    device = prev.device
    out_dtype = prev.dtype if prev.is_floating_point() else torch.float32
    if n == 0:
        return prev.new_zeros((0, height, width, 2), dtype=out_dtype)
    sync_every = sync_every or _sync_interval(device)
    # Counted and decided here, in the calling thread: the compile policy sees the whole batch, and
    # the workers find the mode settled (the compilation itself runs under a lock in _fused).
    _count_work(device, n * height * width)
    _use_compiled(device)

    def solve(prev: Tensor, nxt: Tensor) -> Tensor:
        # Inference mode whatever the caller uses: no autograd bookkeeping, and one compiled graph
        # either way. The copy out of it is a normal tensor.
        with torch.inference_mode():
            return _solve(prev, nxt, p, sync_every)

    if device.type != "cpu":
        flow = solve(prev, nxt)  # accelerators take the whole batch
    else:
        # Pairs are independent, so a CPU batch is cut into cache-sized chunks (eager steps on 32
        # pairs of 224 x 224 ran at 1.3 pairs/s, on 8 at 2.0) and solved on one thread per core,
        # each with one intra-op thread (flow/cpu_parallel.py says why). Batch 8 at 224 x 224 on 2
        # idle cores: eager 5.1 pairs/s on 2 threads vs 2.4 on 1, compiled 6.9 vs 3.9.
        flow = map_pairs(solve, prev, nxt, max(1, _CPU_GROUP_PIXELS // (height * width)))
    return flow.to(out_dtype).clone(memory_format=torch.contiguous_format)


def _solve(prev: Tensor, nxt: Tensor, p: TVL1Params, sync_every: int) -> Tensor:
    """Coarse to fine over the pyramid. Shape: prev, nxt (N, H, W) -> flow (N, H, W, 2)."""
    n, height, width = prev.shape
    work = prev.dtype if prev.dtype in (torch.float32, torch.float64) else torch.float32
    images = torch.stack((prev, nxt), 1).to(work)  # (N, 2, H, W): both frames share each op
    sizes = pyramid_sizes(height, width, p.nscales, p.scale_step)
    # IPOL's pyramid: a Gaussian blur against aliasing, then a bilinear zoom by scale_step (OpenCV
    # zooms without the blur; IPOL also pre-smooths the full image, which cost accuracy here).
    sigma = _ZOOM_SIGMA * (1.0 / p.scale_step**2 - 1.0) ** 0.5
    pyramid = [images]
    for size in sizes[1:]:
        pyramid.append(resize(gaussian_blur(pyramid[-1], sigma), size))
    channels = 3 if p.gamma != 0 else 2  # u3 is the illumination-change field
    u = images.new_zeros((n, channels, *sizes[-1]))  # (N, C, h, w)
    for level in range(len(sizes) - 1, -1, -1):
        if u.shape[-2:] != sizes[level]:
            u = _upsample_flow(u, sizes[level])
        u = _solve_level(pyramid[level][:, 0], pyramid[level][:, 1], u, p, sync_every)
    return u[:, :2].permute(0, 2, 3, 1)


def _upsample_flow(u: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear zoom of the flow to the finer level, vectors scaled by the size ratio per axis."""
    h, w = u.shape[-2:]
    up = F.interpolate(u, size=size, mode="bilinear", align_corners=False)
    gain = [size[1] / w, size[0] / h] + [1.0] * (u.shape[1] - 2)  # u3 (illumination) is not a displacement
    return up * torch.tensor(gain, device=u.device, dtype=u.dtype).view(1, -1, 1, 1)


def _solve_level(i0: Tensor, i1: Tensor, u: Tensor, p: TVL1Params, sync_every: int) -> Tensor:
    """All warps at one pyramid level. Shape: i0, i1 (N, H, W), u (N, C, H, W) -> (N, C, H, W)."""
    n, c, h, w = u.shape
    i1x, i1y = centered_gradient(i1)
    target = torch.stack((i1, i1x, i1y), 1)  # (N, 3, H, W), warped together
    xs = torch.arange(w, device=u.device, dtype=u.dtype)
    ys = torch.arange(h, device=u.device, dtype=u.dtype).view(-1, 1)
    px = torch.zeros_like(u)  # (N, C, H, W) dual variable, x component, one per flow channel
    py = torch.zeros_like(u)
    for _ in range(p.warps):
        flow = u[:, :2].permute(0, 2, 3, 1)  # (N, H, W, 2)
        warped = warp(target, flow, padding_mode="border")  # (N, 3, H, W): I1, I1x, I1y at x + u0
        # Where x + u0 leaves the image, I1 is unknown: drop the data term there and let the TV term
        # fill in (OpenCV samples zeros, IPOL replicates the border; both bias the flow near edges).
        x1, y1 = xs + flow[..., 0], ys + flow[..., 1]
        inside = ((x1 >= 0) & (x1 <= w - 1) & (y1 >= 0) & (y1 <= h - 1)).to(u.dtype)[:, None]  # (N, 1, H, W)
        gx, gy = warped[:, 1:2] * inside, warped[:, 2:3] * inside
        # Linearised data term rho(u) = rho_c + a . u with a = (I1x, I1y[, gamma]) at x + u0 (eq. 13).
        # The threshold divides by |a|^2 including gamma^2, the exact minimiser for the 3-vector
        # (OpenCV leaves gamma^2 out of it).
        a = torch.cat([gx, gy] + ([inside * p.gamma] if c == 3 else []), 1)  # (N, C, H, W)
        inv_grad = 1.0 / (a * a).sum(1, keepdim=True).clamp_min(_GRAD_EPS)  # (N, 1, H, W)
        rho_c = warped[:, 0:1] - gx * u[:, 0:1] - gy * u[:, 1:2] - i0[:, None]  # (N, 1, H, W)
        u, px, py = _iterate(u, px, py, a, inv_grad, rho_c, p, sync_every)
    return u


def _sync_interval(device: torch.device) -> int:
    """Iterations between host reads of the convergence flags.

    On the CPU a read is free, so every iteration is checked and converged pairs leave the batch at
    once. On an accelerator each read stalls the launch queue; frozen pairs still cost their share of
    every kernel, so a few iterations between reads trade a little wasted work for a full queue.
    """
    return 1 if device.type == "cpu" else 8


def _iterate(u: Tensor, px: Tensor, py: Tensor, a: Tensor, inv_grad: Tensor, rho_c: Tensor, p: TVL1Params, sync_every: int) -> tuple[Tensor, ...]:
    """Inner/outer iterations of one warp, each pair stopping on its own convergence test.

    A pair whose mean squared update falls below epsilon^2 is frozen (masked) at once, and dropped
    from the batch at the next host read, so it neither iterates longer than it needs nor stops
    because another pair did. Shape: u, px, py, a (N, C, H, W); inv_grad, rho_c (N, 1, H, W).
    """
    consts = (p.lambda_ * p.theta, p.theta, p.tau / p.theta, p.epsilon**2)
    step = _fused("step", _step, u)
    state, data = (u, px, py), (a, inv_grad, rho_c)
    out: tuple[Tensor, ...] | None = None  # full-batch results, made once a pair stops early
    idx = torch.arange(u.shape[0], device=u.device)  # original index of each pair still iterated
    active = torch.ones(u.shape[0], dtype=torch.bool, device=u.device)
    total = p.inner_iterations * p.outer_iterations
    for it in range(total):
        if it % p.inner_iterations == 0 and p.median_filtering > 1:
            state = (_median_step(state[0], active, p.median_filtering), *state[1:])
        *state, active = step(*state, *data, active, *consts)
        if (it + 1) % sync_every and (it + 1) % p.inner_iterations:
            continue
        n_active = int(active.sum())  # the only host read
        frozen = active.numel() - n_active
        if it + 1 == total or (n_active and frozen < _COMPACT_FROZEN * active.numel()):
            continue
        if out is None:
            out = tuple(torch.empty_like(t) for t in (u, px, py))
        done = ~active
        for dst, src in zip(out, state, strict=True):
            dst[idx[done]] = src[done]
        if n_active == 0:
            return out
        keep = active.nonzero().squeeze(1)
        state = tuple(t[keep] for t in state)
        data = tuple(t[keep] for t in data)
        idx, active = idx[keep], active[keep]
    if out is None:
        return tuple(state)
    for dst, src in zip(out, state, strict=True):
        dst[idx] = src
    return out


def _step(u: Tensor, px: Tensor, py: Tensor, a: Tensor, inv_grad: Tensor, rho_c: Tensor, active: Tensor, lt: float, theta: float, taut: float, eps2: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One iteration for the active pairs; frozen pairs keep u and p. Returns u, px, py, active."""
    # Thresholding (IPOL eq. 20): v = u + a * clamp(-rho(u) / |a|^2, -lambda theta, lambda theta).
    rho = rho_c + (a * u).sum(1, keepdim=True)  # (N, 1, H, W)
    v = u + a * torch.clamp(-rho * inv_grad, -lt, lt)
    # u = v + theta div p (eq. 21); dual projection p = (p + tau/theta grad u) / (1 + tau/theta |grad u|) (eq. 23).
    u_new = v + theta * divergence(px, py)
    ux, uy = forward_gradient(u_new)
    norm = 1.0 + taut * torch.sqrt(ux * ux + uy * uy)
    m = active.view(-1, 1, 1, 1)
    px = torch.where(m, (px + taut * ux) / norm, px)
    py = torch.where(m, (py + taut * uy) / norm, py)
    # Stopping test: mean over pixels of |u_new - u|^2 (OpenCV compares the sum with epsilon^2 * area).
    err = (u_new - u).square().sum((1, 2, 3)) / (u.shape[-1] * u.shape[-2])  # (N,)
    return torch.where(m, u_new, u), px, py, active & (err > eps2)


def _median_step(u: Tensor, active: Tensor, ksize: int) -> Tensor:
    """Median-filter the displacement channels of the active pairs (OpenCV: before each outer iteration)."""
    cols = _fused("median_columns", _median_columns, u)(u, ksize)
    pairs = _fused("median_pairs", median_pairs, u)(cols, ksize)
    return _fused("median_windows", _median_windows, u)(pairs, cols, ksize, u, active)


def _median_columns(u: Tensor, ksize: int) -> list[Tensor | None]:
    r = ksize // 2
    return median_columns(F.pad(u[:, :2], (r, r, r, r), mode="replicate"), ksize)


def _median_windows(pairs: list, cols: list, ksize: int, u: Tensor, active: Tensor) -> Tensor:
    med = median_windows(pairs, cols, ksize)  # (N, 2, H, W)
    if u.shape[1] > 2:
        med = torch.cat((med, u[:, 2:]), 1)
    return torch.where(active.view(-1, 1, 1, 1), med, u)


# ---------------------------------------------------------------------------------------------
# Fusion: torch.compile where it works, eager where it does not, decided once per device type.

# Levels smaller than this always run eagerly: they cost little, and inductor's CPU code for
# reductions over <= 4096 elements differs, which would mean a second compilation for small images.
_COMPILE_MIN_PIXELS = 4096
# On the CPU the compiled steps are only 1.1-1.5x faster than eager ones (224 x 224, batch 1-32;
# batch 8 on 2 threads: 6.9 vs 5.1 pairs/s, 0.05 s saved per pair) while a first compilation takes
# 20-60 s (5-15 s from inductor's disk cache). So a process compiles only once it has solved this
# many pixels (256 pairs at 224 x 224, about 50 s of eager work): a cached compilation is repaid
# after 100-300 pairs, a cold one after 400-1200, and short runs (tests, `flow_bench.py --quick`,
# a few clips) never pay for one. Accelerators compile at once: there the eager steps are bound by
# kernel launches.
_CPU_COMPILE_AFTER = 256 * 224 * 224
_MODE: dict[str, str] = {}  # device type -> "compiled" or "eager", decided once per process
_SOLVED: dict[str, int] = {}  # device type -> pixels solved so far
_COMPILED: dict[tuple[str, str, str], Callable] = {}  # (name, device type, dtype) -> compiled function
_PROVEN: set[tuple[str, str, str]] = set()  # compiled functions that have run once without error
_COMPILE_LOCK = threading.RLock()  # held while a compiled function is created or first run
_DUCK_LOCK = threading.Lock()
_DUCK_USERS = 0  # threads inside _no_duck_shapes
_DUCK_SAVED = True  # use_duck_shape as it was before the first of them
# Inductor's default CPU code calls each kernel from Python holding the GIL, so the worker threads
# of a CPU batch would take turns (2 threads: 4.2 pairs/s, as 1); with the C++ wrapper a whole
# graph runs without the GIL, and 2 threads give 6.9 pairs/s vs 3.9 on 1.
_COMPILE_OPTIONS: dict[str, dict] = {"cpu": {"cpp_wrapper": True}}


def _count_work(device: torch.device, pixels: int) -> None:
    _SOLVED[device.type] = _SOLVED.get(device.type, 0) + pixels


def _use_compiled(device: torch.device) -> bool:
    """Whether the fused steps are compiled on this device type; decided once, then logged."""
    if device.type not in _MODE:
        if os.environ.get("TWOSTREAM_NO_COMPILE", "") not in ("", "0"):
            _MODE[device.type] = "eager"
            log.info("TV-L1 on %s: eager steps (TWOSTREAM_NO_COMPILE is set)", device.type)
        elif device.type == "cpu" and _SOLVED.get("cpu", 0) < _CPU_COMPILE_AFTER:
            return False  # not decided yet: small runs never pay for a compilation
        else:
            _MODE[device.type] = "compiled"
            log.info("TV-L1 on %s: compiling the fused steps with torch.compile", device.type)
    return _MODE[device.type] == "compiled"


def _fused(name: str, fn: Callable, like: Tensor) -> Callable:
    """`fn` compiled for `like`'s device type, or `fn` itself (compilation off, failed, or not worth it).

    Safe to call from several threads: the first call of each compiled function (its compilation)
    runs under a lock, later calls run in parallel.
    """
    device = like.device
    if like.shape[-1] * like.shape[-2] < _COMPILE_MIN_PIXELS or not _use_compiled(device):
        return fn
    key = (name, device.type, str(like.dtype))  # a new dtype recompiles: its first call takes the lock too
    with _COMPILE_LOCK:
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(fn, dynamic=True, fullgraph=True, options=_COMPILE_OPTIONS.get(device.type))
        compiled = _COMPILED[key]

    def call(*args):
        # One graph for every batch size and level: the batch may be any size (compaction goes
        # down to 1) and sizes that happen to be equal (N = C = 2, H = W) must not be tied.
        for t in _tensors(args):
            torch._dynamo.decorators.mark_unbacked(t, 0)
        with _no_duck_shapes():
            if key not in _PROVEN:
                with _COMPILE_LOCK:
                    if key not in _PROVEN:
                        return _first_call(key, fn, compiled, args)
            return compiled(*args)

    return call


def _first_call(key: tuple[str, str, str], fn: Callable, compiled: Callable, args: tuple) -> object:
    """Run `compiled` (compiling it) once; on a compiler failure switch the device type to eager steps."""
    device_type = key[1]
    if _MODE.get(device_type) == "eager":  # another thread's compilation failed meanwhile
        return fn(*args)
    try:
        result = compiled(*args)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
        if is_out_of_memory(exc):
            raise
        _MODE[device_type] = "eager"
        first = str(exc).splitlines()[0] if str(exc) else ""
        log.warning("TV-L1 on %s: torch.compile failed (%s: %s); eager steps from now on", device_type, type(exc).__name__, first)
        return fn(*args)
    _PROVEN.add(key)
    return result


@contextlib.contextmanager
def _no_duck_shapes():
    """torch.fx's use_duck_shape off while any thread runs a compiled step, restored after the last.

    The setting is process-wide: a plain config patch per thread would let one thread restore it
    while another still compiles.
    """
    global _DUCK_USERS, _DUCK_SAVED
    config = torch.fx.experimental._config
    with _DUCK_LOCK:
        if _DUCK_USERS == 0:
            _DUCK_SAVED = config.use_duck_shape
            config.use_duck_shape = False
        _DUCK_USERS += 1
    try:
        yield
    finally:
        with _DUCK_LOCK:
            _DUCK_USERS -= 1
            if _DUCK_USERS == 0:
                config.use_duck_shape = _DUCK_SAVED


def _tensors(args) -> list[Tensor]:
    """The tensors among `args`, looking into lists and tuples."""
    found = []
    for arg in args:
        if isinstance(arg, Tensor):
            found.append(arg)
        elif isinstance(arg, list | tuple):
            found += _tensors(arg)
    return found
