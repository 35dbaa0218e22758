"""Solving a batch of image pairs on every CPU core: chunks of pairs on worker threads, one intra-op thread each.

The flow solvers run many short elementwise kernels per iteration. Splitting each kernel over the
cores (torch's intra-op threads) pays an OpenMP barrier per kernel, ruinous on a shared 2-core box
(TV-L1 at 224 x 224 with other work running: 0.16-0.43 pairs/s on 2 intra-op threads vs 1.75-2.23
on 1). Solving different pairs on different threads, each kernel on one thread, keeps every core
busy without barriers. Eager torch kernels release the GIL while they run, so the threads scale as
long as each kernel outweighs its Python dispatch: two or more pairs of 224 x 224 per chunk do,
single pairs less well (TV-L1, 2 threads: 5.6 pairs/s with chunks of 2-4 pairs, 3.7-5.2 with 1).

`torch.set_num_threads` sets the calling OS thread's OpenMP count, and also the default a thread
picks up at its first parallel op: every worker sets its own count, and the caller's is restored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from flow.devices import cpu_count


@contextlib.contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run with `count` intra-op CPU threads in this OS thread (None: leave them), restoring them after."""
    before = torch.get_num_threads()
    if count is None or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_count(device: torch.device, pairs: int) -> int:
    """Threads for `pairs` pairs on `device`: 1 off the CPU; on it the usable cores, one per pair at most.

    The intra-op thread setting caps it, so a process told to use one thread (torchrun's default
    OMP_NUM_THREADS=1 for several processes per machine, `torch.set_num_threads(1)`) stays on one.
    """
    if device.type != "cpu":
        return 1  # an accelerator takes the whole batch in one call
    return max(1, min(cpu_count(), torch.get_num_threads(), pairs))


def chunk_bounds(pairs: int, workers: int, max_chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive chunks covering `pairs`, at most `max_chunk` each, in order.

    With several workers the batch is cut into at least two chunks per worker, so that a worker
    whose pairs converged early takes the next chunk instead of waiting for the slowest one.
    """
    if pairs < 0 or workers < 1 or max_chunk < 1:
        raise ValueError(f"chunk_bounds needs pairs >= 0, workers >= 1, max_chunk >= 1; got {pairs}, {workers}, {max_chunk}")
    per_chunk = max_chunk if workers == 1 else max(1, min(max_chunk, math.ceil(pairs / (2 * workers))))
    return [(start, min(start + per_chunk, pairs)) for start in range(0, pairs, per_chunk)]


def map_pairs(fn: Callable[[Tensor, Tensor], Tensor], prev: Tensor, nxt: Tensor, max_chunk: int, workers: int | None = None) -> Tensor:
    """`fn` on consecutive chunks of the pairs, spread over `workers` threads, results concatenated in order.

    Each call of `fn` runs with one intra-op thread and the caller's grad and inference modes
    (both are thread-local). `fn` must treat its pairs independently, so that the result does not
    depend on how the batch was cut; `workers` defaults to `worker_count(prev.device, N)`.

    Shape:
        prev, nxt (N, ...) -> fn's output for all N pairs, (N, ...)
    """
    n = prev.shape[0]
    workers = worker_count(prev.device, n) if workers is None else workers
    bounds = chunk_bounds(n, workers, max_chunk)
    if not bounds:
        return fn(prev, nxt)  # an empty batch: fn knows its output shape
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def solve(bound: tuple[int, int]) -> Tensor:
        start, stop = bound
        with intra_op_threads(1), torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(prev[start:stop], nxt[start:stop])

    workers = min(workers, len(bounds))
    # The caller drops to one thread too: a worker started now takes that as its default, and the
    # concatenation below stays off the OpenMP pool.
    with intra_op_threads(1):
        if workers == 1:
            outputs = [solve(bound) for bound in bounds]
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="pairs") as pool:
                outputs = list(pool.map(solve, bounds))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
