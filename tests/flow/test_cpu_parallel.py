import threading

import pytest
import torch

import flow.cpu_parallel as cpu_parallel
from flow.cpu_parallel import chunk_bounds, intra_op_threads, map_pairs, worker_count


@pytest.fixture
def two_threads():
    """Two intra-op threads in the calling thread for the test, whatever the machine has."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "pairs, workers, max_chunk, expected",
    [
        (0, 2, 8, []),
        (5, 1, 8, [(0, 5)]),
        (20, 1, 8, [(0, 8), (8, 16), (16, 20)]),
        (8, 2, 8, [(0, 2), (2, 4), (4, 6), (6, 8)]),  # two chunks per worker
        (3, 2, 8, [(0, 1), (1, 2), (2, 3)]),
        (64, 2, 8, [(i, i + 8) for i in range(0, 64, 8)]),  # capped by max_chunk
    ],
)
def test_chunk_bounds_cover_the_batch_in_order(pairs, workers, max_chunk, expected):
    assert chunk_bounds(pairs, workers, max_chunk) == expected


@pytest.mark.parametrize("pairs, workers, max_chunk", [(-1, 1, 1), (4, 0, 1), (4, 1, 0)])
def test_chunk_bounds_reject_bad_arguments(pairs, workers, max_chunk):
    with pytest.raises(ValueError, match="chunk_bounds needs"):
        chunk_bounds(pairs, workers, max_chunk)


def test_worker_count_is_cores_on_cpu_and_one_elsewhere(monkeypatch):
    monkeypatch.setattr(cpu_parallel, "cpu_count", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert worker_count(torch.device("cpu"), 16) == 4
    assert worker_count(torch.device("cpu"), 3) == 3  # never more threads than pairs
    assert worker_count(torch.device("cpu"), 0) == 1
    assert worker_count(torch.device("cuda", 0), 16) == 1
    assert worker_count(torch.device("meta"), 16) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # e.g. OMP_NUM_THREADS=1 under torchrun
    assert worker_count(torch.device("cpu"), 16) == 1


def test_intra_op_threads_sets_and_restores(two_threads):
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with intra_op_threads(None):
        assert torch.get_num_threads() == 2


def _per_pair(prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """A pairwise function whose output would show a wrong order or a lost pair."""
    return torch.stack((prev - nxt, prev * nxt), -1).sum((1, 2))  # (N, 2)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_map_pairs_equals_one_call(workers):
    prev, nxt = torch.randn(11, 6, 5), torch.randn(11, 6, 5)
    assert torch.equal(map_pairs(_per_pair, prev, nxt, max_chunk=4, workers=workers), _per_pair(prev, nxt))


def test_map_pairs_spreads_chunks_over_threads_with_one_intra_op_thread_each(two_threads):
    seen: list[tuple[int, int, int]] = []
    lock = threading.Lock()
    both_running = threading.Barrier(2, timeout=10)

    def record(prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        with lock:
            seen.append((threading.get_ident(), torch.get_num_threads(), prev.shape[0]))
        both_running.wait()  # fails unless two chunks run at the same time
        return _per_pair(prev, nxt)

    prev, nxt = torch.randn(4, 3, 3), torch.randn(4, 3, 3)
    out = map_pairs(record, prev, nxt, max_chunk=2, workers=2)
    assert torch.equal(out, _per_pair(prev, nxt))
    assert len({ident for ident, _, _ in seen}) == 2
    assert {threads for _, threads, _ in seen} == {1}
    assert sorted(size for *_, size in seen) == [1, 1, 1, 1]
    assert torch.get_num_threads() == 2  # the caller's setting is back


def test_map_pairs_keeps_the_callers_autograd_modes():
    modes = []

    def record(prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        return _per_pair(prev, nxt)

    prev, nxt = torch.randn(4, 3, 3), torch.randn(4, 3, 3)
    with torch.inference_mode():
        map_pairs(record, prev, nxt, max_chunk=1, workers=2)
    assert set(modes) == {(False, True)}
    modes.clear()
    with torch.no_grad():
        map_pairs(record, prev, nxt, max_chunk=1, workers=2)
    assert set(modes) == {(False, False)}
    modes.clear()
    map_pairs(record, prev, nxt, max_chunk=1, workers=2)
    assert set(modes) == {(True, False)}


def test_map_pairs_empty_batch_and_worker_errors():
    empty = torch.zeros(0, 3, 3)
    assert map_pairs(_per_pair, empty, empty, max_chunk=2).shape == (0, 2)

    def failing(prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        if prev.shape[0] and float(prev[0, 0, 0]) == 3.0:
            raise RuntimeError("pair 3 failed")
        return _per_pair(prev, nxt)

    prev = torch.arange(6.0).view(6, 1, 1).expand(6, 3, 3).contiguous()
    with pytest.raises(RuntimeError, match="pair 3 failed"):
        map_pairs(failing, prev, prev, max_chunk=1, workers=2)
