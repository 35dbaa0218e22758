"""How a store keeps video frames: "jpeg" (quality-95 JPEG per frame, the default) or "raw".

JPEG frames are encoded and decoded by OpenCV (libjpeg-turbo) in threads, which it runs without
the GIL. Raw frames are plain HDF5 chunks, one per frame (`RGB_HDF5` holds their dataset options).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

RGB_CODECS = ("jpeg", "raw")
DEFAULT_RGB_CODEC = "jpeg"
RGB_JPEG_QUALITY = 95  # 42 dB PSNR on real CCTV frames at a seventh of the raw bytes
# "raw": uncompressed chunks, one per frame, with a Fletcher-32 checksum so a corrupted chunk reads
# as an error, not as wrong pixels. Deflate saves ~45% on disk, but inflating a 16-frame 224 px
# clip costs ~12 ms against ~2 ms to read it plain: raw is the fast lossless choice, JPEG the small
# one. Stores written with deflated raw frames read as before (HDF5 undoes its own filters).
RGB_HDF5 = dict(fletcher32=True)


def check_rgb_codec(name: object) -> str:
    if name not in RGB_CODECS:
        raise ValueError(f"unknown rgb codec {name!r} (choose from {', '.join(RGB_CODECS)})")
    return str(name)


def object_array(items: Sequence[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)  # (N,) of 1-D uint8, the shape h5py writes as vlen
    for i, item in enumerate(items):  # element-wise: equal-length items would broadcast to 2-D
        out[i] = item
    return out


def _jpeg_encode(frames: np.ndarray) -> list[np.ndarray]:
    """(N, H, W, 3) uint8 RGB -> N JPEG byte strings (1-D uint8)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, RGB_JPEG_QUALITY]
    out = []
    for frame in frames:
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR), params
        )  # OpenCV writes BGR
        if not ok:
            raise RuntimeError("OpenCV failed to encode a JPEG image")
        out.append(buf.ravel())
    return out


def encode_rgb(rgb: np.ndarray, threads: int = 1) -> np.ndarray:
    """JPEG-encode frames, spread over `threads` threads. Shape: (T, H, W, 3) uint8 -> (T,) object."""
    chunks = np.array_split(rgb, max(1, min(threads, len(rgb))))
    if len(chunks) == 1:
        return object_array(_jpeg_encode(rgb))
    # OpenCV's encoders release the GIL, so threads scale with cores.
    with ThreadPoolExecutor(len(chunks)) as pool:
        parts = list(pool.map(_jpeg_encode, chunks))
    return object_array([payload for part in parts for payload in part])


def _jpeg_decode(payload: np.ndarray) -> np.ndarray | None:
    """One JPEG payload as (H, W, 3) RGB; None when it does not decode (OpenCV asserts on empty)."""
    buf = np.asarray(payload, np.uint8)
    # IMREAD_COLOR_RGB has libjpeg emit RGB directly: no BGR image to reorder afterwards.
    return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB) if buf.size else None


def _jpeg_decode_into(payloads: Sequence[np.ndarray], out: np.ndarray, rows: Iterable[int]) -> None:
    for i in rows:
        img = _jpeg_decode(payloads[i])
        if img is None or img.shape != out.shape[1:]:
            raise ValueError(
                "corrupt rgb payload: the JPEG does not decode to the video's frame size"
            )
        out[i] = img


_MIN_FRAMES_PER_THREAD = 4  # below this a thread's hand-off costs more than it saves
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (pid, threads) -> decoding pool


def _decode_pool(threads: int) -> ThreadPoolExecutor:
    key = (os.getpid(), threads)
    pool = _pools.get(key)
    if pool is None:
        # A forked child inherits the parent's pools without their threads: never reuse those.
        for stale in [k for k in _pools if k[0] != key[0]]:
            del _pools[stale]
        pool = _pools[key] = ThreadPoolExecutor(threads, thread_name_prefix="store-decode")
    return pool


def decode_rgb(payloads: Sequence[np.ndarray], threads: int = 1) -> np.ndarray:
    """Decode JPEG payloads of one video. Shape: (N,) -> (N, H, W, 3) uint8 RGB."""
    if len(payloads) == 0:
        raise ValueError("decode_rgb needs at least one payload (the frame size comes from it)")
    first = _jpeg_decode(payloads[0])
    if first is None:
        raise ValueError("corrupt rgb payload: the JPEG does not decode")
    out = np.empty((len(payloads), *first.shape), np.uint8)
    out[0] = first
    n = len(payloads)
    k = min(threads, (n - 1) // _MIN_FRAMES_PER_THREAD)
    if k <= 1:
        _jpeg_decode_into(payloads, out, range(1, n))
    else:
        # cv2.imdecode releases the GIL; each thread fills every k-th frame of `out`.
        jobs = [range(1 + j, n, k) for j in range(k)]
        list(_decode_pool(k).map(lambda rows: _jpeg_decode_into(payloads, out, rows), jobs))
    return out


def default_decode_threads() -> int:
    # DataLoader workers already keep every core busy with one clip each; threads would contend.
    data = sys.modules.get("torch.utils.data")
    if data is not None and data.get_worker_info() is not None:
        return 1
    return min(4, os.cpu_count() or 1)
