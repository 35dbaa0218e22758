"""Crash-safe HDF5 store of sampled RGB frames and the optical flow between consecutive ones.

Layout of a store file:

    /                         attrs: schema_version, created_at, store_id (random, per store), created_with,
                              + the writer's root_attrs
    /videos/<video_id>/       attrs: as written + rgb_codec, flow_codec, flow_bound, num_frames,
                              flow_nbytes
        rgb                   T frames: (T,) JPEG byte strings for rgb_codec "jpeg", (T, H, W, 3)
                              uint8 with one uncompressed chunk per frame for "raw"; reads as
                              (T, H, W, 3) uint8 RGB either way
        flow                  T-1 fields: (T-1, H, W, 2) for array codecs, (T-1,) byte strings for
                              stream codecs (see data.flowcodec); decodes to (T-1, H, W, 2) float32

RGB codecs: "jpeg" (default) keeps each frame as a quality-95 JPEG: on 224x224 frames of real
CCTV clips 22 KB a frame against 150 KB raw, at a round-trip PSNR of 42 dB. "raw" keeps the exact
pixels uncompressed: seven times the disk, but a clip reads without any decoding, the fastest
form (see benchmarks/loader_bench.py). Stores written before the codec was
recorded have no rgb_codec attr and read as raw; `recode_rgb` converts a store either way.

Reads take any index form. h5py's own selection of scattered rows of a chunked, compressed
dataset is pathologically slow (hundreds of ms for 16 frames), so the store reads the sorted
unique rows as runs of consecutive rows, each one slice, the byte-string payloads of a stream
codec in one read, decodes each wanted frame once and fans the result out to the order asked.

HDF5 is not crash-safe: a process killed inside a write can leave the whole file unreadable. So
the main file is never modified in place. Each video is written to its own file in the sibling
folder `<store>.parts/`, under a temporary name, fsynced and renamed to `<video_id>.h5`: the
rename is the commit. Readers join the main file and the committed parts. `finalize()` copies
main + parts into `<store>.tmp` (raw chunk copies, no recompression), fsyncs it and renames it
over the main file, then deletes the parts. A kill at any instant therefore leaves the old or the
new main file plus parts that at worst duplicate it; readers and `done_ids` de-duplicate, and
leftover temporary files are ignored and removed by the next writer. `finalize()` rewrites the
whole main file, so it belongs at the end of a run (leaving the `with` block does it), not after
every video. A writer holds `<store>.lock` (flock), so a second writer fails instead of racing.

Shards: each extraction process writes `shard_path(store, i, n)`; data.shards joins them (`merge`
copies them into one file, `write_index` joins them without copying) and recodes frames
(`recode_rgb`). Frames are encoded by data.rgbcodec, flow by data.flowcodec; data.h5files holds
the durable-file and attribute helpers.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import h5py
import numpy as np

from data.flowcodec import DEFAULT_CODEC, Codec, decode, encode, get_codec
from data.h5files import (
    JSON_KEYS,
    commit,
    created_with,
    get_attrs,
    lock_path,
    now,
    parts_dir,
    plain,
    put_attrs,
    same_value,
    tmp_path,
    unlink_quiet,
)
from data.rgbcodec import (
    DEFAULT_RGB_CODEC,
    RGB_CODECS,
    RGB_HDF5,
    check_rgb_codec,
    decode_rgb,
    default_decode_threads,
    encode_rgb,
)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the one-writer rule is then the caller's.
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Provenance every video must carry (DESIGN.md "Store"); write() refuses attrs without them.
REQUIRED_ATTRS = ("label", "group", "source_path", "source_fps", "source_size", "flow_method")
# Written by the store itself next to the caller's attrs.
STORE_ATTRS = ("rgb_codec", "flow_codec", "flow_bound", "num_frames", "flow_nbytes")
# Store attrs that stores written by earlier versions lack; their absence has a meaning.
_OPTIONAL_STORE_ATTRS = ("rgb_codec",)  # absent: "raw"
_STREAM_CHUNK = 64  # byte-string references per chunk; the payloads themselves live in the heap
_MAX_OPEN_FILES = 64  # part files kept open per reader process (an unfinalized store has many)


class MissingVideoError(KeyError, ValueError):
    """A video id the store does not hold (a KeyError for mappings, a ValueError for the CLI)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingDatasetError(MissingVideoError):
    """A listed video without the dataset asked for (e.g. no flow); a KeyError and a ValueError."""


class FeatureCacheError(ValueError):
    """A feature cache (streams.features) given where a store is expected."""


