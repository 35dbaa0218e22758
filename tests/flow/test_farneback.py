import dataclasses
import importlib
import logging
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from flow import _farneback_native, cvresize
from flow.cvresize import pyramid_level, resize_flow
from flow.farneback import Farneback, FarnebackParams, farneback, polynomial_expansion
from flow.groundtruth import epe, synthetic_pairs, textured_image

# The package exports the function under the module's name, so fetch the module itself.
fb = importlib.import_module("flow.farneback")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# cv2.FarnebackOpticalFlow_create()'s own defaults, the other parameter set in common use.
CREATE_DEFAULTS = FarnebackParams(levels=5, winsize=13, iterations=10, poly_sigma=1.1)
PARAM_SETS = {  # compared with OpenCV per pixel
    "tutorial": FarnebackParams(),
    "create": CREATE_DEFAULTS,
    "gaussian": FarnebackParams(flags=256),
    "poly7-even-window": FarnebackParams(poly_n=7, poly_sigma=1.5, winsize=10, pyr_scale=0.6, levels=2, iterations=2),
    "window-1": FarnebackParams(winsize=1),
}
KERNEL_PARAM_SETS = {  # C kernels against the eager ops: the above and the Gaussian window's edge cases
    **PARAM_SETS,
    "gaussian-even-window": FarnebackParams(flags=256, winsize=4, levels=1),
    "gaussian-window-1": FarnebackParams(flags=256, winsize=1),
}


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


@pytest.mark.parametrize("params", list(PARAM_SETS.values()), ids=list(PARAM_SETS))
def test_flow_equals_opencv_per_pixel(pairs, params):
    # Every step rounds as OpenCV's does, so the flows agree to the last bits: near-singular
    # equations (flat, saturated or one-dimensional regions) amplify any rounding difference into
    # pixels of flow on real images. (OpenCV's box window for winsize 1 spans 2x2 pixels.)
    prev, nxt, _ = pairs
    diff = np.abs(torch_flow(prev, nxt, params) - cv2_flow(prev, nxt, params))
    assert diff.max() < 1e-6


def _opencv_pyramid_level(scale: float) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """A 96x128 noise image, the level size at `scale`, and OpenCV's level: GaussianBlur with
    Farneback's sigma and kernel size, then cv2.resize."""
    img = np.random.default_rng(2).uniform(0, 255, (96, 128)).astype(np.float32)
    sigma = (1 / scale - 1) * 0.5
    ksize = max(round(sigma * 5) | 1, 3)
    size = (round(96 * scale), round(128 * scale))
    level = cv2.resize(cv2.GaussianBlur(img, (ksize, ksize), sigma, sigma), size[::-1], interpolation=cv2.INTER_LINEAR)
    return img, size, level


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25, 0.125, 0.6])
def test_pyramid_level_equals_opencv(scale):
    # OpenCV smooths the full image (GaussianBlur, FMA-ordered sums) and resizes it (a 2x2 mean
    # for an exact halving, IPP's fused interpolation otherwise); widths that are multiples of 8
    # keep OpenCV's vectorised code on every column.
    img, size, expected = _opencv_pyramid_level(scale)
    ours = pyramid_level(torch.from_numpy(img)[None, None], scale, size)[0, 0].numpy()
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("size", [(48, 64), (67, 83)])
def test_flow_upsampling_equals_opencv(size):
    flow = np.random.default_rng(3).uniform(-10, 10, (24, 32, 2)).astype(np.float32)
    expected = cv2.resize(flow, size[::-1], interpolation=cv2.INTER_LINEAR)
    ours = resize_flow(torch.from_numpy(flow).permute(2, 0, 1)[None], size)[0]
    np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), expected)


def test_fused_multiply_add_rounds_once():
    # The pyramid's blur and IPP's interpolation round a * b + c once, as FMA instructions do.
    rng = np.random.default_rng(4)
    a, c, t = (rng.standard_normal(1001).astype(np.float32) for _ in range(3))
    b = np.float32(0.2734)
    exact = np.longdouble
    want_scalar = (a.astype(exact) * exact(b) + c.astype(exact)).astype(np.float32)
    want_tensor = (a.astype(exact) * t.astype(exact) + c.astype(exact)).astype(np.float32)
    a_t, c_t, t_t = (torch.from_numpy(v) for v in (a, c, t))
    np.testing.assert_array_equal(cvresize._fma(a_t, float(b), c_t).numpy(), want_scalar)
    np.testing.assert_array_equal(cvresize._fma(a_t, t_t, c_t).numpy(), want_tensor)


def test_cpu_call_restores_threads_and_returns_a_normal_tensor(pairs, monkeypatch):
    prev, nxt, _ = pairs
    monkeypatch.setattr(fb, "_CPU_CHUNK_PIXELS", 1)  # one pair per pass, spread over threads
    before = torch.get_num_threads()
    out = farneback(torch.from_numpy(prev).float(), torch.from_numpy(nxt).float())
    assert torch.get_num_threads() == before
    assert not out.is_inference() and out.is_contiguous()
    out.add_(1.0)  # usable outside inference mode


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


# The C kernels (flow/_farneback_native.py). The suite runs with TWOSTREAM_NO_COMPILE=1, so every
# test above checks the eager ops; these switch the kernels on and hold them to the same bits.


@pytest.fixture
def native(monkeypatch):
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler: the eager ops are all there is")
    monkeypatch.setenv("TWOSTREAM_NO_COMPILE", "0")
    _farneback_native._library.cache_clear()
    assert _farneback_native._library() is not None, "a C compiler exists but the build failed"
    yield
    _farneback_native._library.cache_clear()  # the next test decides again (eager, by default)


