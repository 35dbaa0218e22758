"""`flow.estimate`: one entry point over methods (TV-L1, Farneback) and backends (torch, OpenCV)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from flow._farneback_native import built as farneback_kernels_built
from flow.batching import BatchRunner, auto_batch_size
from flow.devices import resolve_device
from flow.farneback import FarnebackParams, farneback
from flow.opencv_backend import opencv_flow
from flow.tvl1 import TVL1Params, tvl1

log = logging.getLogger(__name__)

METHODS = ("tvl1", "farneback")
BACKENDS = ("auto", "torch", "opencv")
_PARAMS = {"tvl1": TVL1Params, "farneback": FarnebackParams}
_TORCH_FUNCTIONS = {"tvl1": tvl1, "farneback": farneback}
_GREY = (0.299, 0.587, 0.114)  # ITU-R BT.601, as cv2.cvtColor(RGB2GRAY)


def flow_params(method: str, **overrides) -> dict:
    """Every parameter of `method` with OpenCV's defaults, `overrides` applied and checked."""
    _check_method(method)
    fields = {f.name: f.default for f in dataclasses.fields(_PARAMS[method])}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown {method} parameter(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    params = {**fields, **overrides}
    _PARAMS[method](**params)  # the dataclass validates values where it can
    return params


def resolve_backend(method: str, backend: str, device: torch.device) -> str:
    """`auto` means torch on CUDA and the measured faster backend on the CPU."""
    _check_method(method)
    if backend not in BACKENDS:
        raise ValueError(f"unknown flow backend '{backend}': choose {', '.join(BACKENDS)}")
    if backend == "auto":
        return "torch" if device.type == "cuda" else cpu_auto_backend(method)
    if backend == "opencv" and device.type != "cpu":
        raise ValueError(f"the opencv backend runs on the CPU only, not on {device}; use --backend torch")
    return backend


def cpu_auto_backend(method: str) -> str:
    """`auto` on a CPU: the faster backend at equal accuracy, as measured by benchmarks/flow_bench.py
    on a 2-core machine (README, "Optical flow"): torch for both methods, except Farneback where
    its C kernels cannot be built (no compiler): its eager ops run at a quarter of OpenCV's speed."""
    if method == "farneback" and not farneback_kernels_built():
        return "opencv"
    return "torch"


class FlowEstimator:
    """A configured estimator reused across batches: method, backend, device, parameters, batch size."""

    def __init__(
        self,
        method: str = "tvl1",
        backend: str = "auto",
        device: str | torch.device = "auto",
        batch_size: int | None = None,
        **params,
    ):
        self.params = flow_params(method, **params)
        self.method = method
        self.device = resolve_device(device)
        self.backend = resolve_backend(method, backend, self.device)
        self.batch_size = batch_size
        self._runner: BatchRunner | None = None
        fn = _TORCH_FUNCTIONS[method]
        typed = _PARAMS[method](**self.params)
        self._torch_fn = lambda prev, nxt: fn(prev, nxt, typed)
        log.info("flow estimator: %s on %s (%s backend)", method, self.device, self.backend)

    def describe(self) -> dict:
        """Plain values naming the method and every parameter, for HDF5 attrs and run records."""
        return {
            "flow_method": self.method,
            "flow_backend": self.backend,
            **{f"flow_param_{k}": v for k, v in self.params.items()},
        }

    def __call__(self, prev, nxt):
        """Flow from prev to nxt: numpy in -> numpy out; tensors in -> a tensor on their device.

        Shape:
            prev, nxt (N, H, W) grey or (N, H, W, 3) RGB -> (N, H, W, 2) float32, 0 = dx, 1 = dy.
        """
        is_tensor = isinstance(prev, torch.Tensor)
        if is_tensor != isinstance(nxt, torch.Tensor):
            raise ValueError("prev and nxt must both be numpy arrays or both torch tensors")
        _check_shapes(prev, nxt)
        if self.backend == "opencv":
            out = opencv_flow(_to_grey_uint8(prev), _to_grey_uint8(nxt), self.method, self.params)
            return torch.from_numpy(out).to(prev.device) if is_tensor else out
        home = prev.device if is_tensor else torch.device("cpu")
        grey_prev, grey_nxt = (self._grey(x) for x in (prev, nxt))
        if self._runner is None:
            size = self.batch_size or auto_batch_size(self.method, *grey_prev.shape[1:], self.device)
            self._runner = BatchRunner(self._torch_fn, size)
        with torch.inference_mode():
            out = self._runner(grey_prev, grey_nxt)
        return out.to(home) if is_tensor else out.cpu().numpy()

    def _grey(self, x) -> torch.Tensor:
        """Grey levels for the torch estimators, (N, H, W) float32 on the device.

        Farneback turns uint8 RGB frames into the integer grey levels the OpenCV backend sees, so
        the two backends give the same flow from the same frames (its solve is OpenCV's, and
        near-singular spots turn a fraction of a grey level into pixels of flow); TV-L1 keeps the
        unrounded levels.
        """
        grey = _to_grey_float(x, self.device)
        if self.method == "farneback" and x.ndim == 4 and x.dtype in (np.uint8, torch.uint8):
            grey = grey.round_().clamp_(0, 255)  # as _to_grey_uint8 rounds them for OpenCV
        return grey


def estimate(prev, nxt, method: str = "tvl1", backend: str = "auto", device: str = "auto", batch_size: int | None = None, **params):
    """Optical flow from `prev` to `nxt` for a batch of pairs (see FlowEstimator.__call__).

    Parameters keep OpenCV's names (snake_case) and defaults: TV-L1 tau, lambda_, theta, nscales,
    warps, epsilon, inner_iterations, outer_iterations, scale_step, gamma, median_filtering;
    Farneback pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags.
    """
    if device == "auto" and isinstance(prev, torch.Tensor):
        device = prev.device
    return FlowEstimator(method, backend, device, batch_size, **params)(prev, nxt)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown flow method '{method}': choose {' or '.join(METHODS)}")


def _check_shapes(prev, nxt) -> None:
    if tuple(prev.shape) != tuple(nxt.shape):
        raise ValueError(f"prev and nxt differ in shape: {tuple(prev.shape)} vs {tuple(nxt.shape)}")
    if not (prev.ndim == 3 or (prev.ndim == 4 and prev.shape[-1] == 3)):
        raise ValueError(f"expected (N, H, W) grey or (N, H, W, 3) RGB pairs, got shape {tuple(prev.shape)}")


def _to_grey_uint8(x) -> np.ndarray:
    """(N, H, W[, 3]) array or tensor -> (N, H, W) uint8 for OpenCV: the torch estimators' grey
    levels, rounded (uint8 grey frames pass through unchanged)."""
    if x.ndim == 3 and x.dtype in (np.uint8, torch.uint8):  # already what OpenCV takes
        return np.ascontiguousarray(x.cpu().numpy() if isinstance(x, torch.Tensor) else x)
    grey = _to_grey_float(x, torch.device("cpu"))
    if not bool(torch.isfinite(grey).all()):
        raise ValueError("the frames hold NaN or infinite grey levels")
    return grey.round_().clamp_(0, 255).to(torch.uint8).numpy()


def _to_grey_float(x, device: torch.device) -> torch.Tensor:
    """(N, H, W[, 3]) array or tensor -> (N, H, W) float32 grey levels in [0, 255] on `device`."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()  # page-locked, so the copy below runs asynchronously
    t = t.to(device, non_blocking=True).to(torch.float32)
    if t.ndim == 4:
        t = t @ torch.tensor(_GREY, dtype=torch.float32, device=device)
    return t.contiguous()
