"""Clip loading from the store vs decoding the same clips from the videos; feature caching; memory.

    python benchmarks/loader_bench.py [STORE] [--data DIR] [--videos 24] [--steps 16] [--workers 2]

Without STORE a store is built in a temporary folder from the embedded synthetic dataset (or from
the dataset folder DIR, e.g. ../shared/data/scfd-dev) with Farneback flow. The synthetic clips are
rendered at 360-480 px (--source-side), the size of typical CCTV clips, because decoding the
dataset's default ~110 px clips costs next to nothing and would flatter the decoding baseline's
real cost. The store's frames are also recoded into the other RGB codec (JPEG <-> raw) in a
temporary file, so both codecs are measured on the same clips. Prints, in one run:

- size on disk and RGB bytes per frame of both codecs, and the JPEG frames' PSNR;
- RGB clips/s through a DataLoader from the store (JPEG and raw frames) next to decoding the very
  same clips from the source videos (`data.video.read_video` with the store's sampling, the same
  frame indices, the same workers), both delivering what training consumes: (T, 3, H, W) uint8
  clips, checked to hold the same frames (raw: identical; JPEG: PSNR); flow clips/s from the
  store (float16 px; there is no decode baseline: flow would have to be computed);
- the same RGB clips once normalised on the consumer's device (`data.clips.normalize_clip`, here
  the CPU of the main process), the same step for the store and the decoding baseline;
- for every row, besides the DataLoader's clips/s, the CPU milliseconds per clip of one worker
  (loaded in this process on one thread, collation included, best of the passes): on a shared
  machine wall-clock rates swing with the load, CPU time much less;
- frames/s of feature caching (vgg19 on the CPU at a small size, model build excluded);
- peak RSS of a process loading N and 10N clips, which stays flat because clips stream from disk.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.augment import AugmentConfig  # noqa: E402
from data.clips import ClipConfig, ClipDataset, channels_first, clip_inputs  # noqa: E402
from data.sampling import Sampling  # noqa: E402
from data.shards import recode_rgb  # noqa: E402
from data.store import Store  # noqa: E402
from data.video import read_video  # noqa: E402


class DecodedClips(torch.utils.data.Dataset):
    """The clips of a ClipDataset, decoded from the source videos instead of read from the store.

    Items hold what an evaluation `ClipDataset` holds: "clip" (T, 3, H, W) uint8, "index" (T,)."""

    def __init__(self, store: Store, video_ids: list[str], index: dict[str, np.ndarray]) -> None:
        self.store = store
        self.video_ids = video_ids
        self.index = index  # video id -> (T,) frame indices of the store clip

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> dict:
        video_id = self.video_ids[i]
        attrs = self.store.attrs(video_id)
        frames, _, _ = read_video(attrs["source_path"], Sampling.from_attrs(attrs, prefix="sampling_"))
        idx = self.index[video_id]
        return {"video_id": video_id, "clip": channels_first(frames[idx]), "index": torch.from_numpy(idx)}


def frames_of(batches: list) -> dict[str, np.ndarray]:
    """Video id -> (T, 3, H, W) uint8 frames of the clips in `batches`."""
    return {v: clip.numpy() for batch in batches for v, clip in zip(batch["video_id"], batch["clip"], strict=True)}


def normalized(batch: dict) -> torch.Tensor:
    """What a consumer does with a batch on its device (the CPU here): (B, T, C, H, W) float32."""
    return clip_inputs(batch, "cpu")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def rgb_bytes_per_frame(store: Store, ids: list[str]) -> float:
    """Stored bytes per RGB frame: JPEG payloads, or the stored chunks of raw frames."""
    import h5py

    nbytes = frames = 0
    for video_id in ids:
        ds = store.group(video_id, "rgb")
        if h5py.check_vlen_dtype(ds.dtype) is not None:
            nbytes += sum(int(p.size) for p in ds[:])
        else:
            nbytes += ds.id.get_storage_size()
        frames += ds.shape[0]
    return nbytes / frames


def codec_of(store_path: Path) -> str:
    store = Store(store_path)
    codec = store.rgb_codec(store.video_ids[0])
    store.close()
    return codec


def clips_per_s(ds, batch_size: int, workers: int, repeat: int = 1, consume=None) -> tuple[float, list]:
    """Clips/s over `repeat` timed passes after one untimed pass that starts the (persistent)
    workers; `consume(batch)` runs on each timed batch in this process (e.g. normalisation).
    Also returns the untimed pass's batches."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                         persistent_workers=workers > 0)
    first = list(loader)
    t0 = time.perf_counter()
    for _ in range(repeat):
        for batch in loader:
            if consume is not None:
                consume(batch)
    return repeat * len(ds) / (time.perf_counter() - t0), first


