"""Peak memory per pixel of the torch flow estimators' whole-batch solve, the figure behind
flow/batching.py's BYTES_PER_PIXEL (how many pairs fit in a device's free memory).

    python benchmarks/flow_memory.py                      # eager ops on the CPU, both methods
    python benchmarks/flow_memory.py --device cuda        # the CUDA allocator's peak

It runs the batch the way an accelerator does (all pairs in one solve, eager ops: the compiled
step only needs fewer temporaries) and reports (peak - baseline) / (pairs x H x W). On the CPU
the peak is the process's resident set, each method measured in a fresh process with glibc
returning freed blocks at once, so an earlier row's heap does not hide this one's.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys

_ENV = {"TWOSTREAM_NO_COMPILE": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


def measure(method: str, pairs: int, height: int, width: int, device: str) -> float:
    """Bytes per pixel of one whole-batch solve of `pairs` synthetic pairs on `device`."""
    import torch

    from flow.farneback import FarnebackParams, _farneback_batch
    from flow.groundtruth import synthetic_pairs
    from flow.tvl1 import TVL1Params, _solve

    dev = torch.device(device)
    solve = {"farneback": lambda a, b: _farneback_batch(a, b, FarnebackParams()),
             "tvl1": lambda a, b: _solve(a, b, TVL1Params(), 10)}[method]
    p, q, _ = synthetic_pairs(pairs, height, width, seed=0, max_px=4.0)
    prev, nxt = (torch.from_numpy(x).float().to(dev) for x in (p, q))
    with torch.inference_mode():
        solve(prev[:1, :64, :64], nxt[:1, :64, :64])  # warm-up: libraries and caches loaded
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        solve(prev, nxt)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - base) / (pairs * height * width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="tvl1,farneback")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--size", default="240x320", help="HxW")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    args = parser.parse_args()
    from flow.batching import BYTES_PER_PIXEL

    if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", args.size):
        parser.error(f"--size must be HxW, e.g. 240x320, got {args.size!r}")
    unknown = [m for m in args.methods.split(",") if m not in BYTES_PER_PIXEL]
    if unknown:
        parser.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(BYTES_PER_PIXEL)}")
    height, width = (int(v) for v in args.size.split("x"))
    if args.one:
        print(f"{measure(args.one, args.pairs, height, width, args.device):.0f}")
        return
    print(f"{args.pairs} pairs of {height}x{width} on {args.device}, one solve, eager ops")
    print(f"{'method':10s} {'B/px measured':>14s} {'BYTES_PER_PIXEL':>16s}")
    for method in args.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", method, "--pairs", str(args.pairs), "--size",
                              args.size, "--device", args.device], env={**os.environ, **_ENV},
                             capture_output=True, text=True, check=True)
        print(f"{method:10s} {out.stdout.strip():>14s} {BYTES_PER_PIXEL[method]:>16d}")


if __name__ == "__main__":
    main()
