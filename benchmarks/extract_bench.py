"""Extraction end to end vs the raw flow estimator on the same frames, and stored flow size vs JPEG.

    python benchmarks/extract_bench.py [DATA_DIR] [--method tvl1] [--backend auto] [--videos 12] [--fps 10]

DATA_DIR defaults to ../shared/data/scfd-dev (real surveillance clips) when present, else a
synthetic dataset is generated. Prints one table: end-to-end videos/s and pairs/s next to the raw
estimator's pairs/s on the same decoded frames, then bytes per flow field and round-trip error
for the store's codec next to bound-20 JPEG (quality 95, the denseflow/TSN format).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.layouts import index_dataset  # noqa: E402
from data.sampling import Sampling  # noqa: E402
from data.store import Store  # noqa: E402
from data.video import read_video  # noqa: E402
from flow.api import FlowEstimator  # noqa: E402
from flow.devices import cpu_count  # noqa: E402
from flow.extract import ExtractConfig, extract_dataset  # noqa: E402


def jpeg_field_bytes(flow: np.ndarray, bound: float = 20.0, quality: int = 95) -> tuple[int, np.ndarray]:
    """denseflow/TSN: dx and dy each quantised to uint8 with `bound` and written as a grey JPEG."""
    q = np.clip(np.rint((flow + bound) * 255.0 / (2 * bound)), 0, 255).astype(np.uint8)
    size, decoded = 0, []
    for c in range(2):
        ok, buf = cv2.imencode(".jpg", q[..., c], [cv2.IMWRITE_JPEG_QUALITY, quality])
        size += len(buf)
        decoded.append(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE))
    back = np.stack(decoded, -1).astype(np.float32) * (2 * bound) / 255.0 - bound
    return size, back


def epe(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a.astype(np.float64) - b) ** 2).sum(-1)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", default=str(ROOT.parent / "shared" / "data" / "scfd-dev"))
    ap.add_argument("--method", default="tvl1")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--videos", type=int, default=12, help="first N videos of the dataset (0 = all)")
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="extract_bench_"))
    data = Path(args.data)
    if not data.exists():
        from data.synthetic import SyntheticSpec, generate_dataset

        print(f"{data} not found: using a generated synthetic dataset")
        data = generate_dataset(tmp / "synthetic", SyntheticSpec(videos=max(args.videos, 8)))
    rows = index_dataset(data)
    rows = rows[: args.videos] if args.videos else rows
    sampling = Sampling(fps=args.fps, size=args.size)

    # Raw estimator on the very frames extraction will see (decoding not timed).
    frames = [read_video(r.path, sampling)[0] for r in rows]
    prev = np.concatenate([f[:-1] for f in frames])
    nxt = np.concatenate([f[1:] for f in frames])
    est = FlowEstimator(args.method, args.backend, args.device)
    est(prev[:2], nxt[:2])  # warm-up (compilation, thread pools)
    t0 = time.perf_counter()
    raw = est(prev, nxt)
    raw_s = time.perf_counter() - t0

    cfg = ExtractConfig(method=args.method, backend=args.backend, device=args.device, sampling=sampling, workers=args.workers)
    store_path = tmp / "bench.h5"
    t0 = time.perf_counter()
    summary = extract_dataset(rows, store_path, cfg)
    e2e_s = time.perf_counter() - t0
    assert not summary.failures, summary.failures

    store = Store(store_path)
    stored = np.concatenate([store.flow(r.video_id) for r in rows])
    t0 = time.perf_counter()
    for r in rows:
        store.flow(r.video_id)
    decode_ms = (time.perf_counter() - t0) * 1e3 / len(stored)
    jpeg_sizes, jpeg_err = [], []
    for f in raw:
        size, back = jpeg_field_bytes(f)
        jpeg_sizes.append(size)
        jpeg_err.append(epe(back, np.clip(f, -20, 20)))
    clipped = np.clip(raw, -20, 20)
    n_pairs = len(prev)
    print(f"\n{len(rows)} videos from {data}, {n_pairs} pairs at {args.size}x{args.size}, {args.fps} fps; "
          f"{args.method} backend {est.backend} on {est.device}; {cpu_count()} cores")
    print(f"{'':34s}{'videos/s':>10s}{'pairs/s':>10s}{'ratio':>8s}")
    print(f"{'raw estimator (same frames)':34s}{'':>10s}{n_pairs / raw_s:10.2f}{1.0:8.2f}")
    print(f"{'extract end to end':34s}{len(rows) / e2e_s:10.2f}{n_pairs / e2e_s:10.2f}{raw_s / e2e_s:8.2f}")
    print(f"\n{'flow storage':34s}{'bytes/field':>12s}{'EPE px':>9s}{'decode ms':>11s}")
    print(f"{'store (' + str(store.root_attrs.get('flow_codec')) + ')':34s}{store.flow_bytes_per_field():12.0f}"
          f"{epe(stored, clipped):9.3f}{decode_ms:11.3f}")
    print(f"{'bound-20 JPEG q95 (2 files)':34s}{np.mean(jpeg_sizes):12.0f}{np.mean(jpeg_err):9.3f}")


if __name__ == "__main__":
    main()
