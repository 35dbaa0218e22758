"""Running a flow estimator over many pairs in batches sized to the device, backing off on out-of-memory."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# Device bytes one pair needs per pixel inside the torch estimators' whole-batch solve: the peak
# measured with eager ops by benchmarks/flow_memory.py (TV-L1 390, Farneback 357 at 240x320; the
# compiled TV-L1 step needs fewer temporaries), plus 10% for allocator slack. An underestimate
# costs one OOM back-off, never a crash.
BYTES_PER_PIXEL = {"tvl1": 430, "farneback": 400}
CPU_BATCH = 16
MAX_BATCH = 1024


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and the CPU allocator's failure alike."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):  # MemoryError: the C kernels' allocations
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def auto_batch_size(method: str, height: int, width: int, device: torch.device) -> int:
    """Pairs per call: a fraction of the free device memory on CUDA, a fixed moderate batch on CPU."""
    if device.type != "cuda":
        return CPU_BATCH
    free, _total = torch.cuda.mem_get_info(device)
    per_pair = BYTES_PER_PIXEL[method] * height * width
    return int(max(1, min(MAX_BATCH, (free * 0.6) // per_pair)))


class BatchRunner:
    """Calls `fn(prev, nxt)` on slices of at most `batch_size` pairs; halves the batch on OOM and retries.

    The reduced size is kept for later calls, so one OOM costs one retry, not one per batch.
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.fn = fn
        self.batch_size = batch_size

    def __call__(self, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """(N, H, W) pairs -> (N, H, W, 2) flow, in order, no pair lost."""
        outputs = []
        start = 0
        while start < len(prev):
            stop = min(len(prev), start + self.batch_size)
            try:
                outputs.append(self.fn(prev[start:stop], nxt[start:stop]))
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_out_of_memory(exc) or self.batch_size == 1:
                    raise
                self.batch_size = max(1, (stop - start) // 2)
                log.warning("out of memory with %d pairs per batch; retrying with %d", stop - start, self.batch_size)
                if prev.is_cuda:
                    torch.cuda.empty_cache()
                continue
            start = stop
        return torch.cat(outputs) if outputs else prev.new_zeros((0, *prev.shape[1:], 2))