class CorruptStoreError(ValueError):
    """Part of a store that h5py cannot open or read: the file is damaged. One line naming both."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


# What h5py raises for a damaged file: KeyError (an object header it cannot open), OSError (data
# it cannot read), RuntimeError (a link table it cannot iterate).
_H5_ERRORS = (KeyError, OSError, RuntimeError)


def _h5_reason(err: BaseException) -> str:
    """HDF5's own words, e.g. 'bad object header version number', without h5py's wrapping."""
    text = str(err.args[0]) if err.args else type(err).__name__
    inner = re.search(r"\(([^()]*)\)\s*$", text)
    return inner.group(1) if inner else text


# --- paths -------------------------------------------------------------------------------------

def _part_name(video_id: str) -> str:
    # Percent-encoding keeps any id a single portable file name.
    return quote(video_id, safe="") + ".h5"


def _check_video_id(video_id: object) -> str:
    if not isinstance(video_id, str) or video_id in ("", ".", ".."):
        raise ValueError(
            f"video id must be a non-empty string other than '.' and '..', got {video_id!r}"
        )
    if "/" in video_id or "\0" in video_id:
        raise ValueError(f"video id {video_id!r} must not contain '/' or NUL")
    if len(_part_name(video_id).encode()) > 240:
        raise ValueError(f"video id {video_id[:40]!r}... is too long for a file name")
    return video_id


def shard_path(path: str | Path, index: int, count: int) -> Path:
    """The file shard `index` of `count` writes, e.g. store.h5 -> store.shard-0-of-4.h5."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index} of {count} is out of range (need 0 <= index < count)")
    path = Path(path)
    return path.with_name(f"{path.stem}.shard-{index}-of-{count}{path.suffix}")


def store_exists(path: str | Path) -> bool:
    """Whether a store is at `path`: its main file, or the committed parts of an extraction still running."""
    path = Path(path)
    return path.exists() or parts_dir(path).is_dir()


def store_identity(root_attrs: dict) -> str:
    """What tells a store from another one at the same path (deleted and extracted again, or grown
    by a later extraction, which draws a new id): its `store_id`, or for a store made before
    those were recorded its creation time; "" if neither."""
    return str(root_attrs.get("store_id") or root_attrs.get("created_at") or "")


def identity_of(path: str | Path) -> str:
    """`store_identity` of the store at `path`."""
    with Store(path) as s:
        return store_identity(s.root_attrs)


def require_store(path: str | Path) -> Path:
    """`path` as a Path; FileNotFoundError (one line, saying how to make one) when no store is there."""
    path = Path(path)
    if not store_exists(path):
        raise FileNotFoundError(f"store {path} does not exist; make it with `twostream extract`")
    return path


# --- locking -----------------------------------------------------------------------------------


def _acquire_lock(path: Path) -> int | None:
    """Hold `<store>.lock` so a second writer fails loudly instead of corrupting the parts."""
    if fcntl is None:
        return None
    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"{path} is being written by another process (it holds {lock})"
            ) from None
        # A writer that was releasing may have unlinked the file we locked; then lock the new one.
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _release_lock(path: Path, fd: int | None) -> None:
    if fd is None:
        return
    unlink_quiet(lock_path(path))
    os.close(fd)


# --- writing -----------------------------------------------------------------------------------


