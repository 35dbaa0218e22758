import dataclasses
import importlib

import cv2
import numpy as np
import pytest
import torch

from flow.farneback import Farneback, FarnebackParams, farneback, polynomial_expansion
from flow.groundtruth import epe, synthetic_pairs, textured_image

# The package exports the function under the module's name, so fetch the module itself.
fb = importlib.import_module("flow.farneback")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# cv2.FarnebackOpticalFlow_create()'s own defaults, the other parameter set in common use.
CREATE_DEFAULTS = FarnebackParams(levels=5, winsize=13, iterations=10, poly_sigma=1.1)


def cv2_flow(prev: np.ndarray, nxt: np.ndarray, params: FarnebackParams) -> np.ndarray:
    args = dataclasses.astuple(params)
    return np.stack([cv2.calcOpticalFlowFarneback(p, n, None, *args) for p, n in zip(prev, nxt)])


def torch_flow(
    prev: np.ndarray, nxt: np.ndarray, params: FarnebackParams = FarnebackParams()
) -> np.ndarray:
    return farneback(torch.from_numpy(prev).float(), torch.from_numpy(nxt).float(), params).numpy()


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(3, 72, 96, seed=11, max_px=3.0)


def test_identical_frames_give_zero_flow():
    img = textured_image(64, 80, np.random.default_rng(0))[None]
    out = torch_flow(img, img)[0]
    assert out.shape == (64, 80, 2)
    # OpenCV drops the second frame's terms on the last row and column (their bilinear
    # neighbours leave the image), which leaves a little motion within a few pixels of the edge.
    assert np.abs(out[8:-8, 8:-8]).max() < 1e-3
    assert np.abs(out).mean() < 5e-3


@pytest.mark.parametrize("shift", [(2, -1), (-3, 2)])
def test_pure_translation_recovered_in_interior(shift):
    dx, dy = shift
    big = textured_image(100, 120, np.random.default_rng(1))
    nxt = big[10:90, 10:110]
    # prev(x) = nxt(x + d), so the flow from prev to nxt is d everywhere.
    prev = big[10 + dy : 90 + dy, 10 + dx : 110 + dx]
    out = torch_flow(prev[None], nxt[None])[0]
    interior = out[12:-12, 12:-12].reshape(-1, 2)
    np.testing.assert_allclose(np.median(interior, 0), [dx, dy], atol=0.05)
    assert np.mean(np.abs(interior - [dx, dy])) < 0.1


@pytest.mark.parametrize("params", [FarnebackParams(), CREATE_DEFAULTS], ids=["tutorial", "create"])
def test_epe_matches_opencv(pairs, params):
    prev, nxt, gt = pairs
    ours, theirs = epe(torch_flow(prev, nxt, params), gt), epe(cv2_flow(prev, nxt, params), gt)
    assert ours <= 1.1 * theirs
    assert ours < 0.3 * epe(np.zeros_like(gt), gt)  # and the flow is real, not near zero


@pytest.mark.parametrize(
    "params",
    [
        FarnebackParams(),
        CREATE_DEFAULTS,
        FarnebackParams(flags=256),
        FarnebackParams(
            poly_n=7, poly_sigma=1.5, winsize=10, pyr_scale=0.6, levels=2, iterations=2
        ),
    ],
    ids=["tutorial", "create", "gaussian", "poly7-even-window"],
)
def test_flow_equals_opencv_per_pixel(pairs, params):
    prev, nxt, _ = pairs
    diff = np.abs(torch_flow(prev, nxt, params) - cv2_flow(prev, nxt, params))
    assert diff.mean() < 1e-4 and diff.max() < 5e-3


def test_gaussian_window_differs_from_box(pairs):
    prev, nxt, gt = pairs
    box, gauss = torch_flow(prev, nxt), torch_flow(prev, nxt, FarnebackParams(flags=256))
    assert np.abs(box - gauss).mean() > 1e-3
    assert epe(gauss, gt) < 0.3 * epe(np.zeros_like(gt), gt)


@pytest.mark.parametrize("size", [(97, 131), (41, 37), (9, 12)])
def test_odd_and_small_sizes_follow_opencv(size):
    # 41x37: one pyramid level above 32 px is impossible, so OpenCV stops at level 0; 9x12 is
    # smaller than the border weighting and the polynomial neighbourhood.
    prev, nxt, _ = synthetic_pairs(2, *size, seed=5, max_px=1.5)
    out = torch_flow(prev, nxt)
    assert out.shape == (2, *size, 2)
    assert np.abs(out - cv2_flow(prev, nxt, FarnebackParams())).mean() < 1e-4