def cpu_ms_per_clip(ds, batch_size: int, passes: int, consume=None) -> float:
    """CPU milliseconds per clip of loading `ds` in this process as one DataLoader worker does
    (one thread; collation included), best of `passes` after a warm pass. Counts every thread's
    CPU time, so it holds on a busy machine where wall-clock rates do not."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        list(loader)
        best = float("inf")
        for _ in range(passes):
            t0 = time.process_time()
            for batch in loader:
                if consume is not None:
                    consume(batch)
            best = min(best, time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return 1e3 * best / len(ds)


def build_store(tmp: Path, data: str | None, videos: int, size: int, fps: float | None, side: int) -> Path:
    from data.layouts import index_dataset
    from flow.extract import ExtractConfig, extract_dataset

    if data is None:
        from data.synthetic import SyntheticSpec, generate_dataset

        source = generate_dataset(tmp / "synthetic", SyntheticSpec(videos=videos, size=(side, side * 4 // 3)))
    else:
        source = Path(data)
    rows = index_dataset(source)[:videos]
    cfg = ExtractConfig(method="farneback", backend="opencv", sampling=Sampling(fps=fps, size=size), workers=2)
    path = tmp / "bench.h5"
    t0 = time.perf_counter()
    summary = extract_dataset(rows, path, cfg)
    print(f"built {path} from {source}: {len(summary.written)} videos, {summary.frames} frames in "
          f"{time.perf_counter() - t0:.1f} s")
    return path


def rss_child(store: str, clips: int, steps: int) -> None:
    """Load `clips` RGB clips (cycling over the store's videos) and print the peak RSS in MB."""
    ids = Store(store).video_ids
    ds = ClipDataset(store, [ids[i % len(ids)] for i in range(clips)], "rgb", ClipConfig(steps=steps))
    for _ in torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0):
        pass
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would include the parent's.
    status = Path("/proc/self/status").read_text().splitlines()
    hwm = [line for line in status if line.startswith("VmHWM:")]
    print(float(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_rss_mb(store: Path, clips: int, steps: int) -> float:
    out = subprocess.run([sys.executable, __file__, str(store), "--rss-child", str(clips), "--steps", str(steps)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def feature_frames_per_s(store: Path, ids: list[str], steps: int, size: int, batch_size: int) -> tuple[float, int]:
    from streams.features import cache_features

    marks = []
    out = cache_features(store, "rgb", "vgg19", clip_cfg=ClipConfig(steps=steps, size=size), device="cpu",
                         batch_size=batch_size, video_ids=ids, out_path=store.with_name("bench-features.h5"),
                         on_progress=lambda done, total: marks.append(time.perf_counter()))
    out.unlink()
    frames = len(ids) * steps
    return frames / (marks[-1] - marks[0]), frames  # from the first progress report: model built


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", nargs="?", help="an existing store (default: build one)")
    ap.add_argument("--data", help="dataset folder to build the store from (default: the synthetic dataset)")
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--size", type=int, default=224, help="store frame side when building one")
    ap.add_argument("--fps", type=float, default=None, help="store sampling rate when building one")
    ap.add_argument("--source-side", type=int, default=360, help="synthetic clips' side range: N to 4N/3 px")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--flow-stack", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="timed passes over the store clips (decoding: one)")
    ap.add_argument("--feature-videos", type=int, default=4)
    ap.add_argument("--feature-size", type=int, default=64)
    ap.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child is not None:
        rss_child(args.store, args.rss_child, args.steps)
        return

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.store:
        store_path = Path(args.store)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="loader_bench_"))
        store_path = build_store(tmp, args.data, args.videos, args.size, args.fps, args.source_side)
    # The same store in both RGB codecs; JPEG (the default) serves every row but the raw one.
    work = Path(tempfile.mkdtemp(prefix="loader_bench_"))
    other = "raw" if codec_of(store_path) == "jpeg" else "jpeg"
    t0 = time.perf_counter()
    recoded = recode_rgb(store_path, work / f"bench-{other}.h5", other)
    print(f"recoded the frames of {store_path} as {other} in {time.perf_counter() - t0:.1f} s")
    paths = {other: recoded, "raw" if other == "jpeg" else "jpeg": store_path}

    store = Store(store_path)
    ids = store.video_ids[: args.videos] if args.videos else store.video_ids
    frames = [store.num_frames(v) for v in ids]
    h, w = store.frame_size(ids[0])
    sources = sorted({tuple(store.attrs(v).get("source_size", (0, 0))) for v in ids}, key=lambda s: s[0] * s[1])
    store.close()
    print(f"\n{len(ids)} videos from sources of {sources[0][0]}x{sources[0][1]} to {sources[-1][0]}x{sources[-1][1]}, "
          f"stored as {min(frames)}-{max(frames)} frames at {w}x{h}; T={args.steps}, "
          f"L={args.flow_stack}; batch {args.batch_size}, {args.workers} workers, {torch.get_num_threads()} threads")
    for codec in ("jpeg", "raw"):
        reader = Store(paths[codec])
        print(f"store with {codec:4s} frames: {reader.disk_bytes() / 1e6:6.1f} MB on disk, "
              f"{rgb_bytes_per_frame(reader, ids) / 1e3:6.1f} KB per RGB frame")
        reader.close()

    cfg = ClipConfig(steps=args.steps, flow_stack=args.flow_stack)
    store_path = paths["jpeg"]
    store_reader = Store(store_path)
    sources_exist = all(Path(store_reader.attrs(v)["source_path"]).exists() for v in ids)
    store_reader.close()

    def clips(codec: str, stream: str = "rgb", clip_cfg: ClipConfig = cfg, augment=None, threads=None):
        return ClipDataset(Store(paths[codec], threads=threads), ids, stream, clip_cfg, augment)

    def measure(name: str, make, repeat: int, consume=None) -> tuple[str, float, float, list]:
        """(name, clips/s through the DataLoader, CPU ms per clip in one worker, the first batches)."""
        rate, first = clips_per_s(make(None), args.batch_size, args.workers, repeat, consume)
        return name, rate, cpu_ms_per_clip(make(1), args.batch_size, max(repeat, 2), consume), first

    train_cfg = ClipConfig(steps=args.steps, flow_stack=args.flow_stack, train=True)
    loaded = [measure("store (jpeg), rgb, eval", lambda t: clips("jpeg", threads=t), args.repeat),
              measure("store (raw), rgb, eval", lambda t: clips("raw", threads=t), args.repeat)]
    batches, raw_batches = loaded[0][3], loaded[1][3]
    index = {v: b["index"][j].numpy() for b in batches for j, v in enumerate(b["video_id"])}
    raw_index = {v: b["index"][j].numpy() for b in raw_batches for j, v in enumerate(b["video_id"])}
    assert all(np.array_equal(index[v], raw_index[v]) for v in ids), "the codecs' clips take different frames"
    normed = []
    if sources_exist:
        decode = measure("decode videos, rgb", lambda t: DecodedClips(Store(store_path), ids, index), 1)
        decoded = frames_of(decode[3])
        # The store built from the videos holds the decoded frames (raw: exactly; JPEG: within its
        # PSNR); the recoded copy holds that store's frames (recoded to raw: exactly).
        built = frames_of(batches if other == "raw" else raw_batches)
        built_psnr = psnr(np.concatenate([built[v] for v in ids]), np.concatenate([decoded[v] for v in ids]))
        vs_store = "identical" if built_psnr == float("inf") else f"{built_psnr:.1f} dB"
        loaded.append((f"{decode[0]} (vs {'raw' if other == 'jpeg' else 'jpeg'} store: {vs_store})", *decode[1:]))
        for codec in ("jpeg", "raw"):
            normed.append(measure(f"store ({codec}), rgb, eval", lambda t, c=codec: clips(c, threads=t),
                                  args.repeat, normalized))
        normed.append(measure("decode videos, rgb", lambda t: DecodedClips(Store(store_path), ids, index), 1,
                              normalized))
    else:
        print("source videos of the store are not here: decoding baseline skipped")
    loaded.append(measure("store (jpeg), rgb, train (augmented)",
                          lambda t: clips("jpeg", clip_cfg=ClipConfig(steps=args.steps, train=True),
                                          augment=AugmentConfig(), threads=t), args.repeat))
    loaded.append(measure("store, flow, eval", lambda t: clips("jpeg", "flow", threads=t), args.repeat))
    loaded.append(measure("store, flow, train (augmented)",
                          lambda t: clips("jpeg", "flow", train_cfg, AugmentConfig(), threads=t), args.repeat))

    print(f"\nDataLoader clips/s ({args.workers} workers) and CPU ms per clip in one worker; ratios to decoding")
    for title, rows in (("clips as loaded (uint8 RGB, float16 flow)", loaded),
                        ("rgb clips, then normalised in the main process", normed)):
        if not rows:
            continue
        base = next((row for row in rows if row[0].startswith("decode")), None)
        print(f"\n{title:50s}{'clips/s':>9s}{'ratio':>8s}{'CPU ms':>9s}{'ratio':>8s}")
        for name, rate, cpu_ms, _ in rows:
            ratios = (f"{rate / base[1]:7.1f}x", f"{base[2] / cpu_ms:7.1f}x") if base else ("-", "-")
            print(f"{name:50s}{rate:9.1f}{ratios[0]:>8s}{cpu_ms:9.1f}{ratios[1]:>8s}")

    feat_ids = ids[: args.feature_videos]
    fps, n = feature_frames_per_s(store_path, feat_ids, args.steps, args.feature_size, args.batch_size)
    print(f"\nfeature caching, vgg19 on CPU at {args.feature_size}x{args.feature_size}: {fps:.1f} frames/s "
          f"({n} frames, model build excluded)")

    n_clips = len(ids)
    small, large = peak_rss_mb(store_path, n_clips, args.steps), peak_rss_mb(store_path, 10 * n_clips, args.steps)
    print(f"\npeak RSS loading {n_clips} clips: {small:.0f} MB; {10 * n_clips} clips: {large:.0f} MB "
          f"({large / small:.2f}x)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
