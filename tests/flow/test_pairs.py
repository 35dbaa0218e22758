import numpy as np
import pytest
import torch

from flow.api import estimate
from flow.farneback import farneback
from flow.tvl1 import TVL1Params, tvl1


def _frames(bad: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    prev = rng.uniform(0, 255, (2, 24, 32)).astype(np.float32)
    nxt = np.roll(prev, 1, axis=2)
    nxt[1, 5, 7] = bad
    return prev, nxt


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method, backend", [("farneback", "torch"), ("farneback", "opencv"),
                                             ("tvl1", "torch"), ("tvl1", "opencv")])
def test_non_finite_grey_levels_are_refused_not_spread(bad, method, backend):
    # One NaN pixel would otherwise turn the whole field into NaN (C kernels, TV-L1) or fail deep
    # inside an op (eager Farneback), and OpenCV would see it as some grey level.
    prev, nxt = _frames(bad)
    with pytest.raises(ValueError, match="NaN or infinite"):
        estimate(prev, nxt, method, backend, "cpu", nscales=1, warps=1) if method == "tvl1" else \
            estimate(prev, nxt, method, backend, "cpu")


@pytest.mark.parametrize("solve", [farneback, lambda a, b: tvl1(a, b, TVL1Params(nscales=1, warps=1))],
                         ids=["farneback", "tvl1"])
def test_the_torch_estimators_check_their_pairs(solve):
    prev, nxt = (torch.from_numpy(x) for x in _frames(np.nan))
    with pytest.raises(ValueError, match="NaN or infinite"):
        solve(prev, nxt)
    with pytest.raises(ValueError, match="real grey levels"):
        solve(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool))
    finite = torch.from_numpy(_frames(0.0)[0])
    assert torch.isfinite(solve(finite, finite)).all()



@pytest.mark.parametrize("backend", ["torch", "opencv"])
def test_an_empty_batch_of_pairs_gives_an_empty_flow(backend):
    empty = np.zeros((0, 24, 32), np.uint8)
    assert estimate(empty, empty, "tvl1", backend, "cpu").shape == (0, 24, 32, 2)
