"""Farneback: batched PyTorch (flow/farneback.py) against cv2.calcOpticalFlowFarneback, same parameters.

    python benchmarks/farneback_compare.py                  # CPU: accuracy + pairs/s at 224x224
    python benchmarks/farneback_compare.py --device cuda    # torch on the GPU, OpenCV on the CPU
    python benchmarks/farneback_compare.py --threads 1      # one core for both (fairer on a busy box)

Accuracy: mean end-point error against ground truth on synthetic pairs (a texture warped by a known
smooth field, flow/groundtruth.py) and on the FlyingChairs pairs when the folder is present, for
both parameter sets in common use: the tutorial set (0.5, 3, 15, 3, 5, 1.2, 0), FarnebackParams'
defaults, and cv2.FarnebackOpticalFlow_create()'s (0.5, 5, 13, 10, 5, 1.1, 0). Also the mean
per-pixel gap between the two implementations. Speed: pairs/s at --size for each torch batch size,
next to OpenCV one pair at a time and OpenCV with one pair per core in a thread pool, all measured
in this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flow.farneback import FarnebackParams, farneback  # noqa: E402
from flow.groundtruth import epe, flyingchairs_pairs, synthetic_pairs  # noqa: E402

PRESETS = {
    "tutorial": FarnebackParams(),
    "create": FarnebackParams(levels=5, winsize=13, iterations=10, poly_sigma=1.1),
}


def cv2_pairs(prev: np.ndarray, nxt: np.ndarray, params: FarnebackParams) -> np.ndarray:
    args = dataclasses.astuple(params)
    return np.stack([cv2.calcOpticalFlowFarneback(p, n, None, *args) for p, n in zip(prev, nxt)])


def torch_pairs(prev: np.ndarray, nxt: np.ndarray, params: FarnebackParams, device: torch.device) -> np.ndarray:
    with torch.inference_mode():
        out = farneback(torch.from_numpy(prev).to(device).float(), torch.from_numpy(nxt).to(device).float(), params)
    return out.cpu().numpy()


def accuracy_rows(triples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], device: torch.device) -> list[tuple]:
    """(preset, EPE torch, EPE cv2, mean |torch - cv2|) over pairs of any sizes, one pair at a time."""
    rows = []
    for name, params in PRESETS.items():
        ours, theirs, gap = [], [], []
        for prev, nxt, gt in triples:
            f_t = torch_pairs(prev[None], nxt[None], params, device)[0]
            f_c = cv2_pairs(prev[None], nxt[None], params)[0]
            ours.append(epe(f_t, gt))
            theirs.append(epe(f_c, gt))
            gap.append(float(np.abs(f_t - f_c).mean()))
        rows.append((name, float(np.mean(ours)), float(np.mean(theirs)), float(np.mean(gap))))
    return rows


def _rate(run, pairs_per_call: int, seconds: float, sync=lambda: None) -> float:
    """Pairs per second of `run`, after one untimed warm-up call, over at least `seconds`."""
    run()
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * pairs_per_call / elapsed


def speed_rows(args, params: FarnebackParams, device: torch.device) -> list[tuple[str, float]]:
    pool = max(int(b) for b in args.batches.split(","))
    prev, nxt, _ = synthetic_pairs(pool, args.size, args.size, seed=100)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t_prev = torch.from_numpy(prev).to(device).float()
    t_nxt = torch.from_numpy(nxt).to(device).float()
    rows = []
    args_cv = dataclasses.astuple(params)
    one = lambda i: cv2.calcOpticalFlowFarneback(prev[i], nxt[i], None, *args_cv)  # noqa: E731
    rows.append(("opencv, one pair at a time", _rate(lambda: [one(i) for i in range(pool)], pool, args.seconds)))
    cores = os.cpu_count() or 1
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one single-threaded pair per core, as flow.opencv_backend runs it
    with ThreadPoolExecutor(cores) as ex:
        rate = _rate(lambda: list(ex.map(one, range(pool))), pool, args.seconds)
    cv2.setNumThreads(threads)
    rows.append((f"opencv, {cores} pairs at once (thread pool)", rate))
    with torch.inference_mode():
        for batch in (int(b) for b in args.batches.split(",")):
            run = lambda: [farneback(t_prev[i : i + batch], t_nxt[i : i + batch], params) for i in range(0, pool, batch)]  # noqa: E731
            rows.append((f"torch {device.type}, batch {batch}", _rate(run, pool, args.seconds, sync)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=224, help="side of the square pairs timed")
    ap.add_argument("--batches", default="1,8,32", help="torch batch sizes timed")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timing per row")
    ap.add_argument("--synthetic", type=int, default=8, help="synthetic pairs for the accuracy rows")
    ap.add_argument("--preset", default="tutorial", choices=sorted(PRESETS), help="parameter set timed")
    ap.add_argument("--threads", type=int, default=0, help="torch and OpenCV threads (0: leave as is)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flyingchairs"), help="FlyingChairs folder")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads), {os.cpu_count()} cores, torch on {device}")

    synthetic = list(zip(*synthetic_pairs(args.synthetic, args.size, args.size)))
    sets = [(f"synthetic {args.synthetic} x {args.size}x{args.size}", synthetic)]
    if Path(args.data).is_dir():
        sets.append((f"FlyingChairs ({args.data})", flyingchairs_pairs(args.data)))
    else:
        print(f"note: no FlyingChairs folder at {args.data}; its rows are skipped")
    print("\nmean EPE (px) against ground truth, same parameters for both")
    print(f"{'pairs':<48} {'preset':<9} {'torch':>9} {'opencv':>9} {'|torch-cv|':>11}")
    for label, triples in sets:
        for preset, ours, theirs, gap in accuracy_rows(triples, device):
            print(f"{label:<48} {preset:<9} {ours:9.4f} {theirs:9.4f} {gap:11.2e}")

    params = PRESETS[args.preset]
    print(f"\npairs/s at {args.size}x{args.size}, preset {args.preset} {dataclasses.astuple(params)}")
    rows = speed_rows(args, params, device)
    sequential = rows[0][1]
    for label, rate in rows:
        print(f"{label:<48} {rate:8.1f} pairs/s  {rate / sequential:5.2f}x opencv one-at-a-time  {rate / rows[1][1]:5.2f}x pool")


if __name__ == "__main__":
    main()
