"""Farneback: batched PyTorch (flow/farneback.py) against cv2.calcOpticalFlowFarneback, same params.

    python benchmarks/farneback_compare.py                  # CPU: accuracy + pairs/s at 224x224
    python benchmarks/farneback_compare.py --device cuda    # torch on the GPU, OpenCV on the CPU
    python benchmarks/farneback_compare.py --threads 1      # one core each (steadier on a busy box)
    python benchmarks/farneback_compare.py --perturb 5      # + FlyingChairs with 5 noise draws

Accuracy: mean end-point error against ground truth on synthetic pairs (a texture warped by a known
smooth field, flow/groundtruth.py) and on the FlyingChairs pairs when the folder is present, for
both parameter sets in common use: the tutorial set (0.5, 3, 15, 3, 5, 1.2, 0), FarnebackParams'
defaults, and cv2.FarnebackOpticalFlow_create()'s (0.5, 5, 13, 10, 5, 1.1, 0). Also the mean
and largest per-pixel gap between the two implementations; --per-pair lists them for each
FlyingChairs pair. Where the 2x2 systems are near-singular (flat or saturated regions, aperture
problems) the flow follows rounding residues, so any rounding that differs from OpenCV's shows up
as pixels of difference there; flow/farneback.py rounds as OpenCV does, which keeps the gap at
float-rounding level. --perturb K adds rows over K copies with N(0, 0.5) grey-level noise.

Speed: pairs/s at --size for each torch batch size, next to OpenCV one pair at a time and OpenCV
with one pair per core in a thread pool, interleaved in rounds within this one run (best round
kept), with the process CPU time per pair beside each rate (on a busy machine the steadier figure).
On a CPU flow/farneback.py runs each op on one thread and spreads the pairs over
torch.get_num_threads() threads, as the OpenCV pool does; --threads sets both.
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

from flow import _farneback_native  # noqa: E402
from flow.farneback import FarnebackParams, farneback  # noqa: E402
from flow.groundtruth import epe, flyingchairs_pairs, synthetic_pairs  # noqa: E402

PRESETS = {
    "tutorial": FarnebackParams(),
    "create": FarnebackParams(levels=5, winsize=13, iterations=10, poly_sigma=1.1),
}


def cv2_pairs(prev: np.ndarray, nxt: np.ndarray, params: FarnebackParams) -> np.ndarray:
    args = dataclasses.astuple(params)
    return np.stack([cv2.calcOpticalFlowFarneback(p, n, None, *args) for p, n in zip(prev, nxt)])


def torch_pairs(
    prev: np.ndarray, nxt: np.ndarray, params: FarnebackParams, device: torch.device
) -> np.ndarray:
    with torch.inference_mode():
        out = farneback(
            torch.from_numpy(prev).to(device).float(),
            torch.from_numpy(nxt).to(device).float(),
            params,
        )
    return out.cpu().numpy()


def pair_rows(
    triples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    params: FarnebackParams,
    device: torch.device,
) -> list[tuple[float, float, float, float]]:
    """Per pair: (EPE torch, EPE cv2, mean |torch - cv2|, max |torch - cv2|), one at a time."""
    rows = []
    for prev, nxt, gt in triples:
        f_t = torch_pairs(prev[None], nxt[None], params, device)[0]
        f_c = cv2_pairs(prev[None], nxt[None], params)[0]
        gap = np.abs(f_t - f_c)
        rows.append((epe(f_t, gt), epe(f_c, gt), float(gap.mean()), float(gap.max())))
    return rows


def accuracy_rows(
    triples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], device: torch.device
) -> list[tuple]:
    """(preset, EPE torch, EPE cv2, mean |torch - cv2|, max |torch - cv2|, the pair_rows they
    summarise) over pairs."""
    rows = []
    for name, params in PRESETS.items():
        per_pair = pair_rows(triples, params, device)
        table = np.array(per_pair)
        ours, theirs, gap = table[:, :3].mean(0)
        rows.append((name, float(ours), float(theirs), float(gap), float(table[:, 3].max()), per_pair))
    return rows


def _noisy(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (img + rng.normal(0.0, 0.5, img.shape)).astype(np.float32)


def _rate(run, pairs_per_call: int, seconds: float, sync) -> tuple[float, float]:
    """Pairs per second of `run` over at least `seconds` (whole calls), and CPU ms per pair."""
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        run()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            pairs = calls * pairs_per_call
            return pairs / elapsed, (time.process_time() - cpu) * 1e3 / pairs


def speed_rows(
    args, params: FarnebackParams, device: torch.device
) -> list[tuple[str, float, float]]:
    """Best pairs/s and least CPU ms per pair of each contender over `--rounds` interleaved
    rounds (load only slows)."""
    pool = max(int(b) for b in args.batches.split(","))
    prev, nxt, _ = synthetic_pairs(pool, args.size, args.size, seed=100)
    t_prev = torch.from_numpy(prev).to(device).float()
    t_nxt = torch.from_numpy(nxt).to(device).float()
    cv_args = dataclasses.astuple(params)
    cores = os.cpu_count() or 1
    executor = ThreadPoolExecutor(cores)

    def opencv_one(i: int) -> np.ndarray:
        return cv2.calcOpticalFlowFarneback(prev[i], nxt[i], None, *cv_args)

    def opencv_sequential() -> None:
        for i in range(pool):
            opencv_one(i)

    def opencv_pool() -> None:
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)  # one single-threaded pair per core, as flow.opencv_backend runs it
        list(executor.map(opencv_one, range(pool)))
        cv2.setNumThreads(threads)

    def torch_batches(batch: int):
        def run() -> None:
            for i in range(0, pool, batch):
                farneback(t_prev[i : i + batch], t_nxt[i : i + batch], params)

        return run

    cpu_sync = lambda: None  # noqa: E731
    gpu_sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else cpu_sync
    contenders = [
        ("opencv, one pair at a time", opencv_sequential, cpu_sync),
        (f"opencv, {cores} pairs at once (thread pool)", opencv_pool, cpu_sync),
    ] + [
        (f"torch {device.type}, batch {b}", torch_batches(int(b)), gpu_sync)
        for b in args.batches.split(",")
    ]
    best = {label: 0.0 for label, _, _ in contenders}
    least_cpu = {label: float("inf") for label, _, _ in contenders}
    with torch.inference_mode():
        for _, run, sync in contenders:  # warm-up: first-call allocations and kernel loading
            run()
            sync()
        for _ in range(args.rounds):
            for label, run, sync in contenders:
                rate, cpu_ms = _rate(run, pool, args.seconds / args.rounds, sync)
                best[label] = max(best[label], rate)
                least_cpu[label] = min(least_cpu[label], cpu_ms)
    executor.shutdown()
    return [(label, best[label], least_cpu[label]) for label in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=224, help="side of the square pairs timed")
    ap.add_argument("--batches", default="1,8,32", help="torch batch sizes timed")
    ap.add_argument("--seconds", type=float, default=6.0, help="timing per row, over all rounds")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; best is kept")
    ap.add_argument(
        "--synthetic", type=int, default=8, help="synthetic pairs for the accuracy rows"
    )
    ap.add_argument("--perturb", type=int, default=0, help="noisy FlyingChairs copies to average")
    ap.add_argument("--per-pair", action="store_true", help="a row per FlyingChairs pair")
    ap.add_argument("--no-speed", action="store_true", help="accuracy rows only")
    ap.add_argument(
        "--preset", default="tutorial", choices=sorted(PRESETS), help="parameter set timed"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch and OpenCV threads (0: leave as is)"
    )
    ap.add_argument(
        "--data",
        default=str(ROOT.parent / "shared" / "data" / "flyingchairs"),
        help="FlyingChairs folder",
    )
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible to torch")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), OpenCV {cv2.__version__}"
        f" ({cv2.getNumThreads()} threads), {os.cpu_count()} cores, torch on {device},"
        f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    if device.type == "cpu":
        fast = _farneback_native.built()
        print(
            f"torch kernels on the CPU: {'C (flow/_farneback_native.py)' if fast else 'eager ops'}"
        )

    synthetic = list(zip(*synthetic_pairs(args.synthetic, args.size, args.size)))
    sets = [(f"synthetic {args.synthetic} x {args.size}x{args.size}", synthetic)]
    if Path(args.data).is_dir():
        chairs = flyingchairs_pairs(args.data)
        sets.append((f"FlyingChairs ({len(chairs)} pairs)", chairs))
        if args.perturb:
            noisy = [
                (_noisy(prev, rng), _noisy(nxt, rng), gt)
                for rng in (np.random.default_rng(seed) for seed in range(args.perturb))
                for prev, nxt, gt in chairs
            ]
            sets.append((f"FlyingChairs + N(0, 0.5) noise, {args.perturb} draws", noisy))
    else:
        print(f"note: no FlyingChairs folder at {args.data}; its rows are skipped")
    print("\nmean EPE (px) against ground truth, same parameters for both")
    print(f"{'pairs':<48} {'preset':<9} {'torch':>9} {'opencv':>9} {'|torch-cv|':>11} {'max':>9}")
    chairs_per_pair = {}  # preset -> FlyingChairs pair_rows, kept for --per-pair
    for index, (label, triples) in enumerate(sets):
        for preset, ours, theirs, gap, most, per_pair in accuracy_rows(triples, device):
            print(f"{label:<48} {preset:<9} {ours:9.5f} {theirs:9.5f} {gap:11.2e} {most:9.2e}")
            if index == 1:  # sets[1]: FlyingChairs, when its folder is there
                chairs_per_pair[preset] = per_pair
    if args.per_pair and chairs_per_pair:
        print("\nFlyingChairs per pair: EPE torch, EPE opencv (px), mean and max |torch - cv| (px)")
        for preset, per_pair in chairs_per_pair.items():
            for i, row in enumerate(per_pair):
                print(
                    f"{preset:<9} pair {i}  {row[0]:9.5f} {row[1]:9.5f} {row[2]:11.2e} {row[3]:9.2e}"
                )
    if args.no_speed:
        return

    params = PRESETS[args.preset]
    print(
        f"\npairs/s at {args.size}x{args.size}, preset {args.preset} {dataclasses.astuple(params)}"
    )
    rows = speed_rows(args, params, device)
    sequential = rows[0][1]
    for label, rate, cpu_ms in rows:
        print(
            f"{label:<48} {rate:8.1f} pairs/s  {rate / sequential:5.2f}x opencv one-at-a-time"
            f"  {rate / rows[1][1]:5.2f}x opencv pool  {cpu_ms:6.2f} CPU ms/pair"
        )


if __name__ == "__main__":
    main()
