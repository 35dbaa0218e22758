"""Flow codecs side by side: stored bytes per field, round-trip error, encode and decode time.

Flows are OpenCV DualTVL1 (defaults) between consecutive frames, resized to 224x224 grayscale,
of a few clips of ../shared/data/scfd-dev (cached in /tmp); --synthetic uses smooth synthetic
fields instead. Every codec stores the same fields through StoreWriter, so "store B" is what a
field really costs on disk; the "jpeg" row is the denseflow/TSN reference (two grayscale JPEGs
at quality 95 of the bound-20 uint8 fields).

    .venv/bin/python benchmarks/codec_bench.py [--synthetic] [--steps 0.2,0.3,0.4]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from data.flowcodec import CODECS, Codec, decode, encode, qwebp_codec
from data.store import Store, StoreWriter

ROOT = Path(__file__).resolve().parents[1]
SIZE = 224


def real_flows(data: Path, clips: int, pairs: int, cache: Path) -> tuple[np.ndarray, list[int]]:
    """TV-L1 flows of `pairs` consecutive frame pairs from `clips` clips, half of each label."""
    if cache.exists():
        cached = np.load(cache)
        return cached["flow"], cached["counts"].tolist()
    with open(data / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked, groups = [], set()
    for label in ("1", "0"):  # one clip per source recording, for variety
        for row in rows:
            if (
                row["label"] == label
                and row["group"] not in groups
                and sum(p["label"] == label for p in picked) < clips // 2
            ):
                picked.append(row)
                groups.add(row["group"])
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
    flows, counts = [], []
    for row in picked:
        cap = cv2.VideoCapture(str(data / row["path"]))
        frames = []
        while len(frames) < pairs + 1:
            ok, frame = cap.read()
            if not ok:
                break
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            frames.append(cv2.resize(gray, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
        cap.release()
        fields = [tvl1.calc(a, b, None) for a, b in zip(frames[:-1], frames[1:], strict=False)]
        flows.extend(fields)
        counts.append(len(fields))
        print(f"  {row['video_id']}: {len(fields)} fields", flush=True)
    flow = np.stack(flows).astype(np.float32)
    np.savez(cache, flow=flow, counts=np.asarray(counts))
    return flow, counts


def synthetic_flows(n: int) -> tuple[np.ndarray, list[int]]:
    from flow.groundtruth import smooth_flow

    rng = np.random.default_rng(0)
    return np.stack([smooth_flow(SIZE, SIZE, rng, max_px=8.0) for _ in range(n)]), [n]


def best_ms(run, repeats: int) -> float:
    """CPU ms of the fastest of `repeats` runs; CPU time, not wall time, so that other work
    sharing the machine does not count (every codec here runs on one thread)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        run()
        times.append(time.process_time() - t0)
    return min(times) * 1e3


