import logging
import threading
import time

import cv2
import numpy as np
import pytest
import torch

import flow.cpu_parallel as cpu_parallel
import flow.tvl1 as tvl1_module
from flow.groundtruth import epe, synthetic_pairs, textured_image
from flow.tvl1 import TVL1, TVL1Params, tvl1

FAST = TVL1Params(nscales=2, warps=2, inner_iterations=10, outer_iterations=3)


@pytest.fixture(autouse=True)
def eager_steps(monkeypatch):
    """Every test starts from an undecided, eager process state, whatever ran before it."""
    monkeypatch.setattr(tvl1_module, "_MODE", {"cpu": "eager"})
    monkeypatch.setattr(tvl1_module, "_COMPILED", {})
    monkeypatch.setattr(tvl1_module, "_PROVEN", set())


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def _translated(height: int, width: int, dx: int, dy: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """prev and nxt with nxt(x + (dx, dy)) = prev(x): the flow is (dx, dy) everywhere."""
    m = 4
    big = textured_image(height + 2 * m, width + 2 * m, np.random.default_rng(seed))
    prev = big[m : m + height, m : m + width]
    nxt = big[m - dy : m - dy + height, m - dx : m - dx + width]
    return prev, nxt


def _opencv(prev: np.ndarray, nxt: np.ndarray, p: TVL1Params) -> np.ndarray:
    algo = cv2.optflow.DualTVL1OpticalFlow_create(
        p.tau, p.lambda_, p.theta, p.nscales, p.warps, p.epsilon, p.inner_iterations, p.outer_iterations, p.scale_step, p.gamma, p.median_filtering
    )
    return np.stack([algo.calc(a, b, None) for a, b in zip(prev, nxt, strict=True)])


def test_identical_frames_give_zero_flow():
    img = textured_image(40, 56, np.random.default_rng(1))
    frames = _t(np.stack([img, img]))
    out = tvl1(frames, frames.clone(), FAST)
    assert out.shape == (2, 40, 56, 2)
    assert out.abs().max() < 1e-3


def test_translation_is_recovered_in_the_interior():
    prev, nxt = _translated(48, 64, dx=2, dy=-1)
    out = tvl1(_t(prev)[None], _t(nxt)[None], TVL1Params(nscales=3, warps=3, outer_iterations=3))[0].numpy()
    inner = out[6:-6, 6:-6]
    assert np.abs(inner[..., 0] - 2.0).mean() < 0.05
    assert np.abs(inner[..., 1] + 1.0).mean() < 0.05


def test_epe_on_synthetic_ground_truth_matches_opencv():
    prev, nxt, gt = synthetic_pairs(2, 48, 48, seed=5)
    params = TVL1Params(nscales=3, warps=3, outer_iterations=3)
    ours = epe(tvl1(_t(prev), _t(nxt), params).numpy(), gt)
    theirs = epe(_opencv(prev, nxt, params), gt)
    assert ours <= 1.1 * theirs, (ours, theirs)
    assert ours < 0.2 * epe(np.zeros_like(gt), gt)


def test_batch_equals_pairs_one_by_one():
    # Pairs that converge at different iterations, one of them at once (identical frames): masking
    # and compaction must give each pair exactly the iterations it would get alone.
    prev, nxt, _ = synthetic_pairs(3, 32, 40, seed=11, max_px=3.0)
    prev[1] = nxt[1]
    p, n = _t(prev), _t(nxt)
    sizes = []
    step = tvl1_module._step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_parallel, "worker_count", lambda device, pairs: 1)  # the whole batch in one solve
        mp.setattr(tvl1_module, "_step", lambda *args: (sizes.append(args[0].shape[0]), step(*args))[1])
        batch = tvl1(p, n, FAST)
    assert sizes[0] == 3 and min(sizes) == 1  # converged pairs did leave the batch
    alone = torch.cat([tvl1(p[i : i + 1], n[i : i + 1], FAST) for i in range(3)])
    assert torch.allclose(batch, alone, atol=1e-5)
    # Reading the convergence flags every 4 iterations (the accelerator setting) changes nothing:
    # frozen pairs stay frozen between reads.
    sparse = tvl1_module._tvl1(p, n, FAST, sync_every=4)
    assert torch.allclose(sparse, alone, atol=1e-5)
    # CPU batches are solved a group at a time; a group boundary inside the batch changes nothing.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tvl1_module, "_CPU_GROUP_PIXELS", 2 * 32 * 40)
        assert torch.allclose(tvl1(p, n, FAST), alone, atol=1e-5)


