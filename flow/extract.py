"""Dataset extraction: decode videos in worker processes, batch frame pairs through a flow estimator,
write each finished video into the crash-safe store, and record the videos that could not be read."""

from __future__ import annotations

import csv
import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data.flowcodec import DEFAULT_CODEC
from data.manifest import ManifestRow
from data.sampling import Sampling
from data.store import Store, StoreWriter, shard_path, store_exists
from data.video import VideoReadError, read_video
from flow.api import FlowEstimator
from flow.devices import cpu_count

log = logging.getLogger(__name__)

# Root attrs that must match for a rerun to resume into an existing store.
_RESUME_KEYS = ("flow_method", "flow_params", "sampling", "flow_codec", "flow_bound")


@dataclass(frozen=True)
class ExtractConfig:
    method: str = "tvl1"              # optical-flow method: tvl1 | farneback
    backend: str = "auto"             # torch | opencv | auto (torch on CUDA, the measured faster one on CPU)
    device: str = "auto"              # auto | cpu | cuda:N
    sampling: Sampling = Sampling()   # which frames are kept and their size
    flow_codec: str | None = None     # stored form of the flow (None: the store's default codec)
    rgb_codec: str | None = None      # stored form of the frames: jpeg | raw (None: the store's default)
    bound: float = 20.0               # quantisation bound in pixels (TSN: ±20)
    workers: int = 0                  # decoding processes; 0 = one per core
    batch_pairs: int = 0              # pairs gathered across videos per estimator call; 0 = chosen per backend
    shard: tuple[int, int] | None = None  # (i, n): extract the i-th of n disjoint slices into its own file
    flow_params: tuple[tuple[str, object], ...] = ()  # overrides of the method's OpenCV-named parameters


@dataclass(frozen=True)
class Failure:
    video_id: str
    path: str
    reason: str


@dataclass(frozen=True)
class Progress:
    videos_done: int       # written this run or found complete
    videos_failed: int
    videos_total: int
    pairs_done: int        # flow pairs computed this run
    elapsed_s: float


@dataclass
class ExtractSummary:
    store: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)      # already complete before this run
    failures: list[Failure] = field(default_factory=list)
    frames: int = 0
    pairs: int = 0
    seconds: float = 0.0
    failures_csv: Path | None = None

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Decoded:
    row: ManifestRow
    frames: np.ndarray | None     # (T, H, W, 3) uint8
    info: dict
    error: str | None


def shard_rows(rows: Sequence[ManifestRow], index: int, count: int) -> list[ManifestRow]:
    """The `index`-th of `count` disjoint, deterministic slices (by sorted video id)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"bad shard {index}/{count}: need 0 <= i < n")
    return sorted(rows, key=lambda r: r.video_id)[index::count]


def shard_from_env() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when running under torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def failures_path(store: Path) -> Path:
    return store.with_name(store.name + ".failures.csv")


def _decode(row: ManifestRow, sampling: Sampling) -> _Decoded:
    """Worker-process side: read one video; a broken one comes back with its reason."""
    try:
        frames, info, _ = read_video(row.path, sampling)
    except VideoReadError as exc:
        return _Decoded(row, None, {}, str(exc))
    if len(frames) < 2:
        return _Decoded(row, None, {}, f"only {len(frames)} frame(s) after sampling; need at least 2")
    meta = {"source_fps": float(info.fps), "source_size": (int(info.width), int(info.height)),
            "decoded_frames": int(info.decoded_frames)}
    return _Decoded(row, frames, meta, None)


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one core per decoding process; the estimator owns the rest
    _die_with_parent()


def _die_with_parent() -> None:
    """Ask Linux to end this worker when the extracting process dies, even by kill -9."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        log.debug("cannot tie decoding workers to the parent's life on this system")


def _decoded_stream(rows: Sequence[ManifestRow], sampling: Sampling, workers: int, window: int) -> Iterator[_Decoded]:
    """Decoded videos in manifest order, at most `window` decoded ahead (bounded memory)."""
    if workers <= 0:
        for row in rows:
            yield _decode(row, sampling)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
        pending: list[Future] = []
        it = iter(rows)
        for row in it:
            pending.append(pool.submit(_decode, row, sampling))
            if len(pending) >= window:
                break
        while pending:
            done = pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_decode, nxt, sampling))
            yield done


class _Writer(threading.Thread):
    """Writes finished videos from a bounded queue so that encoding and I/O overlap the flow work."""

    def __init__(self, store: StoreWriter):
        super().__init__(daemon=True)
        self.store = store
        self.jobs: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self.store.write(*job)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self.error = exc

    def put(self, *job) -> None:
        if self.error is not None:
            raise self.error
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def _root_attrs(cfg: ExtractConfig, estimator: FlowEstimator, codec: str | None) -> dict:
    return {
        "flow_method": cfg.method,
        "flow_params": repr(sorted(estimator.params.items())),
        "flow_backend": estimator.backend,
        "sampling": repr(sorted(cfg.sampling.to_attrs().items())),
        "flow_codec": codec or DEFAULT_CODEC,
        "flow_bound": float(cfg.bound),
    }


def _check_resumable(path: Path, attrs: dict) -> None:
    if not store_exists(path):
        return
    with Store(path) as store:
        existing = store.root_attrs
    for key in _RESUME_KEYS:
        if key in existing and str(existing[key]) != str(attrs[key]):
            raise ValueError(f"{path} was extracted with {key}={existing[key]}, not {attrs[key]}; write to a new output path")


