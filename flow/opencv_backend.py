"""OpenCV's DualTVL1 and Farneback behind the project's parameter names, over batches of pairs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from flow.devices import cpu_count

# The project's snake_case names -> OpenCV DualTVL1 setter suffixes.
_TVL1_SETTERS = {
    "tau": "Tau",
    "lambda_": "Lambda",
    "theta": "Theta",
    "nscales": "ScalesNumber",
    "warps": "WarpingsNumber",
    "epsilon": "Epsilon",
    "inner_iterations": "InnerIterations",
    "outer_iterations": "OuterIterations",
    "scale_step": "ScaleStep",
    "gamma": "Gamma",
    "median_filtering": "MedianFiltering",
}


def _tvl1_pair(prev: np.ndarray, nxt: np.ndarray, params: dict) -> np.ndarray:
    algo = cv2.optflow.DualTVL1OpticalFlow_create()
    for name, value in params.items():
        getattr(algo, "set" + _TVL1_SETTERS[name])(value)
    return algo.calc(prev, nxt, None)


def _farneback_pair(prev: np.ndarray, nxt: np.ndarray, params: dict) -> np.ndarray:
    return cv2.calcOpticalFlowFarneback(
        prev,
        nxt,
        None,
        params["pyr_scale"],
        params["levels"],
        params["winsize"],
        params["iterations"],
        params["poly_n"],
        params["poly_sigma"],
        params["flags"],
    )


_PAIR_FUNCTIONS = {"tvl1": _tvl1_pair, "farneback": _farneback_pair}


def opencv_flow(prev: np.ndarray, nxt: np.ndarray, method: str, params: dict, threads: int | None = None) -> np.ndarray:
    """Flow for each pair with OpenCV, pairs spread over `threads` threads (default: all cores).

    OpenCV's own parallel loops barely use a second core for one pair, while cv2 releases the
    GIL, so one single-threaded pair per Python thread scales with the cores.

    Shape:
        prev, nxt (N, H, W) uint8 -> (N, H, W, 2) float32.
    """
    pair = _PAIR_FUNCTIONS[method]
    if len(prev) == 0:
        return np.zeros((0, *prev.shape[1:3], 2), np.float32)
    threads = min(len(prev), threads or cpu_count())
    if threads <= 1:
        flows = [pair(p, q, params) for p, q in zip(prev, nxt)]
    else:
        saved = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:
                flows = list(pool.map(lambda pq: pair(pq[0], pq[1], params), zip(prev, nxt)))
        finally:
            cv2.setNumThreads(saved)
    return np.stack(flows).astype(np.float32, copy=False)