def test_cpu_batch_is_spread_over_threads_without_changing_a_pair():
    prev, nxt, _ = synthetic_pairs(5, 32, 40, seed=12, max_px=3.0)
    p, n = _t(prev), _t(nxt)
    threads = set()
    step = tvl1_module._step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_parallel, "worker_count", lambda device, pairs: 2)
        mp.setattr(tvl1_module, "_step", lambda *args: (threads.add(threading.get_ident()), step(*args))[1])
        spread = tvl1(p, n, FAST)
    assert len(threads) == 2 and threading.get_ident() not in threads
    alone = torch.cat([tvl1(p[i : i + 1], n[i : i + 1], FAST) for i in range(5)])
    assert torch.allclose(spread, alone, atol=1e-5)


def test_convergence_stops_early_and_epsilon_matters():
    prev, nxt, gt = synthetic_pairs(1, 32, 32, seed=2)
    calls = []
    step = tvl1_module._step

    def counting(*args):
        calls.append(args[0].shape[0])
        return step(*args)

    params = TVL1Params(nscales=1, warps=1, inner_iterations=30, outer_iterations=10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tvl1_module, "_step", counting)
        tvl1(_t(prev), _t(nxt), params)
        loose = len(calls)
        calls.clear()
        tvl1(_t(prev), _t(nxt), TVL1Params(**{**params.__dict__, "epsilon": 1e-4}))
        tight = len(calls)
    assert 1 <= loose < tight <= 300


def test_cpu_solve_uses_one_thread_and_restores_the_setting():
    prev, nxt, _ = synthetic_pairs(1, 20, 20, seed=1)
    seen = []
    step = tvl1_module._step
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tvl1_module, "_step", lambda *args: (seen.append(torch.get_num_threads()), step(*args))[1])
            tvl1(_t(prev), _t(nxt), FAST)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "dtype, out_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.uint8, torch.float32), (torch.float16, torch.float16)],
)
def test_dtype_and_device_follow_input(dtype, out_dtype):
    prev, nxt = _translated(24, 32, dx=1, dy=0)
    p, n = (torch.from_numpy(np.rint(a)).to(dtype)[None] for a in (prev, nxt))
    out = tvl1(p, n, FAST)
    assert out.dtype == out_dtype and out.device == p.device and out.shape == (1, 24, 32, 2)
    assert torch.isfinite(out).all()
    assert out.is_contiguous() and not out.requires_grad and not out.is_inference()


def test_non_contiguous_inputs():
    prev, nxt, _ = synthetic_pairs(2, 24, 20, seed=4)
    p, n = _t(prev), _t(nxt)
    ref = tvl1(p, n, FAST)
    # Transposed storage, then transposed back: same values, non-contiguous strides.
    p_nc, n_nc = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (p, n))
    assert not p_nc.is_contiguous()
    assert torch.allclose(tvl1(p_nc, n_nc, FAST), ref, atol=1e-5)


def test_odd_size():
    prev, nxt, gt = synthetic_pairs(1, 97, 131, seed=7, max_px=3.0)
    out = tvl1(_t(prev), _t(nxt), TVL1Params(warps=2, inner_iterations=10, outer_iterations=3)).numpy()
    assert out.shape == (1, 97, 131, 2)
    assert epe(out, gt) < 0.15 * epe(np.zeros_like(gt), gt)


def test_small_image_uses_fewer_scales():
    prev, nxt, _ = synthetic_pairs(1, 12, 20, seed=3, max_px=1.0)
    p, n = _t(prev), _t(nxt)
    # No level can be smaller than 16 px, so asking for 5 scales is the same as asking for 1.
    assert torch.equal(tvl1(p, n, TVL1Params(nscales=5)), tvl1(p, n, TVL1Params(nscales=1)))


def test_gamma_models_a_brightness_change():
    prev, nxt = _translated(32, 40, dx=1, dy=1, seed=3)
    p, n = _t(prev)[None], _t(nxt + 8.0)[None]  # nxt is brighter by 8 grey levels
    params = TVL1Params(nscales=2, warps=3, outer_iterations=3)
    errors = {}
    for gamma in (0.0, 2.0):
        out = tvl1(p, n, TVL1Params(**{**params.__dict__, "gamma": gamma}))
        errors[gamma] = (out[0, 6:-6, 6:-6] - 1.0).abs().mean().item()
    assert errors[2.0] < 0.05 and errors[2.0] < 0.5 * errors[0.0], errors


def test_class_equals_function_and_empty_batch():
    prev, nxt, _ = synthetic_pairs(1, 24, 24, seed=8)
    est = TVL1(nscales=2, warps=2)
    assert torch.equal(est(_t(prev), _t(nxt)), tvl1(_t(prev), _t(nxt), TVL1Params(nscales=2, warps=2)))
    assert tvl1(torch.zeros(0, 5, 6), torch.zeros(0, 5, 6)).shape == (0, 5, 6, 2)


