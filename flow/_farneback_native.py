"""Farneback on a CPU as C kernels (flow/_farneback_kernels.c), bit-equal to the eager ops.

On a CPU the eager torch version dispatches ~5000 small ops per pair: that dispatch, the
temporaries it allocates and the GIL it holds between ops cost more than the arithmetic (~23
CPU-ms per 224x224 pair, against ~7.7 for OpenCV), and keep the pairs' thread pool from scaling.
The C kernels (pyramid level, polynomial expansion, a level's displacement updates with either
window, flow upsampling) do the same float32/float64 operations in the same order, a row at a
time, in ~5 CPU-ms per pair; tests/flow/test_farneback.py holds them to the eager ops' bits.

The source is compiled once per machine with the system's C compiler into a cache folder and
loaded with ctypes, which releases the GIL during each call. Without a compiler, with
TWOSTREAM_NO_COMPILE set, or if the build fails, `available()` is False and flow/farneback.py
keeps its eager ops; the choice is made once per process and logged.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flow import cvresize

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_farneback_kernels.c")
# No contraction into FMAs and no reassociation: results must round as the eager ops do.
# -fno-trapping-math (FP exceptions may be ignored) lets loops with selects vectorise; the CPU's
# own vector width (-march=native, dropped if the compiler refuses it) gives hardware fmaf().
_FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off", "-fno-trapping-math"]
_NATIVE_FLAGS = ["-march=native"]
_FLOAT_P = ctypes.POINTER(ctypes.c_float)
_INT_P = ctypes.POINTER(ctypes.c_int)
_P = ctypes.c_void_p  # tensor data, passed as addresses
_SIGNATURES = {  # name: argument types; every kernel returns int (0, or -1 out of memory)
    "fb_expand": [_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _FLOAT_P, _FLOAT_P, _FLOAT_P]
    + [ctypes.c_double] * 4
    + [_P, ctypes.c_long],
    "fb_refine": [_P, _P, ctypes.c_long, _P, ctypes.c_long, ctypes.c_int, _P]
    + [ctypes.c_int] * 3
    + [_FLOAT_P, ctypes.c_int],
    "fb_blur": [_P, ctypes.c_int, ctypes.c_int, _FLOAT_P, ctypes.c_int, _P],
    "fb_halve": [_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P],
    "fb_lerp": [_P] + [ctypes.c_int] * 3 + [_P] * 8,
    "fb_resize_linear": [_P] + [ctypes.c_int] * 3 + [_P] * 10,
}
_LOCK = threading.Lock()  # the pairs' worker threads may all ask for the library first


def available(x: Tensor) -> bool:
    """Whether the C kernels can run on `x`: a float32 CPU tensor, and the kernels built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _library() is not None


def built() -> bool:
    """Whether the C kernels are (or can be) built on this machine; builds them on first call."""
    return _library() is not None


_LOADED: list = []  # [the library or None] once decided