def extract_dataset(
    rows: Sequence[ManifestRow],
    out: str | Path,
    cfg: ExtractConfig = ExtractConfig(),
    on_progress: Callable[[Progress], None] | None = None,
) -> ExtractSummary:
    """Extract RGB frames and flow for every row into the store at `out` (or its shard file).

    Videos already complete in the store are skipped, so rerunning after a crash finishes the rest.
    Broken videos are skipped, their reasons written to `<store>.failures.csv` and returned.
    """
    out = Path(out)
    if not out.parent.is_dir():
        raise ValueError(f"output folder {out.parent} does not exist")
    shard = cfg.shard or shard_from_env()
    if shard is not None:
        rows = shard_rows(rows, *shard)
        out = shard_path(out, *shard)
    estimator = FlowEstimator(cfg.method, cfg.backend, _device_for(cfg.device, shard), **dict(cfg.flow_params))
    root_attrs = _root_attrs(cfg, estimator, cfg.flow_codec)
    _check_resumable(out, root_attrs)
    codec_kw = {k: v for k, v in (("flow_codec", cfg.flow_codec), ("rgb_codec", cfg.rgb_codec)) if v}
    summary = ExtractSummary(store=out)
    start = time.perf_counter()
    with StoreWriter(out, bound=cfg.bound, root_attrs=root_attrs, **codec_kw) as store:
        done = store.done_ids()
        todo = [r for r in rows if r.video_id not in done]
        summary.skipped = [r.video_id for r in rows if r.video_id in done]
        total = len(rows)
        workers = cfg.workers or cpu_count()
        batch_pairs = cfg.batch_pairs or (estimator.batch_size or (256 if estimator.device.type == "cuda" else 8 * cpu_count()))
        writer = _Writer(store)
        writer.start()

        def report() -> None:
            if on_progress is not None:
                done_n = len(summary.skipped) + len(summary.written)
                on_progress(Progress(done_n, len(summary.failures), total, summary.pairs, time.perf_counter() - start))

        report()
        try:
            gathered: list[_Decoded] = []
            for item in _decoded_stream(todo, cfg.sampling, workers, window=2 * workers + 2):
                if item.error is not None:
                    summary.failures.append(Failure(item.row.video_id, item.row.path, item.error))
                    log.info("skipping %s: %s", item.row.path, item.error)  # returned and in failures.csv
                    report()
                    continue
                gathered.append(item)
                if sum(len(g.frames) - 1 for g in gathered) >= batch_pairs:
                    _flush(gathered, estimator, writer, summary, cfg)
                    gathered = []
                    report()
            _flush(gathered, estimator, writer, summary, cfg)
        finally:
            writer.close()
        store.finalize()
    summary.seconds = time.perf_counter() - start
    report()
    summary.failures_csv = _write_failures(out, summary.failures)
    return summary


def _device_for(device: str, shard: tuple[int, int] | None) -> str:
    """Under torchrun with `auto`, each local rank takes its own GPU."""
    import torch

    if device == "auto" and shard is not None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
    return device


def _flush(gathered: list[_Decoded], estimator: FlowEstimator, writer: _Writer, summary: ExtractSummary, cfg: ExtractConfig) -> None:
    """One estimator call over every pair of the gathered videos; each video then goes to the writer."""
    if not gathered:
        return
    try:
        flows = _flows_for(gathered, estimator)
    except Exception as exc:  # noqa: BLE001 - isolate the video that broke the batch
        if len(gathered) == 1:
            item = gathered[0]
            summary.failures.append(Failure(item.row.video_id, item.row.path, f"flow failed: {exc}"))
            log.info("flow failed for %s: %s", item.row.path, exc)  # returned and in failures.csv
            return
        for item in gathered:
            _flush([item], estimator, writer, summary, cfg)
        return
    for item, flow in zip(gathered, flows):
        row = item.row
        attrs = {
            "label": int(row.label),
            "group": row.group,
            "split": row.split,
            "source_path": str(row.path),
            **item.info,
            **{f"sampling_{k}": v for k, v in cfg.sampling.to_attrs().items()},
            **estimator.describe(),
        }
        writer.put(row.video_id, item.frames, flow, attrs)
        summary.written.append(row.video_id)
        summary.frames += len(item.frames)
        summary.pairs += len(flow)


def _flows_for(gathered: list[_Decoded], estimator: FlowEstimator) -> list[np.ndarray]:
    """Flows of all videos in one call when their frame sizes agree, else one call per size."""
    by_shape: dict[tuple, list[int]] = {}
    for i, item in enumerate(gathered):
        by_shape.setdefault(item.frames.shape[1:], []).append(i)
    flows: list[np.ndarray | None] = [None] * len(gathered)
    for members in by_shape.values():
        prev = np.concatenate([gathered[i].frames[:-1] for i in members])
        nxt = np.concatenate([gathered[i].frames[1:] for i in members])
        out = estimator(prev, nxt)
        offset = 0
        for i in members:
            n = len(gathered[i].frames) - 1
            flows[i] = out[offset : offset + n]
            offset += n
    return flows  # type: ignore[return-value]


def _write_failures(store: Path, failures: list[Failure]) -> Path | None:
    """`<store>.failures.csv` (video_id, path, reason), replaced atomically; removed when nothing failed."""
    path = failures_path(store)
    if not failures:
        if path.exists():
            path.unlink()
        return None
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video_id", "path", "reason"])
        for f in failures:
            w.writerow([f.video_id, f.path, f.reason])
    os.replace(tmp, path)
    return path

