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
  frame indices, the same normalisation and workers), checked to hold the same frames (raw:
  identical; JPEG: PSNR); the same for the frames alone (uint8, no normalisation), which is what
  the store itself speeds up; flow clips/s from the store (there is no decode baseline: flow
  would have to be computed);
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
from data.clips import ClipConfig, ClipDataset  # noqa: E402
from data.sampling import Sampling  # noqa: E402
from data.store import Store, recode_rgb  # noqa: E402
from data.video import read_video  # noqa: E402
from streams.backbones import normalize_rgb  # noqa: E402


class DecodedClips(torch.utils.data.Dataset):
    """The clips of a ClipDataset, decoded from the source videos instead of read from the store.

    With `normalize=False` the clip is the (T, H, W, 3) uint8 frames alone."""

    def __init__(self, store: Store, video_ids: list[str], index: dict[str, np.ndarray],
                 normalize: bool = True) -> None:
        self.store = store
        self.video_ids = video_ids
        self.index = index  # video id -> (T,) frame indices of the store clip
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> dict:
        video_id = self.video_ids[i]
        attrs = self.store.attrs(video_id)
        frames, _, _ = read_video(attrs["source_path"], Sampling.from_attrs(attrs, prefix="sampling_"))
        idx = self.index[video_id]
        clip = torch.from_numpy(frames[idx])
        if self.normalize:
            clip = normalize_rgb(clip).contiguous()
        return {"video_id": video_id, "clip": clip, "index": torch.from_numpy(idx)}


class StoreFrames(torch.utils.data.Dataset):
    """The frames of the same clips read from the store, (T, H, W, 3) uint8, not normalised."""

    def __init__(self, store: Store, video_ids: list[str], index: dict[str, np.ndarray]) -> None:
        self.store = store
        self.video_ids = video_ids
        self.index = index

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> dict:
        video_id = self.video_ids[i]
        idx = self.index[video_id]
        return {"video_id": video_id, "clip": torch.from_numpy(self.store.rgb(video_id, idx)),
                "index": torch.from_numpy(idx)}


def frames_of(batches: list) -> dict[str, np.ndarray]:
    """Video id -> (T, H, W, 3) uint8 frames of the clips in `batches` (normalised or not)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255.0
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255.0
    out = {}
    for batch in batches:
        for video_id, clip in zip(batch["video_id"], batch["clip"], strict=True):
            if clip.dtype != torch.uint8:  # undo normalize_rgb: (T, 3, H, W) -> (T, H, W, 3)
                clip = (clip * std + mean).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1)
            out[video_id] = clip.numpy()
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def rgb_bytes_per_frame(store: Store, ids: list[str]) -> float:
    """Stored bytes per RGB frame: JPEG payloads, or the deflated chunks of raw frames."""
    import h5py

    nbytes = frames = 0
    for video_id in ids:
        ds = store._group(video_id)["rgb"]
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


def clips_per_s(ds, batch_size: int, workers: int, repeat: int = 1) -> tuple[float, list]:
    """Clips/s over `repeat` timed passes after one untimed pass that starts the (persistent)
    workers; also returns the untimed pass's batches."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                         persistent_workers=workers > 0)
    first = list(loader)
    t0 = time.perf_counter()
    for _ in range(repeat):
        for _batch in loader:
            pass
    return repeat * len(ds) / (time.perf_counter() - t0), first


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
    store_path = paths["jpeg"]

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
    rows = []
    store_rate, batches = clips_per_s(ClipDataset(store_path, ids, "rgb", cfg), args.batch_size, args.workers,
                                      args.repeat)
    rows.append(("store (jpeg), rgb, eval", store_rate))
    raw_rate, raw_batches = clips_per_s(ClipDataset(paths["raw"], ids, "rgb", cfg), args.batch_size, args.workers,
                                        args.repeat)
    rows.append(("store (raw), rgb, eval", raw_rate))
    index = {v: b["index"][j].numpy() for b in batches for j, v in enumerate(b["video_id"])}
    raw_index = {v: b["index"][j].numpy() for b in raw_batches for j, v in enumerate(b["video_id"])}
    assert all(np.array_equal(index[v], raw_index[v]) for v in ids), "the codecs' clips take different frames"
    store_reader = Store(store_path)
    sources_exist = all(Path(store_reader.attrs(v)["source_path"]).exists() for v in ids)
    store_reader.close()
    decode_rate = None
    if sources_exist:
        decode_rate, dec_batches = clips_per_s(DecodedClips(Store(store_path), ids, index), args.batch_size,
                                               args.workers, 1)
        decoded = frames_of(dec_batches)
        same = all(np.array_equal(decoded[v], f) for v, f in frames_of(raw_batches).items())
        jpeg_psnr = psnr(np.concatenate([frames_of(batches)[v] for v in ids]),
                         np.concatenate([decoded[v] for v in ids]))
        rows.append((f"decode videos, rgb (raw {'identical' if same else 'DIFFERENT'}, jpeg {jpeg_psnr:.1f} dB)",
                     decode_rate))
        frame_rate = clips_per_s(StoreFrames(Store(store_path), ids, index), args.batch_size, args.workers,
                                 args.repeat)[0]
        decode_frames = clips_per_s(DecodedClips(Store(store_path), ids, index, normalize=False),
                                    args.batch_size, args.workers, 1)[0]
    else:
        print("source videos of the store are not here: decoding baseline skipped")
    train = ClipDataset(store_path, ids, "rgb", ClipConfig(steps=args.steps, train=True), AugmentConfig())
    rows.append(("store (jpeg), rgb, train (augmented)",
                 clips_per_s(train, args.batch_size, args.workers, args.repeat)[0]))
    flow = ClipDataset(store_path, ids, "flow", cfg)
    rows.append(("store, flow, eval", clips_per_s(flow, args.batch_size, args.workers, args.repeat)[0]))
    flow_train = ClipDataset(store_path, ids, "flow", ClipConfig(steps=args.steps, flow_stack=args.flow_stack, train=True),
                             AugmentConfig())
    rows.append(("store, flow, train (augmented)", clips_per_s(flow_train, args.batch_size, args.workers, args.repeat)[0]))

    print(f"\n{'clip loading (float32 clips, normalised)':50s}{'clips/s':>10s}{'vs decode':>11s}")
    for name, rate in rows:
        ratio = f"{rate / decode_rate:10.1f}x" if decode_rate else f"{'-':>11s}"
        print(f"{name:50s}{rate:10.1f}{ratio}")
    if sources_exist:
        print(f"\n{'frames alone (uint8, no normalisation)':50s}{'clips/s':>10s}{'vs decode':>11s}")
        print(f"{'store (jpeg)':50s}{frame_rate:10.1f}{frame_rate / decode_frames:10.1f}x")
        print(f"{'decode videos':50s}{decode_frames:10.1f}{1.0:10.1f}x")

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