def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None when they cannot be (decided once per process, logged)."""
    if not _LOADED:
        with _LOCK:
            if not _LOADED:  # threads that waited on the lock find it decided
                _LOADED.append(_load())
    return _LOADED[0]


_library.cache_clear = _LOADED.clear  # decide again on the next call (as a cached function's reset)


def _load() -> ctypes.CDLL | None:
    if os.environ.get("TWOSTREAM_NO_COMPILE", "") not in ("", "0"):
        log.info("Farneback on cpu: eager ops (TWOSTREAM_NO_COMPILE is set)")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("Farneback on cpu: eager ops (no C compiler found)")
        return None
    source = _SOURCE.read_text()
    key = "\0".join([source, compiler, *_FLAGS, *_NATIVE_FLAGS, _cpu_identity()])
    path = _cache_dir() / f"farneback_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    try:
        if not path.exists():
            try:
                _build(compiler, source, _FLAGS + _NATIVE_FLAGS, path)
            except subprocess.CalledProcessError:
                _build(compiler, source, _FLAGS, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("Farneback on cpu: eager ops (building the C kernels failed: %s)", first)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
    log.info("Farneback on cpu: C kernels (%s)", path)
    return lib


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags where Linux lists them."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in info if ln.startswith(("model name", "flags"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(base) / "twostream"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / f"twostream-{os.getuid()}"
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _build(compiler: str, source: str, flags: list[str], path: Path) -> None:
    """Compile `source` into `path`, atomically (other processes may build it at the same time)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        c_file, built = Path(tmp) / "kernels.c", Path(tmp) / path.name
        c_file.write_text(source)
        cmd = [compiler, *flags, str(c_file), "-o", str(built), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(built, path)


def _call(name: str, *args) -> None:
    if getattr(_library(), name)(*args):
        raise MemoryError(f"Farneback: out of memory in the C kernel {name}")


def _addr(x: Tensor) -> int:
    return x.data_ptr()


@functools.lru_cache(maxsize=32)
def _floats(values: tuple[float, ...]) -> ctypes.Array:
    """A C float array of `values` (the kernels' taps; cached, as building one costs)."""
    return (ctypes.c_float * len(values))(*values)


# ---- the polynomial expansion and a level's displacement updates (flow/farneback.py) ---------


def expand(img: Tensor, kernels: tuple[tuple[float, ...], ...]) -> Tensor:
    """farneback._expand of float32 images. Shape: img (B, H, W) -> (5, B, H, W)."""
    g, xg, xxg, ig11, ig03, ig33, ig55 = kernels
    img = img.contiguous()
    batch, height, width = img.shape
    out = img.new_empty(5, batch, height, width)
    taps = [_floats(t) for t in (g, xg, xxg)]
    for b in range(batch):
        _call("fb_expand", _addr(img[b]), height, width, len(g) - 1, *taps,
              ig11, ig03, ig33, ig55, _addr(out[:, b]), batch * height * width)  # fmt: skip
    return out


def refine(
    r0: Tensor,
    r1: Tensor,
    flow: Tensor,
    border: Tensor,
    winsize: int,
    iterations: int,
    gaussian_taps: tuple[float, ...] | None = None,
) -> Tensor:
    """farneback._refine of float32 expansions: the box window, or the Gaussian one with its
    taps 0..winsize // 2 (_farneback_ops.window_taps). Returns a new flow.

    Shape: r0, r1 (5, N, h, w) (contiguous, or views of one (5, 2N, h, w) expansion), flow
    (2, N, h, w), border (h, w).
    """
    _, n, height, width = r0.shape
    if r0.stride() != r1.stride() or r0.stride()[1:] != (height * width, width, 1):
        r0, r1 = r0.contiguous(), r1.contiguous()
    flow = flow.contiguous().clone()
    taps = None if gaussian_taps is None else _floats(gaussian_taps)
    _call("fb_refine", _addr(r0), _addr(r1), r0.stride(0), _addr(flow), flow.stride(0), n,
          _addr(border.contiguous()), height, width, winsize, taps, iterations)  # fmt: skip
    return flow


# ---- the pyramid and the flow's upsampling (flow/cvresize.py) ---------------------------------


def resampling_available(x: Tensor) -> bool:
    """Whether `pyramid_level` and `resize_flow` may run on `x`: the C kernels fuse with fmaf()
    as the eager ops do only where the CPU fuses (else the eager ops emulate it differently)."""
    return available(x) and cvresize._fuses("cpu")


def pyramid_level(images: Tensor, scale: float, size: tuple[int, int]) -> Tensor:
    """cvresize.pyramid_level of float32 images. Shape: (B, 1, H, W) -> (B, 1, h, w)."""
    ksize, sigma = cvresize.level_blur(scale)
    images = images.contiguous()
    batch, _, height, width = images.shape
    blurred = torch.empty_like(images)
    taps = _floats(cvresize._gaussian_kernel(ksize, sigma))
    for b in range(batch):
        _call("fb_blur", _addr(images[b]), height, width, taps, ksize, _addr(blurred[b]))
    if (height, width) == size:
        return blurred
    out = images.new_empty(batch, 1, *size)
    if (height, width) == (2 * size[0], 2 * size[1]):
        for b in range(batch):
            _call("fb_halve", _addr(blurred[b]), width, *size, _addr(out[b]))
        return out
    rows, cols = _lerp_tables(height, size[0]), _lerp_tables(width, size[1])
    tmp = images.new_empty(2 * size[1])
    for b in range(batch):
        _call("fb_lerp", _addr(blurred[b]), width, *size, *map(_addr, cols), *map(_addr, rows),
              _addr(tmp), _addr(out[b]))  # fmt: skip
    return out


def resize_flow(flow: Tensor, size: tuple[int, int]) -> Tensor:
    """cvresize.resize_flow of a float32 flow. Shape: (..., h, w) -> (..., H, W)."""
    height, width = flow.shape[-2:]
    planes = flow.contiguous().view(-1, height, width)
    out = flow.new_empty(*flow.shape[:-2], *size)
    out_planes = out.view(-1, *size)
    cols = _resize_tables(width, size[1], clamp=True)
    rows = _resize_tables(height, size[0], clamp=False)
    tmp = flow.new_empty(2 * size[1])
    for p in range(planes.shape[0]):
        _call("fb_resize_linear", _addr(planes[p]), width, *size, *map(_addr, cols[:2]),
              *map(_addr, cols[2:]), *map(_addr, rows[:2]), *map(_addr, rows[2:]), _addr(tmp),
              _addr(out_planes[p]))  # fmt: skip
    return out


@functools.lru_cache(maxsize=64)
def _lerp_tables(src: int, dst: int) -> tuple[Tensor, Tensor, Tensor]:
    """IPP's sampling along one axis as source indices (int32) and float32 weights."""
    used, first, second, weights = (t.numpy() for t in cvresize._lerp_axis(src, dst, "cpu"))
    return (
        torch.from_numpy(used[first].astype(np.int32)),
        torch.from_numpy(used[second].astype(np.int32)),
        torch.from_numpy(weights.astype(np.float32)),
    )


@functools.lru_cache(maxsize=64)
def _resize_tables(src: int, dst: int, clamp: bool) -> tuple[Tensor, ...]:
    """OpenCV's linear sampling along one axis: indices (int32), weights (float32)."""
    first, second, w0, w1 = cvresize._flow_axis(src, dst, clamp)
    return (
        torch.from_numpy(first.astype(np.int32)),
        torch.from_numpy(second.astype(np.int32)),
        torch.from_numpy(w0),
        torch.from_numpy(w1),
    )