def test_batch_equals_per_pair(pairs, monkeypatch):
    prev, nxt, _ = pairs
    batched = torch_flow(prev, nxt)
    single = np.concatenate([torch_flow(prev[i : i + 1], nxt[i : i + 1]) for i in range(len(prev))])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    monkeypatch.setattr(fb, "_CPU_CHUNK_PIXELS", 1)  # one pair per pass: the chunked path
    np.testing.assert_allclose(torch_flow(prev, nxt), batched, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_device_and_dtype_follow_input(pairs, device, dtype):
    prev, nxt, _ = pairs
    t_prev, t_nxt = (torch.from_numpy(x).to(device=device, dtype=dtype) for x in (prev, nxt))
    out = farneback(t_prev, t_nxt)
    assert out.device.type == device
    assert out.dtype == (dtype if dtype.is_floating_point else torch.float32)
    np.testing.assert_allclose(out.float().cpu().numpy(), torch_flow(prev, nxt), atol=1e-3)


def test_non_contiguous_inputs(pairs):
    prev, nxt, _ = pairs
    expected = torch_flow(prev, nxt)
    # Views with transposed and stepped strides holding the same pixels.
    t_prev = torch.from_numpy(np.ascontiguousarray(prev.transpose(0, 2, 1))).float().transpose(1, 2)
    wide = torch.zeros(3, 72, 192)
    wide[..., ::2] = torch.from_numpy(nxt).float()
    t_nxt = wide[..., ::2]
    assert not t_prev.is_contiguous() and not t_nxt.is_contiguous()
    np.testing.assert_allclose(farneback(t_prev, t_nxt).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("poly_n, poly_sigma", [(5, 1.1), (7, 1.5), (3, 0.0)])
def test_polynomial_expansion_recovers_quadratic(poly_n, poly_sigma):
    h, w = 40, 50
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    a, bx, by, cxx, cyy, cxy = 10.0, 0.7, -1.3, 0.05, -0.02, 0.03
    img = a + bx * x + by * y + cxx * x**2 + cyy * y**2 + cxy * x * y
    r = polynomial_expansion(img[None], poly_n, poly_sigma)[0]  # (5, h, w)
    # The local expansion around (x0, y0) of the global quadratic.
    expected = torch.stack(
        [
            bx + 2 * cxx * x + cxy * y,
            by + 2 * cyy * y + cxy * x,
            torch.full_like(x, cxx),
            torch.full_like(x, cyy),
            torch.full_like(x, cxy),
        ]
    )
    inner = (slice(None), slice(poly_n, h - poly_n), slice(poly_n, w - poly_n))
    torch.testing.assert_close(r[inner], expected[inner], atol=1e-9, rtol=1e-9)


def test_module_equals_function(pairs):
    prev, nxt, _ = pairs
    est = Farneback(winsize=9, iterations=2)
    assert est.params == FarnebackParams(winsize=9, iterations=2)
    t_prev, t_nxt = torch.from_numpy(prev).float(), torch.from_numpy(nxt).float()
    torch.testing.assert_close(est(t_prev, t_nxt), farneback(t_prev, t_nxt, est.params))


def test_defaults_are_the_tutorial_set():
    # The set that reproduces cv2's reference FlyingChairs EPE (benchmarks/farneback_compare.py).
    assert dataclasses.astuple(FarnebackParams()) == (0.5, 3, 15, 3, 5, 1.2, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pyr_scale": 1.0},
        {"levels": -1},
        {"winsize": 0},
        {"iterations": 0},
        {"poly_n": 0},
        {"poly_sigma": -1.0},
        {"flags": 4},
    ],
)
def test_bad_params_raise(kwargs):
    with pytest.raises(ValueError):
        FarnebackParams(**kwargs)


@pytest.mark.parametrize(
    "prev, nxt",
    [
        (torch.zeros(2, 8, 8, 3), torch.zeros(2, 8, 8, 3)),  # RGB is flow.estimate's job
        (torch.zeros(2, 8, 8), torch.zeros(2, 8, 9)),
        (torch.zeros(0, 8, 8), torch.zeros(0, 8, 8)),
        (np.zeros((2, 8, 8)), np.zeros((2, 8, 8))),
    ],
)
def test_bad_inputs_raise(prev, nxt):
    with pytest.raises(ValueError):
        farneback(prev, nxt)
