"""Flow codecs: how a (N, H, W, 2) float32 flow in pixels is turned into what the store keeps.

Two kinds of codec exist. Array codecs ("uint8", "float16") return an (N, H, W, 2) array that the
store writes as a chunked, compressed HDF5 dataset. Stream codecs ("qwebp", "jpeg") return one
self-contained byte string per field, (N,) object array of 1-D uint8 arrays, which the store
writes as a variable-length dataset; every field decodes on its own, so a clip of L consecutive
fields costs L small reads.

- "uint8": TSN quantisation, q = round((f + bound) * 255 / (2 * bound)) clipped to 0..255;
  deflate (gzip 9) in HDF5. Zero lies between two levels: a still pixel is off by 0.078 px.
- "float16": half precision, not clipped; deflate after HDF5's byte shuffle.
- "jpeg": the denseflow/TSN interchange format, dx and dy each TSN-quantised and written as a
  grayscale JPEG at quality 95. Kept as the reference the default is measured against.
- "qwebp" (default): uniform quantisation with a step of 0.25 px and zero as a level, so still
  background costs neither error nor bits; the codes are coded losslessly as one WebP image
  (B = dx, G = dy, R = 0). The error never exceeds half a step (0.125 px per component) inside
  ±bound. On TV-L1 flows of real surveillance clips it stores about a third of the bytes of the
  JPEG pair, with lower mean, moving-pixel and worst-case error (benchmarks/codec_bench.py).
  On dense synthetic motion (every pixel moving) its mean error exceeds the JPEG pair's;
  "qwebp-fine" (step bound / 127 = 0.157 px, TSN's error bound) is the choice for such content.
  Lossless WebP is slow to encode (about 9 ms of CPU per 224x224 field, 30x the JPEG pair), so
  `encode(..., threads=n)` spreads a video's fields over threads; decoding takes about 0.2-0.4 ms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np

DEFAULT_CODEC = "qwebp"
QWEBP_STEP = 0.25  # px; keeps the error on moving pixels clearly below the JPEG pair's
JPEG_QUALITY = 95  # the quality TSN/denseflow flow JPEGs are written at
_WEBP_LOSSLESS = [cv2.IMWRITE_WEBP_QUALITY, 101]  # OpenCV switches WebP to lossless above 100


@dataclass(frozen=True)
class Codec:
    """A named way of storing flow; `encode`/`decode` take the flow bound in px as second argument."""

    name: str  # the registry key, written into every video's attrs
    stream: bool  # True: one byte string per field; False: an (N, H, W, 2) array
    encode: Callable[[np.ndarray, float], np.ndarray]  # (N, H, W, 2) float32 px -> stored form
    decode: Callable[[object, float], np.ndarray]  # stored form -> (N, H, W, 2) float32 px
    hdf5: dict = field(default_factory=dict)  # h5py create_dataset options for the stored form


def _tsn_quantise(flow: np.ndarray, bound: float) -> np.ndarray:
    """(N, H, W, 2) float32 px -> (N, H, W, 2) uint8, TSN's affine map of [-bound, bound] to 0..255."""
    q = np.rint((flow + bound) * (255.0 / (2.0 * bound)))
    return np.clip(q, 0, 255).astype(np.uint8)