def _check_video(rgb: np.ndarray, flow: np.ndarray) -> None:
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (T, H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if rgb.shape[0] < 2:
        raise ValueError(f"a video needs at least 2 frames to have flow, got {rgb.shape[0]}")
    if flow.ndim != 4 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be (T-1, H, W, 2), got {flow.shape}")
    if flow.shape[0] != rgb.shape[0] - 1:
        raise ValueError(
            f"{rgb.shape[0]} frames need {rgb.shape[0] - 1} flow fields, got {flow.shape[0]}"
        )
    if flow.shape[1:3] != rgb.shape[1:3]:
        raise ValueError(f"flow is {flow.shape[1:3]} but the frames are {rgb.shape[1:3]}")


def _check_attrs(attrs: dict) -> None:
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise ValueError(
            f"video attrs lack {', '.join(missing)} (required: {', '.join(REQUIRED_ATTRS)})"
        )
    reserved = [k for k in STORE_ATTRS if k in attrs]
    if reserved:
        raise ValueError(
            f"video attrs {', '.join(reserved)} are written by the store; leave them out"
        )
    try:
        int(attrs["label"])
    except (TypeError, ValueError):
        raise ValueError(f"video label must be an integer, got {attrs['label']!r}") from None


def write_payloads(group: h5py.Group, name: str, payloads: np.ndarray) -> h5py.Dataset:
    """A (N,) variable-length uint8 dataset holding one byte string per frame or field."""
    ds = group.create_dataset(
        name,
        shape=(len(payloads),),
        dtype=h5py.vlen_dtype(np.uint8),
        chunks=(min(len(payloads), _STREAM_CHUNK),),
    )
    # The low-level write takes the (N,) object array as is; h5py's ds[...] = payloads would
    # first fuse equal-length payloads (a static camera) into a 2-D array and fail.
    ds.id.write(h5py.h5s.ALL, h5py.h5s.ALL, payloads)
    return ds


def _write_video(
    videos: h5py.Group,
    video_id: str,
    rgb: np.ndarray,
    rgb_stored: np.ndarray | None,
    stored: np.ndarray,
    codec: Codec,
    bound: float,
    attrs: dict,
) -> None:
    t, h, w, _ = rgb.shape
    group = videos.create_group(video_id)
    if rgb_stored is None:
        group.create_dataset("rgb", data=rgb, chunks=(1, h, w, 3), **RGB_HDF5)
    else:
        write_payloads(group, "rgb", rgb_stored)
    if codec.stream:
        ds = write_payloads(group, "flow", stored)
        group.file.flush()
        nbytes = sum(int(b.size) for b in stored) + ds.id.get_storage_size()
    else:
        ds = group.create_dataset("flow", data=stored, chunks=(1, h, w, 2), **codec.hdf5)
        group.file.flush()
        nbytes = ds.id.get_storage_size()
    extra = dict(
        rgb_codec="raw" if rgb_stored is None else "jpeg",
        flow_codec=codec.name,
        flow_bound=float(bound),
        num_frames=int(t),
        flow_nbytes=int(nbytes),
    )
    put_attrs(group, {**attrs, **extra})


def _committed_parts(parts: Path) -> dict[str, Path]:
    if not parts.is_dir():
        return {}
    return {unquote(p.name[: -len(".h5")]): p for p in sorted(parts.glob("*.h5"))}


class StoreWriter:
    """Writes videos into a store, each one durable once `write` returns; one writer per file.

    `with StoreWriter(path) as w:` finalizes on a clean exit and leaves an interrupted run
    resumable: skip `w.done_ids()` and write the rest. `flow_codec` and `rgb_codec` ("jpeg":
    quality-95 JPEG per frame; "raw": exact, uncompressed) are recorded per video, so one store may
    mix them; frames and flow fields are encoded on `threads` threads.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        flow_codec: str = DEFAULT_CODEC,
        rgb_codec: str = DEFAULT_RGB_CODEC,
        bound: float = 20.0,
        root_attrs: dict | None = None,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        # Encoding qwebp costs more CPU than anything else in write(); None: up to 4 cores.
        self.threads = threads if threads is not None else min(4, os.cpu_count() or 1)
        self.rgb_codec = check_rgb_codec(rgb_codec)
        self.codec = get_codec(flow_codec)
        self.bound = float(bound)
        encode(np.zeros((1, 1, 1, 2), np.float32), self.codec, self.bound)  # bad bound: fail now
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path.parent}: no such directory for the store")
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a directory, not a store file")
        self._root_attrs = dict(root_attrs or {})
        for key in ("schema_version", JSON_KEYS):
            self._root_attrs.pop(key, None)
        self._lock = _acquire_lock(self.path)
        self._closed = False
        try:
            self._parts = parts_dir(self.path)
            self._clean_stale()
            self._done = self._open_main()
        except BaseException:
            _release_lock(self.path, self._lock)
            self._lock = None
            raise

    def _clean_stale(self) -> None:
        # Only this writer ever creates temporary files here, so any that exist are a dead run's.
        unlink_quiet(tmp_path(self.path))
        if self._parts.is_dir():
            for stale in self._parts.glob("*.tmp"):
                logger.info("removing %s left by an interrupted write", stale)
                unlink_quiet(stale)

    def _open_main(self) -> set[str]:
        main_ids: set[str] = set()
        if self.path.exists():
            try:
                with h5py.File(self.path, "r") as f:
                    if f.attrs.get("store_kind") == "index":
                        raise ValueError(
                            f"{self.path} is a shard index; write to its shards instead"
                        )
                    version = f.attrs.get("schema_version")
                    if version != SCHEMA_VERSION:
                        raise ValueError(
                            f"{self.path} has store schema {version}, this code writes {SCHEMA_VERSION}"
                        )
                    main_ids = set(f["videos"].keys()) if "videos" in f else set()
            except OSError as err:
                raise ValueError(f"{self.path} is not a readable HDF5 store ({err})") from None
        else:
            tmp = tmp_path(self.path)
            with h5py.File(tmp, "w") as f:
                f.create_group("videos")
                put_attrs(f, self._root_header())
            commit(tmp, self.path)
        return main_ids | set(_committed_parts(self._parts))

    def _root_header(self, base: dict | None = None) -> dict:
        header = dict(base or {})
        header.setdefault("created_at", now())
        header.setdefault("store_id", uuid.uuid4().hex)  # tells this store from one made again at its path
        header.update(
            schema_version=SCHEMA_VERSION,
            created_with=created_with(),
            rgb_codec=self.rgb_codec,
            flow_codec=self.codec.name,
            flow_bound=self.bound,
        )
        header.update(self._root_attrs)
        return header

    def done_ids(self) -> set[str]:
        """Videos already complete, in the main file or written aside by an interrupted run."""
        return set(self._done)

    def write(self, video_id: str, rgb: np.ndarray, flow: np.ndarray, attrs: dict) -> None:
        """Store one video atomically: durable when this returns, invisible if killed before.

        Shape: rgb (T, H, W, 3) uint8, flow (T-1, H, W, 2) float32 px (dx, dy).
        """
        if self._closed:
            raise ValueError(f"the writer of {self.path} is closed")
        _check_video_id(video_id)
        if video_id in self._done:
            raise ValueError(f"video {video_id!r} is already in {self.path}")
        rgb, flow = np.asarray(rgb), np.asarray(flow)
        _check_video(rgb, flow)
        _check_attrs(attrs)
        stored = encode(flow, self.codec, self.bound, threads=self.threads)
        rgb_stored = encode_rgb(rgb, self.threads) if self.rgb_codec == "jpeg" else None
        self._parts.mkdir(exist_ok=True)
        tmp = self._parts / f".{uuid.uuid4().hex}.tmp"
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["schema_version"] = SCHEMA_VERSION
                _write_video(
                    f.create_group("videos"),
                    video_id,
                    rgb,
                    rgb_stored,
                    stored,
                    self.codec,
                    self.bound,
                    attrs,
                )
            commit(tmp, self._parts / _part_name(video_id))
        finally:
            unlink_quiet(tmp)
        self._done.add(video_id)
        logger.debug("stored %s: %d frames", video_id, rgb.shape[0])

    def finalize(self) -> Path:
        """Join the main file and every committed part into the main file, atomically; idempotent."""
        parts = _committed_parts(self._parts)
        with h5py.File(self.path, "r") as main:
            root = get_attrs(main)
            if not parts and all(same_value(root.get(k), v) for k, v in self._root_attrs.items()):
                self._remove_parts_dir()
                return self.path
            tmp = tmp_path(self.path)
            with h5py.File(tmp, "w") as out:
                videos = out.create_group("videos")
                for video_id in main["videos"] if "videos" in main else ():
                    if video_id not in parts:  # a part that duplicates main is the same video
                        videos.copy(main["videos"][video_id], videos, name=video_id)
                for video_id, part in parts.items():
                    try:
                        with h5py.File(part, "r") as src:
                            videos.copy(src["videos"][video_id], videos, name=video_id)
                    except (OSError, KeyError) as err:
                        raise ValueError(
                            f"{part}: unreadable part file ({err}); remove it and rewrite that video"
                        ) from None
                header = self._root_header(root)
                if parts and "videos" in main and len(main["videos"]):
                    header["store_id"] = uuid.uuid4().hex  # videos joined a finished store: not the store it was
                put_attrs(out, {**header, "finalized_at": now()})
        commit(tmp, self.path)
        for part in parts.values():
            unlink_quiet(part)
        self._remove_parts_dir()
        logger.info("finalized %s: %d videos joined", self.path, len(parts))
        return self.path

    def _remove_parts_dir(self) -> None:
        try:
            self._parts.rmdir()
        except OSError:  # absent, or holding files this run did not commit
            pass

    def close(self) -> None:
        """Release the store (without finalizing); the writer cannot write afterwards."""
        _release_lock(self.path, self._lock)
        self._lock = None
        self._closed = True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finalize()
        finally:
            self.close()


# --- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Selection:
    """Which rows of a (N, ...) dataset to read for an index, and how to hand them back."""

    rows: slice | np.ndarray  # a forward slice, or sorted unique row numbers (not one run)
    count: int  # rows read
    inverse: np.ndarray | None  # read rows -> asked order (repeats allowed); None: as read
    scalar: bool  # an int index: drop the leading axis


def _select(n: int, index: object) -> _Selection:
    """Rows of a dataset of `n` rows picked by a slice, an int, or ints (any order, repeats allowed)."""
    if isinstance(index, slice):
        start, stop, step = index.indices(n)
        if step == 1 or (step > 0 and stop - start <= 1):
            return _Selection(slice(start, max(start, stop)), max(0, stop - start), None, False)
        index = np.arange(start, stop, step)
    idx = np.asarray(index)
    scalar = idx.ndim == 0
    idx = idx.reshape(-1)
    if idx.size and idx.dtype.kind not in "iu":
        raise IndexError(f"frame index must be a slice, an int or ints, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    bad = (idx < -n) | (idx >= n)
    if bad.any():
        raise IndexError(f"frame index {int(idx[bad][0])} is out of range for {n} rows")
    idx = np.where(idx < 0, idx + n, idx)
    if idx.size == 0:
        return _Selection(slice(0, 0), 0, None, scalar)
    uniq, inverse = np.unique(idx, return_inverse=True)
    # Already sorted and unique (a uniform clip of a long video): no reordering copy needed.
    in_order = uniq.size == idx.size and bool(np.all(idx[1:] > idx[:-1]))
    fan_out = None if in_order else inverse.reshape(-1)
    if uniq[-1] - uniq[0] + 1 == uniq.size:
        return _Selection(slice(int(uniq[0]), int(uniq[-1]) + 1), int(uniq.size), fan_out, scalar)
    return _Selection(uniq, int(uniq.size), fan_out, scalar)


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of consecutive numbers in sorted unique `rows`."""
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def _read_array(ds: h5py.Dataset, sel: _Selection) -> np.ndarray:
    """The selected rows of a chunked array dataset, each run of consecutive rows one slice."""
    if isinstance(sel.rows, slice):
        return ds[sel.rows]
    out = np.empty((sel.count, *ds.shape[1:]), ds.dtype)
    at = 0
    for start, stop in _runs(sel.rows):
        ds.read_direct(out, np.s_[start:stop], np.s_[at : at + stop - start])
        at += stop - start
    return out


def _read_payloads(ds: h5py.Dataset, sel: _Selection) -> np.ndarray:
    """The selected byte strings of a (N,) variable-length dataset, in one read. Shape: (count,)."""
    out = np.empty(sel.count, dtype=ds.dtype)
    if sel.count == 0:
        return out
    space = ds.id.get_space()
    if isinstance(sel.rows, slice):
        space.select_hyperslab((sel.rows.start,), (sel.count,))
    else:
        space.select_none()
        for start, stop in _runs(sel.rows):
            space.select_hyperslab((start,), (stop - start,), op=h5py.h5s.SELECT_OR)
    ds.id.read(h5py.h5s.create_simple((sel.count,)), space, out)
    return out


def _hand_back(rows: np.ndarray, sel: _Selection) -> np.ndarray:
    rows = rows if sel.inverse is None else rows[sel.inverse]
    return rows[0] if sel.scalar else rows


@dataclass(frozen=True)
class _VideoMeta:
    """What reading a video needs from its attrs, read once per process (attrs reads are slow)."""

    rgb_codec: str  # "jpeg" or "raw"
    flow_codec: str | None  # None where the attr is missing (validate reports it)
    flow_bound: float | None  # px; None: not recorded
    num_frames: int
    label: int | None


class Store:
    """Reads a store: a main file with any committed parts beside it, or a shard index.

    Cheap to build and to pickle; files open on first access in each process (DataLoader
    workers), so a Store made in the parent can be handed to spawned or forked workers.
    `threads` decode JPEG frames in parallel; None: one inside a DataLoader worker (the workers
    already fill the cores), else up to 4.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        self.path = Path(path)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1 (or None), got {threads}")
        self.threads = threads
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a directory, not a store file")
        if not self.path.is_file() and not parts_dir(self.path).is_dir():
            raise FileNotFoundError(f"{self.path}: no such store")
        self._catalogue: dict[str, Path] | None = None  # video id -> file holding /videos/<id>
        self._root: dict = {}
        self._files: list[Path] = []  # every file the store is made of, for validate/disk_bytes
        self._problems: list[str] = []  # found while cataloguing
        self._metas: dict[str, _VideoMeta] = {}  # video id -> what reading it needs
        self._handles: OrderedDict[Path, h5py.File] = OrderedDict()
        self._pid = os.getpid()

    # -- process-local state

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()  # h5py handles never cross a process boundary
        return state

    def _file(self, path: Path) -> h5py.File:
        if self._pid != os.getpid():
            # Handles inherited through fork are not safe to use; drop them without closing.
            self._handles = OrderedDict()
            self._pid = os.getpid()
        handle = self._handles.get(path)
        if handle is not None and handle.id.valid:
            self._handles.move_to_end(path)
            return handle
        handle = h5py.File(path, "r")
        self._handles[path] = handle
        while len(self._handles) > _MAX_OPEN_FILES:
            _, oldest = self._handles.popitem(last=False)
            oldest.close()
        return handle

    def close(self) -> None:
        """Close every open file in this process (the next access reopens)."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- catalogue

    def _open_store_file(self, path: Path) -> h5py.File:
        try:
            return self._file(path)
        except OSError as err:
            raise ValueError(f"{path} is not a readable HDF5 store ({err})") from None

    def _list_videos(self, path: Path, f: h5py.File) -> list[str]:
        """The video ids of one store file; ValueError for an HDF5 file that is not a store."""
        try:
            if "feature_dim" in f.attrs and "backbone" in f.attrs:
                source = f.attrs.get("store")
                source = f" ({plain(source)})" if source is not None else ""
                raise FeatureCacheError(
                    f"{path} is a feature cache (written by `twostream features` or training), "
                    f"not a twostream store; pass the store it was made from{source}"
                )
            if "videos" not in f:
                return []
            ids = list(f["videos"].keys())
            if ids:
                try:
                    first = f["videos"][ids[0]]
                except _H5_ERRORS:
                    return ids  # a damaged video: reported by validate and by any read of it
                if isinstance(first, h5py.Group) and "rgb" not in first and "flow" not in first:
                    kind = "a feature cache" if "features" in first else "an HDF5 file without rgb or flow"
                    raise ValueError(
                        f"{path} is not a twostream store ({kind}); make one with `twostream extract`"
                    )
            return ids
        except _H5_ERRORS as err:
            raise CorruptStoreError(
                f"store {path}: cannot list its videos ({_h5_reason(err)}); the file is damaged",
                _h5_reason(err),
            ) from None

    def _scan(self) -> dict[str, Path]:
        if self._catalogue is not None:
            return self._catalogue
        catalogue: dict[str, Path] = {}
        files: list[Path] = []
        problems: list[str] = []
        mains = [self.path]
        if self.path.is_file():
            f = self._open_store_file(self.path)
            try:
                self._root = get_attrs(f)
            except _H5_ERRORS as err:
                raise CorruptStoreError(
                    f"store {self.path}: its attributes are unreadable ({_h5_reason(err)}); "
                    "the file is damaged", _h5_reason(err)
                ) from None
            if self._root.get("store_kind") == "index":
                files.append(self.path)
                mains = [(self.path.parent / s) for s in self._root.get("shards", [])]
        for main in mains:
            shard: dict[str, Path] = {}
            if main.is_file():
                files.append(main)
                f = self._open_store_file(main)
                shard.update(dict.fromkeys(self._list_videos(main, f), main))
            elif main != self.path:
                problems.append(f"{main}: shard file missing")
            parts = _committed_parts(parts_dir(main))
            shard.update(parts)  # a part duplicating main is the same video, mid-finalize
            files.extend(parts.values())
            for video_id, where in shard.items():
                if video_id in catalogue:
                    problems.append(f"{video_id}: in both {catalogue[video_id]} and {where}")
                    continue
                catalogue[video_id] = where
        self._files, self._problems = files, problems
        self._catalogue = dict(sorted(catalogue.items()))
        return self._catalogue

    def group(self, video_id: str, member: str = "") -> h5py.Group | h5py.Dataset:
        """The video's group, or its dataset `member` (one path lookup: cheaper than two).

        MissingVideoError for an id the store lacks, MissingDatasetError for a missing `member`,
        CorruptStoreError (one line naming the store and the video) for one h5py cannot open.
        """
        where = self._scan().get(video_id)
        if where is None:
            raise MissingVideoError(f"video {video_id!r} is not in {self.path}")
        path = f"videos/{video_id}/{member}" if member else f"videos/{video_id}"
        try:
            return self._file(where)[path]
        except FileNotFoundError:
            # A writer finalized since we looked: its parts are now inside a new main file, and
            # an open handle would still show the old one.
            self.close()
            self._catalogue = None
            self._metas.clear()
            where = self._scan().get(video_id)
            if where is None:
                raise MissingVideoError(f"video {video_id!r} is not in {self.path}") from None
            try:
                return self._file(where)[path]
            except _H5_ERRORS as err:
                raise self._lookup_error(where, video_id, member, err) from None
        except _H5_ERRORS as err:
            raise self._lookup_error(where, video_id, member, err) from None

    def _lookup_error(self, where: Path, video_id: str, member: str, err: BaseException) -> Exception:
        """Why `videos/<video_id>/<member>` did not open: a missing dataset, or a damaged file."""
        if member:
            try:
                group = self._file(where)[f"videos/{video_id}"]
                missing = member not in group
            except _H5_ERRORS:
                missing = False
            if missing:
                return MissingDatasetError(f"video {video_id!r} in {self.path} has no {member!r} dataset")
        return self._damaged(video_id, err, where)

    def _damaged(self, video_id: str, err: BaseException, where: Path | None = None, what: str = "") -> CorruptStoreError:
        reason = _h5_reason(err)
        inside = f" (in {where})" if where is not None and where != self.path else ""
        what = f" {what}" if what else ""
        return CorruptStoreError(
            f"store {self.path}: video {video_id!r}{inside}{what} is unreadable ({reason}); the file "
            "is damaged: re-extract the store or restore a copy",
            reason,
        )

    @property
    def video_ids(self) -> list[str]:
        return list(self._scan())

    def __len__(self) -> int:
        return len(self._scan())

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._scan()

    @property
    def root_attrs(self) -> dict:
        self._scan()
        return dict(self._root)

    def attrs(self, video_id: str) -> dict:
        group = self.group(video_id)
        try:
            return get_attrs(group)
        except _H5_ERRORS as err:
            raise self._damaged(video_id, err, what="attributes") from None

    def _meta(self, video_id: str) -> _VideoMeta:
        meta = self._metas.get(video_id)
        if meta is None:
            group = self.group(video_id)
            num_frames = int(self.group(video_id, "rgb").shape[0])
            try:
                attrs = group.attrs
                codec, bound, label = (attrs.get(k) for k in ("flow_codec", "flow_bound", "label"))
                rgb_codec = attrs.get("rgb_codec", "raw")  # written before the attr: raw
            except _H5_ERRORS as err:
                raise self._damaged(video_id, err, what="attributes") from None
            meta = self._metas[video_id] = _VideoMeta(
                rgb_codec=plain(rgb_codec),
                flow_codec=None if codec is None else plain(codec),
                flow_bound=None if bound is None else float(bound),
                num_frames=num_frames,
                label=None if label is None else int(label),
            )
        return meta

    def label(self, video_id: str) -> int:
        label = self._meta(video_id).label
        if label is None:
            raise ValueError(f"video {video_id!r} in {self.path} has no label attr")
        return label

    def recording(self, video_id: str) -> str:
        """The video's source recording (its `group` attr); a video without one is its own recording."""
        return str(self.attrs(video_id).get("group") or video_id)

    def num_frames(self, video_id: str) -> int:
        return self._meta(video_id).num_frames

    def rgb_codec(self, video_id: str) -> str:
        """How the video's frames are stored: "jpeg" or "raw"."""
        return self._meta(video_id).rgb_codec

    def flow_bound(self, video_id: str) -> float:
        """The bound (px) the video's flow was stored with, else the store's, else TSN's 20."""
        bound = self._meta(video_id).flow_bound
        return bound if bound is not None else float(self.root_attrs.get("flow_bound", 20.0))

    def frame_size(self, video_id: str) -> tuple[int, int]:
        """(H, W) of the video's frames."""
        group = self.group(video_id)
        if self._meta(video_id).rgb_codec == "raw":
            return tuple(group["rgb"].shape[1:3])  # type: ignore[return-value]
        return self.rgb(video_id, 0).shape[:2]  # a JPEG's size is only known once decoded

    # -- data

    def rgb(self, video_id: str, index: object = slice(None)) -> np.ndarray:
        """Frames of a video in RGB order. Shape: (t, H, W, 3) uint8 ((H, W, 3) for an int index)."""
        meta = self._meta(video_id)
        ds = self.group(video_id, "rgb")
        sel = _select(ds.shape[0], index)
        if meta.rgb_codec == "raw":
            return _hand_back(self._read(video_id, "rgb", _read_array, ds, sel), sel)
        if meta.rgb_codec != "jpeg":
            raise ValueError(f"video {video_id!r} has unknown rgb codec {meta.rgb_codec!r}")
        if sel.count == 0:
            h, w = self.frame_size(video_id) if ds.shape[0] else (0, 0)
            return np.zeros((0, h, w, 3), np.uint8)
        threads = self.threads or default_decode_threads()
        payloads = self._read(video_id, "rgb", _read_payloads, ds, sel)
        try:
            return _hand_back(decode_rgb(payloads, threads), sel)
        except ValueError as err:  # a payload that does not decode: say which video
            raise ValueError(f"store {self.path}: video {video_id!r}: {err}") from None

    def flow(self, video_id: str, index: object = slice(None)) -> np.ndarray:
        """Decoded flow fields of a video. Shape: (t, H, W, 2) float32 px ((H, W, 2) for an int)."""
        meta = self._meta(video_id)
        ds = self.group(video_id, "flow")
        sel = _select(ds.shape[0], index)
        if sel.count == 0:
            return np.zeros((0, *self.frame_size(video_id), 2), np.float32)
        if meta.flow_codec is None:
            raise ValueError(f"video {video_id!r} in {self.path} has no flow_codec attr")
        codec = get_codec(meta.flow_codec)
        rows = self._read(video_id, "flow", _read_payloads if codec.stream else _read_array, ds, sel)
        try:
            return _hand_back(decode(rows, codec, self.flow_bound(video_id)), sel)
        except ValueError as err:  # a payload that does not decode: say which video
            raise ValueError(f"store {self.path}: video {video_id!r}: {err}") from None

    def _read(self, video_id: str, name: str, read, ds: h5py.Dataset, sel: _Selection) -> np.ndarray:
        """`read(ds, sel)`, with h5py's failure to read a damaged file as a one-line CorruptStoreError."""
        try:
            return read(ds, sel)
        except (OSError, RuntimeError) as err:
            raise self._damaged(video_id, err, what=f"{name} data") from None

    # -- checks and sizes

    def validate(self) -> list[str]:
        """Human-readable problems, empty when every video reads back whole and consistent."""
        try:
            catalogue = self._scan()
        except (OSError, ValueError, KeyError) as err:
            return [f"{self.path}: cannot open ({err})"]
        problems = list(self._problems)
        for path in self._files:
            try:
                version = self._file(path).attrs.get("schema_version")
            except OSError as err:
                problems.append(f"{path}: unreadable ({err})")
                continue
            if version != SCHEMA_VERSION:
                problems.append(f"{path}: schema version {version}, expected {SCHEMA_VERSION}")
        for video_id in catalogue:
            try:
                problems.extend(f"{video_id}: {p}" for p in self._check_video(video_id))
            except CorruptStoreError as err:
                problems.append(f"{video_id}: unreadable ({err.reason})")
            except Exception as err:  # any failure to read is a finding, not a crash
                text = str(err).strip().splitlines()
                problems.append(f"{video_id}: unreadable ({type(err).__name__}: {text[0] if text else ''})")
        return problems

    def _check_video(self, video_id: str) -> list[str]:
        group = self.group(video_id)
        attrs = self.attrs(video_id)
        expected = [k for k in REQUIRED_ATTRS + STORE_ATTRS if k not in _OPTIONAL_STORE_ATTRS]
        problems = [f"missing attr {k!r}" for k in expected if k not in attrs]
        if "rgb" not in group or "flow" not in group:
            return problems + ["missing rgb or flow dataset"]
        rgb, flow = self.group(video_id, "rgb"), self.group(video_id, "flow")
        codec = attrs.get("rgb_codec", "raw")
        if codec not in RGB_CODECS:
            return problems + [f"unknown rgb codec {codec!r}"]
        if codec == "raw" and (rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8):
            return problems + [f"rgb is {rgb.shape} {rgb.dtype}, expected (T, H, W, 3) uint8"]
        if codec == "jpeg" and (rgb.ndim != 1 or h5py.check_vlen_dtype(rgb.dtype) != np.uint8):
            return problems + [f"rgb is {rgb.shape} {rgb.dtype}, expected (T,) JPEG byte strings"]
        t = rgb.shape[0]
        h, w = self.frame_size(video_id) if t else (0, 0)
        if t < 2:
            problems.append(f"{t} frames, expected at least 2")
        if flow.shape[0] != t - 1:
            problems.append(f"{flow.shape[0]} flow fields for {t} frames, expected {t - 1}")
        if "num_frames" in attrs and attrs["num_frames"] != t:
            problems.append(f"attr num_frames={attrs['num_frames']} but rgb holds {t} frames")
        for start in range(0, t, 16):  # read everything: corrupt chunks only show when decoded
            frames = self.rgb(video_id, slice(start, start + 16))
            if frames.shape[1:] != (h, w, 3):
                problems.append(f"frames decode to {frames.shape[1:]}, expected {(h, w, 3)}")
                break
        if "flow_codec" in attrs and "flow_bound" in attrs:
            get_codec(attrs["flow_codec"])
            for start in range(0, flow.shape[0], 16):
                fields = self.flow(video_id, slice(start, start + 16))
                if fields.shape[1:] != (h, w, 2):
                    problems.append(f"flow decodes to {fields.shape[1:]}, expected {(h, w, 2)}")
                    break
                if not np.isfinite(fields).all():
                    problems.append("flow holds NaN or infinite values")
                    break
        return problems

    def disk_bytes(self) -> int:
        """Bytes on disk of every file the store is made of."""
        self._scan()
        return sum(p.stat().st_size for p in self._files if p.exists())

    def flow_bytes_per_field(self, video_ids: list[str] | None = None) -> float:
        """Mean stored bytes per flow field (encoded payloads plus HDF5 chunk storage) of
        `video_ids` (default: every video)."""
        nbytes = fields = 0
        for video_id in self._scan() if video_ids is None else video_ids:
            nbytes += int(self.attrs(video_id).get("flow_nbytes", 0))
            fields += int(self.group(video_id, "flow").shape[0])
        return nbytes / fields if fields else 0.0