@pytest.mark.parametrize(
    "prev, nxt, message",
    [
        (torch.zeros(1, 8, 8), torch.zeros(1, 8, 9), "differ in shape"),
        (torch.zeros(8, 8), torch.zeros(8, 8), r"\(N, H, W\)"),
        (np.zeros((1, 8, 8)), np.zeros((1, 8, 8)), "torch tensors"),
    ],
)
def test_bad_inputs_raise(prev, nxt, message):
    with pytest.raises(ValueError, match=message):
        tvl1(prev, nxt)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"scale_step": 1.0}, "scale_step"),
        ({"median_filtering": 4}, "odd"),
        ({"warps": 0}, "warps"),
        ({"tau": -1.0}, "tau"),
        ({"lambda": 0.1}, "unknown TV-L1 parameter"),
    ],
)
def test_bad_params_raise(params, message):
    with pytest.raises(ValueError, match=message):
        TVL1(**params)


class TestFusion:
    @pytest.fixture
    def undecided(self, monkeypatch):
        monkeypatch.setattr(tvl1_module, "_MODE", {})
        monkeypatch.setattr(tvl1_module, "_COMPILE_MIN_PIXELS", 0)
        monkeypatch.setattr(tvl1_module, "_CPU_COMPILE_AFTER", 0)
        monkeypatch.delenv("TWOSTREAM_NO_COMPILE", raising=False)

    def test_env_var_forces_eager(self, undecided, monkeypatch, caplog):
        monkeypatch.setenv("TWOSTREAM_NO_COMPILE", "1")
        with caplog.at_level(logging.INFO, logger="flow.tvl1"):
            assert not tvl1_module._use_compiled(torch.device("cpu"))
        assert "TWOSTREAM_NO_COMPILE" in caplog.text

    def test_small_cpu_runs_stay_eager_until_worth_compiling(self, undecided, monkeypatch):
        monkeypatch.setattr(tvl1_module, "_CPU_COMPILE_AFTER", 10_000)
        monkeypatch.setattr(tvl1_module, "_SOLVED", {})
        assert not tvl1_module._use_compiled(torch.device("cpu"))
        assert "cpu" not in tvl1_module._MODE  # undecided, not decided against
        tvl1_module._count_work(torch.device("cpu"), 10_000)
        assert tvl1_module._use_compiled(torch.device("cpu"))

    def test_compiled_path_gives_the_eager_result(self, undecided, monkeypatch):
        # An identity "compiler" runs the wrapper the compiled path uses (unbacked batch size,
        # no duck sizing) without paying for a real compilation in a unit test.
        prev, nxt, _ = synthetic_pairs(2, 20, 24, seed=6)
        monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
        fused = tvl1(_t(prev), _t(nxt), FAST)
        assert {key[0] for key in tvl1_module._PROVEN} == {"step", "median_columns", "median_pairs", "median_windows"}
        monkeypatch.setattr(tvl1_module, "_MODE", {"cpu": "eager"})
        assert torch.equal(fused, tvl1(_t(prev), _t(nxt), FAST))

    def test_compiler_failure_falls_back_to_eager(self, undecided, monkeypatch, caplog):
        prev, nxt, _ = synthetic_pairs(2, 20, 24, seed=6)

        def broken(fn, **kwargs):
            def run(*args):
                raise RuntimeError("no C++ compiler")

            return run

        monkeypatch.setattr(torch, "compile", broken)
        with caplog.at_level(logging.WARNING, logger="flow.tvl1"):
            out = tvl1(_t(prev), _t(nxt), FAST)
        assert tvl1_module._MODE["cpu"] == "eager"
        assert "torch.compile failed" in caplog.text and "no C++ compiler" in caplog.text
        assert torch.equal(out, tvl1(_t(prev), _t(nxt), FAST))

    def test_threads_compile_one_at_a_time_then_run_in_parallel(self, undecided, monkeypatch):
        prev, nxt, _ = synthetic_pairs(4, 20, 24, seed=6)
        lock = threading.Lock()
        running = {"first": 0, "any": 0}
        most = {"first": 0, "any": 0}

        def slow_identity_compiler(fn, **kwargs):
            proven = []  # non-empty once a call of this "compiled" function has returned

            def run(*args):
                kinds = ("any",) if proven else ("any", "first")
                with lock:
                    for kind in kinds:
                        running[kind] += 1
                        most[kind] = max(most[kind], running[kind])
                time.sleep(0.002 if proven else 0.2)  # a slow first call ("compilation"): the other worker arrives
                try:
                    return fn(*args)
                finally:
                    with lock:
                        for kind in kinds:
                            running[kind] -= 1
                    proven.append(True)

            return run

        monkeypatch.setattr(torch, "compile", slow_identity_compiler)
        monkeypatch.setattr(cpu_parallel, "worker_count", lambda device, pairs: 2)
        duck_before = torch.fx.experimental._config.use_duck_shape
        out = tvl1(_t(prev), _t(nxt), FAST)
        assert most == {"first": 1, "any": 2}
        assert torch.fx.experimental._config.use_duck_shape == duck_before
        monkeypatch.setattr(tvl1_module, "_MODE", {"cpu": "eager"})
        assert torch.equal(out, tvl1(_t(prev), _t(nxt), FAST))