def bench(
    codec: Codec, flow: np.ndarray, counts: list[int], bound: float, workdir: Path, repeats: int
) -> dict:
    n = len(flow)
    stored = [encode(flow[i : i + 1], codec, bound) for i in range(n)]  # one field per call
    enc_ms = best_ms(lambda: [encode(flow[i : i + 1], codec, bound) for i in range(n)], repeats) / n
    rec = np.concatenate([decode(s, codec, bound) for s in stored])
    dec_ms = best_ms(lambda: [decode(s, codec, bound) for s in stored], repeats) / n
    payload = np.mean([sum(b.size for b in s) for s in stored]) if codec.stream else None

    # What a field costs inside a store, and reading it back through Store.
    path = workdir / f"{codec.name}.h5"
    CODECS.setdefault(codec.name, codec)
    with StoreWriter(path, flow_codec=codec.name, bound=bound) as writer:
        start = 0
        for v, count in enumerate(counts):
            rgb = np.zeros((count + 1, SIZE, SIZE, 3), np.uint8)
            attrs = dict(
                label=0,
                group="g",
                source_path="-",
                source_fps=0.0,
                source_size=[SIZE, SIZE],
                flow_method="tvl1",
            )
            writer.write(f"v{v}", rgb, flow[start : start + count], attrs)
            start += count
    store = Store(path)
    store_bytes = store.flow_bytes_per_field()
    read_ms = (
        best_ms(
            lambda: [
                store.flow(f"v{v}", slice(i, i + 1)) for v, c in enumerate(counts) for i in range(c)
            ],
            repeats,
        )
        / n
    )
    store.close()

    err = np.linalg.norm(rec - flow, axis=-1)
    moving = np.linalg.norm(flow, axis=-1) >= 1.0
    return dict(
        store=store_bytes,
        payload=payload,
        epe=float(err.mean()),
        epe_moving=float(err[moving].mean()) if moving.any() else float("nan"),
        p99=float(np.percentile(err, 99)),
        max=float(err.max()),
        enc=enc_ms,
        dec=dec_ms,
        read=read_ms,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "../shared/data/scfd-dev")
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=10, help="consecutive pairs per clip")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="default: /tmp/twostream-codec-bench-<clips>x<pairs>.npz",
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="smooth synthetic flows instead of real ones"
    )
    parser.add_argument("--bound", type=float, default=20.0)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timings are the fastest of this many runs"
    )
    parser.add_argument(
        "--steps", default="", help="extra qwebp steps (px) to compare, e.g. 0.2,0.3,0.4"
    )
    args = parser.parse_args()

    if not args.synthetic and not (args.data / "manifest.csv").exists():
        print(f"{args.data} not found; using synthetic flows (--synthetic)")
        args.synthetic = True
    if args.synthetic:
        flow, counts = synthetic_flows(args.clips * args.pairs)
        source = f"{len(flow)} synthetic smooth fields"
    else:
        cache = (
            args.cache
            or Path(tempfile.gettempdir()) / f"twostream-codec-bench-{args.clips}x{args.pairs}.npz"
        )
        print(f"TV-L1 flows of {args.data} (cache {cache})")
        flow, counts = real_flows(args.data, args.clips, args.pairs, cache)
        source = f"{len(flow)} TV-L1 fields from {len(counts)} scfd-dev clips"
    mag = np.linalg.norm(flow, axis=-1)
    print(
        f"{source}, {SIZE}x{SIZE}; |flow| mean {mag.mean():.3f} px, {100 * (mag >= 1).mean():.1f}% of pixels >= 1 px"
    )

    codecs = [CODECS[name] for name in ("jpeg", "uint8", "float16", "qwebp", "qwebp-fine")]
    codecs += [qwebp_codec(float(s), name=f"qwebp@{s}") for s in args.steps.split(",") if s]
    header = f"{'codec':13s} {'store B':>8s} {'payload B':>9s} {'vs jpeg':>7s} {'EPE px':>7s} {'EPE>=1px':>8s} {'p99 px':>7s} {'max px':>7s} {'enc ms':>7s} {'dec ms':>7s} {'read ms':>7s}"
    print(header)
    print("-" * len(header))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for codec in codecs:
            r = rows[codec.name] = bench(codec, flow, counts, args.bound, Path(tmp), args.repeats)
            print(
                f"{codec.name:13s} {r['store']:8.0f} {'-' if r['payload'] is None else round(r['payload']):>9} {r['store'] / rows['jpeg']['store']:7.2f} "
                f"{r['epe']:7.4f} {r['epe_moving']:8.4f} {r['p99']:7.3f} {r['max']:7.3f} {r['enc']:7.2f} {r['dec']:7.3f} {r['read']:7.3f}",
                flush=True,
            )
    print(
        "store B: flow bytes per field inside a store (payloads + HDF5 chunks); payload B: the encoded"
    )
    print(
        "byte strings alone (stream codecs); EPE>=1px: mean end-point error over pixels moving >= 1 px;"
    )
    print(
        "dec ms: codec decode of one field; read ms: Store.flow of one field (HDF5 read + decode);"
    )
    print(f"times: CPU ms per field, fastest of {args.repeats} runs.")


if __name__ == "__main__":
    main()