def _dequantise(codes: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """(N, H, W, 2) uint8 codes -> float32 px through a 256-entry table."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.size == 0:
        return np.zeros(codes.shape, np.float32)
    # OpenCV's table lookup is several times faster than numpy's gather or cast-and-scale.
    return cv2.LUT(codes.reshape(-1, codes.shape[-2] * 2), lut).reshape(codes.shape)


def _tsn_dequantise(q: np.ndarray, bound: float) -> np.ndarray:
    lut = np.arange(256, dtype=np.float32) * np.float32(2.0 * bound / 255.0) - np.float32(bound)
    return _dequantise(q, lut)


def _payloads(items: Sequence[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)  # (N,) of 1-D uint8, the shape h5py writes as vlen
    for i, item in enumerate(items):  # element-wise: equal-length items would broadcast to 2-D
        out[i] = item
    return out


def _imdecode(buf: np.ndarray, flags: int) -> np.ndarray:
    # OpenCV asserts (cv2.error) on an empty buffer, e.g. a payload lost to a damaged file.
    img = cv2.imdecode(buf, flags) if buf.size else None
    if img is None:
        raise ValueError("corrupt flow payload: the image does not decode")
    return img


def _codes(planes: list[list]) -> np.ndarray:
    """(N, H, W, 2) uint8 codes from N decoded fields, each [(H, W, C) image, channel pairs]."""
    if not planes:
        return np.zeros((0, 0, 0, 2), np.uint8)
    h, w = planes[0][0][0].shape[:2]
    codes = np.empty((len(planes), h, w, 2), np.uint8)
    for (images, pairs), out in zip(planes, codes, strict=True):
        if any(img.shape[:2] != (h, w) for img in images):
            raise ValueError("corrupt flow payload: fields of one read differ in size")
        # mixChannels writes straight into the interleaved output; numpy would copy strided.
        cv2.mixChannels(images, [out], pairs)
    return codes


# --- uint8 / float16: arrays compressed by HDF5 -------------------------------------------------


def _uint8_encode(flow: np.ndarray, bound: float) -> np.ndarray:
    return _tsn_quantise(flow, bound)


def _uint8_decode(stored: object, bound: float) -> np.ndarray:
    return _tsn_dequantise(np.asarray(stored), bound)


def _float16_encode(flow: np.ndarray, bound: float) -> np.ndarray:
    return flow.astype(np.float16)


def _float16_decode(stored: object, bound: float) -> np.ndarray:
    return np.asarray(stored).astype(np.float32)


# --- qwebp: zero-centred uniform quantisation + lossless WebP ----------------------------------


def qwebp_step(bound: float, step: float = QWEBP_STEP) -> float:
    """The quantisation step (px) qwebp uses for `bound`: `step`, coarser only if 8 bits need it."""
    # 2L + 1 levels must fit in a byte, so L <= 127.
    return max(step, bound / 127.0)


def _qwebp_levels(bound: float, step: float) -> int:
    levels = math.floor(bound / step + 1e-9)
    if levels < 1:
        raise ValueError(f"flow bound {bound} px is below the qwebp step {step} px")
    return levels


def qwebp_codec(step: float = QWEBP_STEP, name: str = "qwebp") -> Codec:
    """A qwebp codec with another base step (px), for trade-off studies; not registered."""

    def encode(flow: np.ndarray, bound: float) -> np.ndarray:
        s = qwebp_step(bound, step)
        levels = _qwebp_levels(bound, s)
        # Zero is level `levels`, so 0..2*levels fits a byte; (N, H, W, 2) uint8.
        codes = (np.clip(np.rint(flow / s), -levels, levels) + levels).astype(np.uint8)
        zero = np.zeros(codes.shape[1:3], np.uint8)
        out = []
        for field_codes in codes:
            img = np.dstack([field_codes[..., 0], field_codes[..., 1], zero])  # (H, W, 3) B, G, R
            ok, buf = cv2.imencode(".webp", img, _WEBP_LOSSLESS)
            if not ok:
                raise RuntimeError("OpenCV failed to encode a WebP image")
            out.append(buf.ravel())
        return _payloads(out)

    def decode_one(buf: np.ndarray) -> list:
        img = _imdecode(buf, cv2.IMREAD_UNCHANGED)  # (H, W, 3) B, G, R
        if img.ndim != 3 or img.shape[2] < 2:
            raise ValueError("corrupt flow payload: expected a colour WebP image")
        return [[img], [0, 0, 1, 1]]  # B -> dx, G -> dy

    def decode(stored: object, bound: float) -> np.ndarray:
        s = qwebp_step(bound, step)
        levels = _qwebp_levels(bound, s)
        lut = (np.arange(256, dtype=np.float32) - np.float32(levels)) * np.float32(s)
        return _dequantise(_codes([decode_one(np.asarray(b, np.uint8)) for b in stored]), lut)  # type: ignore[union-attr]

    return Codec(name, stream=True, encode=encode, decode=decode)


# --- jpeg: the denseflow/TSN pair of grayscale JPEGs -------------------------------------------


def _jpeg_encode(flow: np.ndarray, bound: float) -> np.ndarray:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    out = []
    for q in _tsn_quantise(flow, bound):
        dx = cv2.imencode(".jpg", np.ascontiguousarray(q[..., 0]), params)[1].ravel()
        dy = cv2.imencode(".jpg", np.ascontiguousarray(q[..., 1]), params)[1].ravel()
        # A little-endian uint32 length of the dx image lets decode split the pair.
        out.append(np.concatenate([np.frombuffer(np.uint32(dx.size).tobytes(), np.uint8), dx, dy]))
    return _payloads(out)


def _jpeg_decode_one(buf: np.ndarray) -> list:
    if buf.size < 4:
        raise ValueError("corrupt flow payload: too short for a JPEG pair")
    n = int(buf[:4].view("<u4")[0])
    dx = _imdecode(buf[4 : 4 + n], cv2.IMREAD_GRAYSCALE)
    dy = _imdecode(buf[4 + n :], cv2.IMREAD_GRAYSCALE)
    if dx.shape != dy.shape:
        raise ValueError("corrupt flow payload: the JPEG pair differs in size")
    return [[dx, dy], [0, 0, 1, 1]]


def _jpeg_decode(stored: object, bound: float) -> np.ndarray:
    codes = _codes([_jpeg_decode_one(np.asarray(b, np.uint8)) for b in stored])  # type: ignore[union-attr]
    return _tsn_dequantise(codes, bound)


CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> None:
    """Make `codec` available by its name to `encode`, `decode` and the store."""
    CODECS[codec.name] = codec


register_codec(
    Codec(
        "uint8", False, _uint8_encode, _uint8_decode, dict(compression="gzip", compression_opts=9)
    )
)
register_codec(
    Codec(
        "float16",
        False,
        _float16_encode,
        _float16_decode,
        # Shuffling groups the exponent bytes together, which is where float16 compresses.
        dict(compression="gzip", compression_opts=6, shuffle=True),
    )
)
register_codec(Codec("jpeg", True, _jpeg_encode, _jpeg_decode))
register_codec(qwebp_codec())
# The finest step 8 bits allow (bound / 127): TSN's error bound with zero exact, for dense motion.
register_codec(qwebp_codec(0.0, name="qwebp-fine"))


def get_codec(codec: str | Codec) -> Codec:
    """The registered codec called `codec` (a Codec passes through); ValueError if unknown."""
    if isinstance(codec, Codec):
        return codec
    try:
        return CODECS[codec]
    except KeyError:
        raise ValueError(
            f"unknown flow codec {codec!r} (choose from {', '.join(sorted(CODECS))})"
        ) from None


def _check_bound(bound: float) -> float:
    bound = float(bound)
    if not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"flow bound must be a positive number of pixels, got {bound}")
    return bound


def encode(
    flow: np.ndarray, codec: str | Codec = DEFAULT_CODEC, bound: float = 20.0, *, threads: int = 1
) -> np.ndarray:
    """Turn flow into its stored form; stream codecs spread the fields over `threads` threads.

    Shape: flow (N, H, W, 2) float px (dx, dy) -> (N, H, W, 2) array for array codecs, or (N,)
    object array of 1-D uint8 byte strings for stream codecs.
    """
    c = get_codec(codec)
    bound = _check_bound(bound)
    flow = np.asarray(flow)
    if flow.ndim != 4 or flow.shape[-1] != 2 or min(flow.shape[1:3], default=0) < 1:
        raise ValueError(f"flow must be (N, H, W, 2), got shape {flow.shape}")
    if flow.dtype.kind != "f":
        raise ValueError(f"flow must be floating point pixels, got dtype {flow.dtype}")
    flow = flow.astype(np.float32, copy=False)
    if not np.isfinite(flow).all():
        raise ValueError("flow contains NaN or infinite values")
    if not c.stream or threads <= 1 or len(flow) < 2:
        return c.encode(flow, bound)
    # OpenCV's image encoders release the GIL, so threads scale with cores.
    chunks = np.array_split(flow, min(threads, len(flow)))
    with ThreadPoolExecutor(len(chunks)) as pool:
        parts = list(pool.map(lambda chunk: c.encode(chunk, bound), chunks))
    return _payloads([payload for part in parts for payload in part])


def decode(stored: object, codec: str | Codec, bound: float = 20.0) -> np.ndarray:
    """Turn a stored form back into flow. Shape: -> (N, H, W, 2) float32 px."""
    return get_codec(codec).decode(stored, _check_bound(bound))
