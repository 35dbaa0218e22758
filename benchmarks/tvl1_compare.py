"""TV-L1: the batched PyTorch solver vs OpenCV's DualTVL1, accuracy and speed side by side in one run.

    python benchmarks/tvl1_compare.py [--device cpu|cuda] [--batch-sizes 1 8 32] [--pairs 32]
        [--size 224] [--mode auto|compiled|eager] [--chairs DIR] [--skip-chairs]
        [--no-compaction] [--repeats 1]

Both use OpenCV's default parameters. Accuracy: mean end-point error on synthetic_pairs(8, 224, 224)
and on the FlyingChairs pairs in --chairs (default ../shared/data/flyingchairs from the repo root,
skipped with a note when absent). Speed: pairs/s on --pairs synthetic pairs of --size, the torch
solver in batches of each --batch-sizes value, OpenCV one pair at a time with its own threads.
`--mode compiled` compiles the fused steps before timing (what a long extraction run reaches),
`eager` never compiles, `auto` keeps the library's policy. Compilation time is printed apart.
On CUDA try e.g. `--device cuda --batch-sizes 64 256 1024 --pairs 2048 --skip-opencv-speed`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flow.tvl1 as tvl1_module  # noqa: E402
from flow.groundtruth import epe, flyingchairs_pairs, synthetic_pairs  # noqa: E402
from flow.tvl1 import TVL1Params, tvl1  # noqa: E402

UNIQUE_PAIRS = 64  # speed runs tile this many distinct pairs up to --pairs


def opencv_flow(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    algo = cv2.optflow.DualTVL1OpticalFlow_create()
    return np.stack([algo.calc(a, b, None) for a, b in zip(prev, nxt, strict=True)])


def torch_flow(prev: np.ndarray, nxt: np.ndarray, device: torch.device, batch: int) -> np.ndarray:
    p, n = (torch.from_numpy(np.ascontiguousarray(a)).to(device).float() for a in (prev, nxt))
    out = [tvl1(p[i : i + batch], n[i : i + batch]) for i in range(0, len(p), batch)]
    return torch.cat(out).cpu().numpy()


def timed(fn, device: torch.device | None = None) -> tuple[float, object]:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def mean_epe(flows: np.ndarray, gts) -> float:
    return float(np.mean([epe(f, g) for f, g in zip(flows, gts, strict=True)]))


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the torch solver")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--pairs", type=int, default=32, help="pairs per speed run")
    ap.add_argument("--size", type=int, default=224, help="side of the square speed pairs")
    ap.add_argument("--mode", choices=["auto", "compiled", "eager"], default="compiled")
    ap.add_argument("--chairs", default=str(ROOT.parent / "shared" / "data" / "flyingchairs"))
    ap.add_argument("--skip-chairs", action="store_true", help="skip the FlyingChairs accuracy run")
    ap.add_argument("--skip-opencv-speed", action="store_true", help="time the torch solver only")
    ap.add_argument("--no-compaction", action="store_true", help="keep converged pairs in the batch (masked only)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row; the best is kept")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device here")
    if args.mode == "eager":
        os.environ["TWOSTREAM_NO_COMPILE"] = "1"
    elif args.mode == "compiled":
        tvl1_module._CPU_COMPILE_AFTER = 0
    if args.no_compaction:
        tvl1_module._COMPACT_FROZEN = 2.0
    print(
        f"torch {torch.__version__} on {device} (mode {args.mode}; on a CPU the pairs spread over the cores, 1 intra-op thread each), "
        f"compaction {'off' if args.no_compaction else 'on'}; OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads); "
        f"params {TVL1Params()}"
    )

    # Compilation (or eager warm-up) before anything is timed.
    warm_prev, warm_nxt, _ = synthetic_pairs(2, args.size, args.size, seed=999)
    seconds, _ = timed(lambda: torch_flow(warm_prev, warm_nxt, device, 2), device)
    print(f"warm-up (includes compilation when compiled): {seconds:.1f} s")

    print("\naccuracy: mean EPE in px (lower is better)")
    prev, nxt, gt = synthetic_pairs(8, 224, 224)
    print(f"  synthetic 8 x 224x224   torch {mean_epe(torch_flow(prev, nxt, device, 8), gt):.4f}   opencv {mean_epe(opencv_flow(prev, nxt), gt):.4f}")
    chairs = Path(args.chairs)
    if args.skip_chairs:
        print("  FlyingChairs            skipped (--skip-chairs)")
    elif not chairs.is_dir() or not any(chairs.glob("*-gt.flo")):
        print(f"  FlyingChairs            skipped: no pairs in {chairs}")
    else:
        triples = flyingchairs_pairs(chairs)
        prev, nxt, gts = (np.stack(t) for t in zip(*triples, strict=True))
        t_torch, ours = timed(lambda: torch_flow(prev, nxt, device, len(prev)), device)
        t_cv, theirs = timed(lambda: opencv_flow(prev, nxt))
        h, w = prev.shape[1:]
        print(
            f"  FlyingChairs {len(prev)} x {h}x{w}  torch {mean_epe(ours, gts):.4f}   opencv {mean_epe(theirs, gts):.4f}"
            f"   ({len(prev) / t_torch:.2f} vs {len(prev) / t_cv:.2f} pairs/s)"
        )

    print(f"\nspeed: pairs/s on {args.pairs} pairs of {args.size}x{args.size} (higher is better, best of {args.repeats})")
    base_prev, base_nxt, _ = synthetic_pairs(min(args.pairs, UNIQUE_PAIRS), args.size, args.size, seed=100)
    reps = -(-args.pairs // len(base_prev))
    prev, nxt = (np.concatenate([a] * reps)[: args.pairs] for a in (base_prev, base_nxt))
    if not args.skip_opencv_speed:
        best = min(timed(lambda: opencv_flow(prev, nxt))[0] for _ in range(args.repeats))
        print(f"  opencv (one pair at a time)   {args.pairs / best:8.2f}")
    for batch in args.batch_sizes:
        best = min(timed(lambda b=batch: torch_flow(prev, nxt, device, b), device)[0] for _ in range(args.repeats))
        print(f"  torch batch {batch:<5d}             {args.pairs / best:8.2f}")


if __name__ == "__main__":
    main()