def both_paths(prev: np.ndarray, nxt: np.ndarray, params: FarnebackParams, monkeypatch):
    """The flow with the C kernels (already switched on) and with the eager ops."""
    fast = torch_flow(prev, nxt, params)
    monkeypatch.setenv("TWOSTREAM_NO_COMPILE", "1")
    _farneback_native._library.cache_clear()
    eager = torch_flow(prev, nxt, params)
    monkeypatch.setenv("TWOSTREAM_NO_COMPILE", "0")
    _farneback_native._library.cache_clear()
    return fast, eager


def _flat_and_saturated() -> tuple[np.ndarray, np.ndarray]:
    # A saturated block on a flat background: near-singular systems almost everywhere.
    prev = np.zeros((2, 40, 48), np.float32)
    prev[:, 10:20, 10:30] = 255
    return prev, np.roll(prev, 2, axis=1)


def _noise(h: int, w: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
    # Noise moves pixels far and at random: many land outside the image.
    rng = np.random.default_rng(h * w)
    prev = rng.uniform(0, 255, (2, h, w)).astype(np.float32)
    return prev, np.roll(prev, shift, axis=2) + rng.normal(0, 3, prev.shape).astype(np.float32)


@pytest.mark.parametrize(
    "make",
    [
        lambda: synthetic_pairs(3, 72, 96, seed=11, max_px=3.0)[:2],
        lambda: synthetic_pairs(2, 97, 131, seed=5, max_px=4.0)[:2],
        _flat_and_saturated,
        lambda: _noise(33, 47, 3),
        lambda: _noise(9, 12, 1),
        lambda: _noise(1, 40, 1),
        lambda: _noise(13, 1, 0),
    ],
    ids=["synthetic", "odd-size", "flat-saturated", "noise", "small", "one-row", "one-column"],
)
@pytest.mark.parametrize("params", list(KERNEL_PARAM_SETS.values()), ids=list(KERNEL_PARAM_SETS))
def test_c_kernels_equal_eager_ops_bit_for_bit(native, monkeypatch, make, params):
    prev, nxt = make()
    fast, eager = both_paths(prev, nxt, params, monkeypatch)
    np.testing.assert_array_equal(fast, eager)
    assert np.isfinite(fast).all()


@pytest.mark.parametrize("params", [FarnebackParams(), CREATE_DEFAULTS], ids=["tutorial", "create"])
def test_c_kernels_equal_opencv_per_pixel(native, pairs, params):
    prev, nxt, _ = pairs
    assert np.abs(torch_flow(prev, nxt, params) - cv2_flow(prev, nxt, params)).max() < 1e-6


def test_c_kernels_pool_and_batch_agree(native, pairs, monkeypatch):
    prev, nxt, _ = pairs
    batched = torch_flow(prev, nxt)
    monkeypatch.setattr(fb, "_CPU_CHUNK_PIXELS", 1)  # one pair per pass, spread over threads
    np.testing.assert_array_equal(torch_flow(prev, nxt), batched)
    single = np.concatenate([torch_flow(prev[i : i + 1], nxt[i : i + 1]) for i in range(len(prev))])
    np.testing.assert_array_equal(single, batched)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25, 0.125, 0.6])
def test_c_pyramid_level_equals_opencv_and_eager(native, scale):
    img, size, expected = _opencv_pyramid_level(scale)
    images = torch.from_numpy(np.stack([img, img[::-1].copy()]))[:, None]
    ours = _farneback_native.pyramid_level(images, scale, size)
    np.testing.assert_array_equal(ours[0, 0].numpy(), expected)
    torch.testing.assert_close(ours, pyramid_level(images, scale, size), rtol=0, atol=0)


@pytest.mark.parametrize("size", [(48, 64), (67, 83), (11, 7)])
def test_c_flow_upsampling_equals_opencv_and_eager(native, size):
    flow = np.random.default_rng(3).uniform(-10, 10, (24, 32, 2)).astype(np.float32)
    expected = cv2.resize(flow, size[::-1], interpolation=cv2.INTER_LINEAR)
    planes = torch.from_numpy(flow).permute(2, 0, 1)[:, None]  # (2, N = 1, h, w) as refined
    ours = _farneback_native.resize_flow(planes, size)
    np.testing.assert_array_equal(ours[:, 0].permute(1, 2, 0).numpy(), expected)
    torch.testing.assert_close(ours, resize_flow(planes, size), rtol=0, atol=0)


def test_c_kernels_only_for_float32_on_cpu(native):
    assert _farneback_native.available(torch.zeros(2, 2))
    assert not _farneback_native.available(torch.zeros(2, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TWOSTREAM_NO_COMPILE": "1"}, "TWOSTREAM_NO_COMPILE"),
        ({"CC": "no-such-cc"}, "no C compiler"),
    ],
)
def test_without_c_kernels_the_eager_ops_run(monkeypatch, caplog, pairs, env, message):
    monkeypatch.setenv("TWOSTREAM_NO_COMPILE", "0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _farneback_native._library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="flow._farneback_native"):
            assert not _farneback_native.available(torch.zeros(2, 2))
            prev, nxt, _ = pairs
            assert torch_flow(prev[:1], nxt[:1]).shape == (1, 72, 96, 2)
    finally:
        _farneback_native._library.cache_clear()
    assert message in caplog.text and "eager ops" in caplog.text
