import numpy as np
import pytest
import torch

import flow.api as api
from flow.api import FlowEstimator, estimate, flow_params, resolve_backend
from flow.batching import BatchRunner, is_out_of_memory
from flow.devices import resolve_device
from flow.groundtruth import epe, synthetic_pairs

FAST_TVL1 = {"nscales": 2, "warps": 2, "inner_iterations": 10, "outer_iterations": 2}


@pytest.fixture(scope="module")
def pairs():
    return synthetic_pairs(3, 40, 48, seed=3, max_px=1.5)


@pytest.mark.parametrize("backend", ["opencv", "torch"])
@pytest.mark.parametrize("method", ["tvl1", "farneback"])
def test_numpy_in_numpy_out(pairs, method, backend):
    prev, nxt, gt = pairs
    params = FAST_TVL1 if method == "tvl1" else {}
    out = estimate(prev, nxt, method=method, backend=backend, device="cpu", **params)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (3, 40, 48, 2)
    # Far better than predicting no motion: the estimate follows the ground truth.
    assert epe(out, gt, border=4) < 0.5 * epe(np.zeros_like(gt), gt, border=4)


def test_tensor_in_tensor_out_on_input_device(pairs):
    prev, nxt, _ = pairs
    out = estimate(torch.from_numpy(prev), torch.from_numpy(nxt), backend="torch", **FAST_TVL1)
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.dtype == torch.float32
    assert out.shape == (3, 40, 48, 2)


def test_rgb_input_matches_grey_input(pairs):
    prev, nxt, _ = pairs
    rgb = lambda g: np.repeat(g[..., None], 3, axis=-1)  # noqa: E731
    grey = estimate(prev, nxt, backend="opencv", method="farneback")
    colour = estimate(rgb(prev), rgb(nxt), backend="opencv", method="farneback")
    np.testing.assert_allclose(grey, colour, atol=1e-5)


def test_opencv_tensor_input_returns_tensor(pairs):
    prev, nxt, _ = pairs
    out = estimate(torch.from_numpy(prev), torch.from_numpy(nxt), method="farneback", backend="opencv")
    assert isinstance(out, torch.Tensor) and out.shape == (3, 40, 48, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "lucas"}, "unknown flow method"),
        ({"backend": "cuda"}, "unknown flow backend"),
        ({"method": "tvl1", "lambda": 0.1}, "unknown tvl1 parameter"),
        ({"device": "tpu"}, "unknown device"),
    ],
)
def test_bad_arguments_are_clear(pairs, kwargs, message):
    prev, nxt, _ = pairs
    with pytest.raises(ValueError, match=message):
        estimate(prev, nxt, **kwargs)


def test_shape_mismatch_rejected(pairs):
    prev, nxt, _ = pairs
    with pytest.raises(ValueError, match="differ in shape"):
        estimate(prev, nxt[:, :-1])
    with pytest.raises(ValueError, match="expected"):
        estimate(prev[0], nxt[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:0")


def test_params_keep_opencv_defaults():
    p = flow_params("tvl1")
    assert (p["tau"], p["lambda_"], p["theta"], p["nscales"], p["warps"], p["epsilon"]) == (0.25, 0.15, 0.3, 5, 5, 0.01)
    assert flow_params("farneback", winsize=21)["winsize"] == 21


@pytest.mark.parametrize("method", ["tvl1", "farneback"])
def test_auto_picks_a_working_backend(pairs, method):
    est = FlowEstimator(method, "auto", "auto", **(FAST_TVL1 if method == "tvl1" else {}))
    assert est.backend == resolve_backend(method, "auto", est.device)
    out = est(pairs[0], pairs[1])
    assert out.shape == (3, 40, 48, 2) and np.isfinite(out).all()


def test_opencv_backend_refuses_gpu_device():
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("tvl1", "opencv", torch.device("cuda", 0))


def test_oom_backoff_halves_batch_and_loses_no_pair():
    calls = []

    def fake(prev, nxt):
        calls.append(len(prev))
        if len(prev) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.stack([prev, nxt], dim=-1)

    runner = BatchRunner(fake, batch_size=16)
    prev = torch.arange(10 * 2 * 2, dtype=torch.float32).reshape(10, 2, 2)
    out = runner(prev, prev + 1)
    assert runner.batch_size <= 3
    torch.testing.assert_close(out[..., 0], prev)
    assert calls[0] == 10 and max(calls[1:]) <= 5


def test_oom_at_batch_one_is_raised():
    def always(prev, nxt):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(RuntimeError):
        BatchRunner(always, batch_size=1)(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))


def test_other_errors_are_not_mistaken_for_oom():
    assert not is_out_of_memory(ValueError("out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(MemoryError("Farneback: out of memory in the C kernel fb_refine"))


def test_estimator_reuses_its_batch_runner(pairs, monkeypatch):
    est = FlowEstimator("tvl1", "torch", "cpu", batch_size=2, **FAST_TVL1)
    est(pairs[0], pairs[1])
    runner = est._runner
    est(pairs[0], pairs[1])
    assert est._runner is runner and runner.batch_size == 2


@pytest.mark.parametrize("kernels", [True, False], ids=["c-kernels", "no-compiler"])
def test_auto_on_cpu_takes_torch_farneback_only_with_its_c_kernels(monkeypatch, kernels):
    monkeypatch.setattr(api, "farneback_kernels_built", lambda: kernels)
    assert resolve_backend("farneback", "auto", torch.device("cpu")) == ("torch" if kernels else "opencv")
    assert resolve_backend("tvl1", "auto", torch.device("cpu")) == "torch"


def test_torch_farneback_sees_opencvs_grey_levels_of_rgb_frames():
    # The same uint8 RGB frames through either backend: the same integer grey levels, so the same
    # flow (unrounded levels moved it by up to 1.5 px on real clips).
    prev, nxt, _ = synthetic_pairs(2, 48, 64, seed=3, max_px=2.0)
    rng = np.random.default_rng(0)
    tint = rng.integers(-20, 21, (1, 1, 1, 3))
    to_rgb = lambda g: np.clip(g[..., None].astype(int) + tint, 0, 255).astype(np.uint8)  # noqa: E731
    prev_rgb, nxt_rgb = to_rgb(prev), to_rgb(nxt)
    ours = estimate(prev_rgb, nxt_rgb, "farneback", "torch", "cpu")
    theirs = estimate(prev_rgb, nxt_rgb, "farneback", "opencv", "cpu")
    assert np.abs(ours - theirs).max() < 1e-5
    # TV-L1 keeps the unrounded levels (its solve is not OpenCV's; rounding would only lose detail).
    est = FlowEstimator("tvl1", "torch", "cpu", **FAST_TVL1)
    grey = est._grey(torch.from_numpy(prev_rgb))
    assert not torch.equal(grey, grey.round())
