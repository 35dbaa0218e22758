"""Optical-flow benchmark: every method x backend, sizes x batch sizes, speed, memory and accuracy.

    python benchmarks/flow_bench.py                       # CPU rows, OpenCV in the same run
    python benchmarks/flow_bench.py --device cuda         # GPU rows + GPU-vs-CPU agreement
    python benchmarks/flow_bench.py --quick               # 224x224 only, batch 1 and 8

Speed: pairs/s over `--pairs` synthetic pairs per row (after a warm-up call of the same shape, so
compilation is not timed; the best of `--repeats` runs), peak memory (CUDA: max allocated; CPU:
process peak RSS). Accuracy: mean end-point error on synthetic ground truth (a textured image
warped by a known smooth field, flow/groundtruth.py) at each size, and on the FlyingChairs pairs
when the folder is present.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flow.api import FlowEstimator  # noqa: E402
from flow.devices import cpu_count, resolve_device  # noqa: E402
from flow.groundtruth import epe, flyingchairs_pairs, synthetic_pairs  # noqa: E402

PUBLISHED_GPU_TVL1 = (14, 45)  # pairs/s reported by OpenCV-CUDA TV-L1 / denseflow at about 224x224


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]  # type: ignore[misc]


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _time(est: FlowEstimator, prev, nxt, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    est(prev, nxt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def bench_rows(args, device: torch.device) -> list[dict]:
    rows = []
    chairs = flyingchairs_pairs(args.flyingchairs) if Path(args.flyingchairs).is_dir() else []
    for method in args.methods.split(","):
        for backend in args.backends.split(","):
            if backend == "opencv" and device.type != "cpu":
                continue
            for h, w in _sizes(args.sizes):
                n_acc = args.accuracy_pairs
                prev, nxt, gt = synthetic_pairs(max(args.pairs, n_acc), h, w, seed=100)
                est = FlowEstimator(method, backend, device, batch_size=max(1, n_acc))
                acc = epe(est(prev[:n_acc], nxt[:n_acc]), gt[:n_acc])
                for batch in [int(b) for b in args.batches.split(",")]:
                    if backend == "opencv" and batch != 1:
                        continue  # OpenCV has no batch: one pair per core (threads), timed once
                    est = FlowEstimator(method, backend, device, batch_size=batch)
                    n = max(args.pairs, batch) if backend == "torch" else max(args.pairs, cpu_count())
                    n = min(n, len(prev))
                    est(prev[: min(batch, n)], nxt[: min(batch, n)])  # warm-up: compile, thread pools
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    seconds = min(_time(est, prev[:n], nxt[:n], device) for _ in range(args.repeats))
                    rows.append({"method": method, "backend": est.backend, "device": str(device), "size": f"{h}x{w}",
                                 "batch": batch if backend == "torch" else f"{cpu_count()} thr", "pairs_s": n / seconds,
                                 "peak_mb": _peak_mb(device), "epe_synth": acc})
                    print(_fmt(rows[-1]), flush=True)
            if chairs:
                est = FlowEstimator(method, backend, device, batch_size=len(chairs))
                errs = [epe(est(p[None], q[None])[0], g) for p, q, g in chairs]
                rows.append({"method": method, "backend": est.backend, "device": str(device), "size": "FlyingChairs",
                             "epe_chairs": float(np.mean(errs))})
                print(_fmt(rows[-1]), flush=True)
    return rows


def agreement(args, device: torch.device) -> None:
    """The same pairs on the GPU and on the CPU: mean |difference| and EPE of each against ground truth."""
    prev, nxt, gt = synthetic_pairs(4, 224, 224, seed=7)
    for method in args.methods.split(","):
        gpu = FlowEstimator(method, "torch", device)(prev, nxt)
        cpu = FlowEstimator(method, "torch", "cpu")(prev, nxt)
        diff = np.abs(gpu - cpu)
        print(f"GPU vs CPU {method:9s}: mean |diff| {diff.mean():.4f} px, max {diff.max():.3f} px; "
              f"EPE gpu {epe(gpu, gt):.4f} cpu {epe(cpu, gt):.4f}")


def _fmt(r: dict) -> str:
    if "epe_chairs" in r:
        return f"{r['method']:9s} {r['backend']:6s} {r['device']:7s} {r['size']:>12s} {'':>8s} {'':>9s} {'':>9s} {'':>9s} {r['epe_chairs']:10.3f}"
    return (f"{r['method']:9s} {r['backend']:6s} {r['device']:7s} {r['size']:>12s} {r['batch']!s:>8s} "
            f"{r['pairs_s']:9.1f} {r['peak_mb']:9.0f} {r['epe_synth']:9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="tvl1,farneback")
    ap.add_argument("--backends", default="torch,opencv")
    ap.add_argument("--sizes", default="224x224,240x320,436x1024")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--pairs", type=int, default=8, help="pairs timed per row (at least the batch)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed runs per row, the fastest kept (steadier figures on a shared machine)")
    ap.add_argument("--accuracy-pairs", type=int, default=4, help="synthetic pairs for the EPE column")
    ap.add_argument("--flyingchairs", default=str(ROOT.parent / "shared" / "data" / "flyingchairs"))
    ap.add_argument("--quick", action="store_true", help="224x224 only, batches 1 and 8")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.quick:
        args.sizes, args.batches = "224x224", "1,8"
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {cpu_count()} cores"
    print(f"torch {torch.__version__} on {name}")
    print(f"{'method':9s} {'backend':6s} {'device':7s} {'size':>12s} {'batch':>8s} {'pairs/s':>9s} {'peak MB':>9s} "
          f"{'EPE synth':>9s} {'EPE chairs':>10s}")
    bench_rows(args, device)
    if device.type == "cuda":
        agreement(args, device)
        print(f"published GPU TV-L1 tools: {PUBLISHED_GPU_TVL1[0]}-{PUBLISHED_GPU_TVL1[1]} pairs/s")


if __name__ == "__main__":
    main()
