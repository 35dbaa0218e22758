import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from data.flowcodec import qwebp_step
from data.rgbcodec import decode_rgb, encode_rgb
from data.shards import merge, recode_rgb, write_index
from data.store import (
    REQUIRED_ATTRS,
    SCHEMA_VERSION,
    STORE_ATTRS,
    CorruptStoreError,
    Store,
    StoreWriter,
    require_store,
    shard_path,
    store_exists,
    store_identity,
)

ROOT = Path(__file__).resolve().parents[2]
H, W = 12, 16
MIN_PSNR = 33.0  # dB; JPEG q95 keeps the small test frames at ~36, a channel swap gives ~10


def make_video(i: int, frames: int | None = None, size: tuple[int, int] = (H, W)):
    """Deterministic small video number `i`: rgb (T, H, W, 3) uint8, flow (T-1, H, W, 2), attrs.

    The frames are smooth colour ramps with a little noise, camera-like content that JPEG keeps
    well; red, green and blue differ everywhere, so a channel swap shows.
    """
    rng = np.random.default_rng(i)
    t = frames or 3 + i % 3
    y, x = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)
    steps = np.arange(t, dtype=np.float32)[:, None, None]
    red = 40 + 150 * x / size[1] + 5 * steps + 3 * i
    green = 60 + 120 * y / size[0] + 2 * steps + 0 * x
    blue = 100 + 60 * np.sin((x + y + steps + i) / 3)
    rgb = np.stack([red, green, blue], -1) + rng.normal(0, 1, (t, *size, 3))
    rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    flow = rng.uniform(-5, 5, (t - 1, *size, 2)).astype(np.float32)
    attrs = dict(
        label=i % 2,
        group=f"rec{i // 2}",
        split="train",
        source_path=f"videos/clip{i}.mp4",
        source_fps=25.0,
        source_size=[320, 240],
        sample_every=2,
        flow_method="tvl1",
        flow_params={"tau": 0.25, "lambda": 0.15, "warps": 5},
    )
    return rgb, flow, attrs


def write_videos(path: Path, ids, **kw) -> None:
    with StoreWriter(path, **kw) as writer:
        for i in ids:
            writer.write(f"v{i}", *make_video(i))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def assert_frames(got: np.ndarray, want: np.ndarray, codec: str) -> None:
    """Raw frames come back exact, JPEG frames within MIN_PSNR."""
    assert got.shape == want.shape and got.dtype == np.uint8
    if codec == "raw":
        np.testing.assert_array_equal(got, want)
    else:
        assert psnr(got, want) >= MIN_PSNR


def assert_video(
    store: Store, i: int, tol: float = qwebp_step(20.0) / 2 + 1e-5, size: tuple[int, int] = (H, W)
) -> None:
    rgb, flow, _ = make_video(i, size=size)
    assert_frames(store.rgb(f"v{i}"), rgb, store.rgb_codec(f"v{i}"))
    assert np.abs(store.flow(f"v{i}") - flow).max() <= tol


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codec, tol", [("qwebp", 0.126), ("uint8", 0.079), ("float16", 0.003), ("jpeg", 2.0)]
)
def test_round_trip_per_codec(tmp_path, codec, tol):
    path = tmp_path / "s.h5"
    write_videos(path, [0, 1], flow_codec=codec)
    store = Store(path)
    assert (
        store.video_ids == ["v0", "v1"] and len(store) == 2 and "v1" in store and "v9" not in store
    )
    for i in (0, 1):
        assert_video(store, i, tol)
        assert store.attrs(f"v{i}")["flow_codec"] == codec
    assert store.validate() == []
    assert not (tmp_path / "s.h5.parts").exists() and not (tmp_path / "s.h5.lock").exists()


def test_static_video_with_identical_flow_fields(tmp_path):
    path = tmp_path / "s.h5"
    rgb, _, attrs = make_video(0, frames=4)
    with StoreWriter(path) as writer:
        writer.write("still", rgb, np.zeros((3, H, W, 2), np.float32), attrs)
    store = Store(path)
    np.testing.assert_array_equal(store.flow("still"), np.zeros((3, H, W, 2), np.float32))
    assert store.validate() == []


def test_attrs_round_trip(tmp_path):
    path = tmp_path / "s.h5"
    rgb, flow, attrs = make_video(0)
    attrs.update(
        source_path=Path("videos/a b.mp4"),
        source_size=(1920, 1080),
        nothing=None,
        empty=[],
        mixed=[1, "a"],
        floats=[0.5, 1.5],
        names=["x", "y"],
        flag=True,
        count=np.int32(7),
    )
    with StoreWriter(
        path, bound=15.0, root_attrs={"manifest": "m.csv", "sampling": {"fps": 5}}
    ) as writer:
        writer.write("a", rgb, flow, attrs)
    store = Store(path)
    got = store.attrs("a")
    expected = {**attrs, "source_path": "videos/a b.mp4", "source_size": [1920, 1080], "count": 7}
    for key, value in expected.items():
        assert got[key] == value and type(got[key]) is type(value), key
    assert got["flow_codec"] == "qwebp" and got["flow_bound"] == 15.0 and got["num_frames"] == 3
    assert store.label("a") == 0 and store.num_frames("a") == 3
    root = store.root_attrs
    assert root["schema_version"] == SCHEMA_VERSION and root["manifest"] == "m.csv"
    assert root["sampling"] == {"fps": 5} and "created_at" in root


def test_layout_chunking_and_compression(tmp_path):
    path = tmp_path / "s.h5"
    write_videos(path, [0], flow_codec="uint8", rgb_codec="raw")
    with h5py.File(path, "r") as f:
        rgb, flow = f["videos/v0/rgb"], f["videos/v0/flow"]
        assert (
            rgb.shape == (3, H, W, 3) and rgb.chunks == (1, H, W, 3) and rgb.compression is None and rgb.fletcher32
        )
        assert (
            flow.shape == (2, H, W, 2)
            and flow.chunks == (1, H, W, 2)
            and flow.compression == "gzip"
        )
        assert f.attrs["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("codec, rgb_codec", [("qwebp", "jpeg"), ("uint8", "raw")])
@pytest.mark.parametrize(
    "index",
    [
        slice(1, 4),
        slice(None, None, 2),
        slice(None, None, -1),
        [4, 0, 4, 2],
        np.array([3, 1]),
        [-1],
        [],
        2,
        -2,
    ],
)
def test_index_forms(tmp_path, codec, rgb_codec, index):
    path = tmp_path / "s.h5"
    rgb, flow, attrs = make_video(0, frames=6)
    with StoreWriter(path, flow_codec=codec, rgb_codec=rgb_codec) as writer:
        writer.write("a", rgb, flow, attrs)
    store = Store(path)
    frames = store.rgb("a")
    assert_frames(frames, rgb, rgb_codec)
    got_rgb = store.rgb("a", index)
    assert got_rgb.shape == rgb[index].shape and got_rgb.dtype == np.uint8
    np.testing.assert_array_equal(got_rgb, frames[index])
    full = store.flow("a")
    got = store.flow("a", index)
    assert got.shape == flow[index].shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, full[index])


def test_out_of_range_index_and_unknown_video(tmp_path):
    path = tmp_path / "s.h5"
    write_videos(path, [0])
    store = Store(path)
    with pytest.raises(IndexError):
        store.rgb("v0", [0, 3])
    with pytest.raises(KeyError):
        store.flow("nope")
    with pytest.raises(ValueError, match="not in"):
        store.attrs("nope")
    with pytest.raises(FileNotFoundError):
        Store(tmp_path / "missing.h5")


# --- write() refuses -------------------------------------------------------------------------


def _bad_cases():
    rgb, flow, attrs = make_video(0)
    no_label = {k: v for k, v in attrs.items() if k != "label"}
    return [
        ("a", rgb, flow[:1], attrs, "need 2 flow fields"),
        ("a", rgb[:1], flow[:0], attrs, "at least 2 frames"),
        ("a", rgb, flow[:, :, :8], attrs, "frames are"),
        ("a", rgb.astype(np.float32), flow, attrs, "uint8"),
        ("a/b", rgb, flow, attrs, "'/'"),
        ("", rgb, flow, attrs, "non-empty"),
        ("a", rgb, flow, no_label, "lack label"),
        ("a", rgb, flow, {**attrs, "flow_codec": "x"}, "written by the store"),
        ("a", rgb, flow, {**attrs, "label": "violent"}, "integer"),
        ("a", rgb, flow, {**attrs, "bad": object()}, "cannot store"),
    ]


@pytest.mark.parametrize("video_id, rgb, flow, attrs, match", _bad_cases())
def test_write_refuses(tmp_path, video_id, rgb, flow, attrs, match):
    with StoreWriter(tmp_path / "s.h5") as writer:
        with pytest.raises(ValueError, match=match):
            writer.write(video_id, rgb, flow, attrs)
        assert writer.done_ids() == set()
    assert Store(tmp_path / "s.h5").video_ids == []


def test_writer_refuses_duplicates_bad_options_and_a_second_writer(tmp_path):
    path = tmp_path / "s.h5"
    with StoreWriter(path) as writer:
        writer.write("v0", *make_video(0))
        with pytest.raises(ValueError, match="already in"):
            writer.write("v0", *make_video(0))
        with pytest.raises(ValueError, match="another process"):
            StoreWriter(path)
    with pytest.raises(ValueError, match="unknown flow codec"):
        StoreWriter(path, flow_codec="png")
    with pytest.raises(ValueError, match="bound"):
        StoreWriter(path, bound=-1)
    with pytest.raises(FileNotFoundError):
        StoreWriter(tmp_path / "no" / "s.h5")
    assert REQUIRED_ATTRS[0] == "label"


# --- rgb codecs ------------------------------------------------------------------------------


@pytest.mark.parametrize("rgb_codec", ["jpeg", "raw"])
def test_rgb_codec_layout_attrs_and_round_trip(tmp_path, rgb_codec):
    path = tmp_path / "s.h5"
    write_videos(path, [0, 1], rgb_codec=rgb_codec)
    store = Store(path)
    assert store.root_attrs["rgb_codec"] == rgb_codec
    for i in (0, 1):
        assert store.attrs(f"v{i}")["rgb_codec"] == rgb_codec == store.rgb_codec(f"v{i}")
        assert store.num_frames(f"v{i}") == len(make_video(i)[0])
        assert store.frame_size(f"v{i}") == (H, W)
        assert_video(store, i)
    with h5py.File(path, "r") as f:
        rgb = f["videos/v0/rgb"]
        if rgb_codec == "jpeg":
            assert rgb.shape == (3,) and h5py.check_vlen_dtype(rgb.dtype) == np.uint8
            assert all(payload[:2].tobytes() == b"\xff\xd8" for payload in rgb[:])  # JPEG SOI
        else:
            assert rgb.shape == (3, H, W, 3) and rgb.dtype == np.uint8
    assert store.validate() == []


def test_jpeg_keeps_rgb_channel_order(tmp_path):
    rgb = np.zeros((2, 16, 16, 3), np.uint8)
    rgb[..., 0] = 230  # pure red: BGR confusion anywhere would come back blue
    rgb[1, ..., 2] = 200  # magenta
    back = decode_rgb(encode_rgb(rgb, threads=2))
    assert np.abs(back.astype(int) - rgb).max() <= 3
    path = tmp_path / "s.h5"
    _, flow, attrs = make_video(0, frames=2, size=(16, 16))
    with StoreWriter(path) as writer:
        writer.write("red", rgb, flow, attrs)
    np.testing.assert_array_equal(Store(path).rgb("red"), back)


def test_jpeg_decodes_each_frame_once_and_threads_agree(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    rgb, flow, attrs = make_video(0, frames=20)
    with StoreWriter(path) as writer:
        writer.write("a", rgb, flow, attrs)
    serial = Store(path, threads=1)
    full = serial.rgb("a")
    np.testing.assert_array_equal(Store(path, threads=4).rgb("a"), full)  # 3 threads do it
    calls = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda buf, flags: calls.append(1) or real(buf, flags))
    index = [17, 3, 4, 3, 12, 5, 17, 0]
    np.testing.assert_array_equal(serial.rgb("a", index), full[index])
    assert len(calls) == len(set(index))


def test_corrupt_jpeg_payload_raises():
    payloads = encode_rgb(make_video(0)[0])
    payloads[1] = payloads[1][10:]
    with pytest.raises(ValueError, match="corrupt rgb payload"):
        decode_rgb(payloads)


def test_rgb_codec_is_checked_and_reserved(tmp_path):
    with pytest.raises(ValueError, match="unknown rgb codec 'png'"):
        StoreWriter(tmp_path / "s.h5", rgb_codec="png")
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "s.h5.lock").exists()
    assert "rgb_codec" in STORE_ATTRS
    rgb, flow, attrs = make_video(0)
    with StoreWriter(tmp_path / "t.h5") as writer:
        with pytest.raises(ValueError, match="written by the store"):
            writer.write("a", rgb, flow, {**attrs, "rgb_codec": "raw"})
    with pytest.raises(ValueError, match="threads"):
        Store(tmp_path / "t.h5", threads=0)


def _make_old(path: Path) -> None:
    """Strip what this version adds, as in a store written before the rgb codec existed."""
    with h5py.File(path, "r+") as f:
        del f.attrs["rgb_codec"]
        for group in f["videos"].values():
            del group.attrs["rgb_codec"]


def test_store_without_rgb_codec_attr_reads_as_raw(tmp_path):
    path = tmp_path / "s.h5"
    write_videos(path, [0, 1], rgb_codec="raw")
    _make_old(path)
    store = Store(path)
    assert "rgb_codec" not in store.attrs("v0") and store.rgb_codec("v0") == "raw"
    np.testing.assert_array_equal(store.rgb("v1", [2, 0]), make_video(1)[0][[2, 0]])
    assert_video(store, 0)
    assert store.validate() == []
    with StoreWriter(path) as writer:  # an old store takes new (JPEG) videos beside its raw ones
        writer.write("v2", *make_video(2))
    store = Store(path)
    assert [store.rgb_codec(f"v{i}") for i in range(3)] == ["raw", "raw", "jpeg"]
    for i in range(3):
        assert_video(store, i)
    assert store.validate() == []


def test_merge_finalize_and_index_keep_each_videos_codec(tmp_path):
    jpeg, raw = tmp_path / "a.h5", tmp_path / "b.h5"
    with pytest.raises(RuntimeError):  # left unfinalized: its videos are in parts
        with StoreWriter(jpeg, rgb_codec="jpeg") as writer:
            writer.write("v0", *make_video(0))
            raise RuntimeError
    before = Store(jpeg).rgb("v0")
    with h5py.File(jpeg.with_name("a.h5.parts") / "v0.h5", "r") as f:
        payloads = [p.tobytes() for p in f["videos/v0/rgb"][:]]
    write_videos(raw, [1], rgb_codec="raw")
    _make_old(raw)
    for joined in (
        merge([jpeg, raw], tmp_path / "m.h5"),
        write_index([jpeg, raw], tmp_path / "i.h5"),
    ):
        store = Store(joined)
        assert [store.rgb_codec(v) for v in ("v0", "v1")] == ["jpeg", "raw"]
        np.testing.assert_array_equal(store.rgb("v0"), before)
        assert_video(store, 1)
        assert store.validate() == []
    with StoreWriter(jpeg) as writer:
        assert writer.done_ids() == {"v0"}  # leaving the block finalizes
    with h5py.File(jpeg, "r") as f:
        assert [p.tobytes() for p in f["videos/v0/rgb"][:]] == payloads  # copied, not re-encoded
        assert f["videos/v0"].attrs["rgb_codec"] == "jpeg"


def test_recode_rgb_converts_frames_and_copies_the_rest(tmp_path):
    raw = tmp_path / "raw.h5"
    write_videos(raw, [0, 1], rgb_codec="raw", root_attrs={"run": "r1"})
    _make_old(raw)
    jpeg = recode_rgb(raw, tmp_path / "jpeg.h5")
    store, source = Store(jpeg), Store(raw)
    assert store.root_attrs["rgb_codec"] == "jpeg" and store.root_attrs["run"] == "r1"
    for i in (0, 1):
        v = f"v{i}"
        assert store.rgb_codec(v) == "jpeg"
        assert {k: x for k, x in store.attrs(v).items() if k != "rgb_codec"} == source.attrs(v)
        np.testing.assert_array_equal(store.flow(v), source.flow(v))
        assert_video(store, i)
    assert store.validate() == [] and jpeg.stat().st_size < raw.stat().st_size
    back = recode_rgb(jpeg, tmp_path / "back.h5", "raw")
    np.testing.assert_array_equal(Store(back).rgb("v1"), store.rgb("v1"))  # JPEG pixels kept
    same = recode_rgb(jpeg, tmp_path / "same.h5", "jpeg")  # nothing to re-encode: copied
    with h5py.File(jpeg, "r") as a, h5py.File(same, "r") as b:
        assert [x.tobytes() for x in a["videos/v0/rgb"][:]] == [
            x.tobytes() for x in b["videos/v0/rgb"][:]
        ]
    with pytest.raises(ValueError, match="already exists"):
        recode_rgb(raw, jpeg)
    with pytest.raises(ValueError, match="unknown rgb codec"):
        recode_rgb(raw, tmp_path / "x.h5", "png")


# --- resume, finalize, stale files -----------------------------------------------------------


def test_missing_store_is_one_line_that_says_how_to_make_one(tmp_path):
    assert not store_exists(tmp_path / "none.h5")
    with pytest.raises(FileNotFoundError, match=r"none\.h5 does not exist; make it with `twostream extract`"):
        require_store(tmp_path / "none.h5")
    (tmp_path / "running.h5.parts").mkdir()  # an extraction still writing: its committed parts are the store
    assert store_exists(tmp_path / "running.h5") and require_store(str(tmp_path / "running.h5")) == tmp_path / "running.h5"


def test_interrupted_run_is_resumable(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError):
        with StoreWriter(path) as writer:
            writer.write("v0", *make_video(0))
            writer.write("v1", *make_video(1))
            raise RuntimeError("interrupted")
    parts = tmp_path / "s.h5.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["v0.h5", "v1.h5"]  # not finalized
    store = Store(path)
    assert store.video_ids == ["v0", "v1"] and store.validate() == []
    with StoreWriter(path) as writer:
        assert writer.done_ids() == {"v0", "v1"}
        for i in range(4):
            if f"v{i}" not in writer.done_ids():
                writer.write(f"v{i}", *make_video(i))
    assert not parts.exists()
    with h5py.File(path, "r") as f:
        assert sorted(f["videos"]) == ["v0", "v1", "v2", "v3"]
    store = Store(path)
    for i in range(4):
        assert_video(store, i)


def test_finalize_is_idempotent_and_copies_chunks_raw(tmp_path):
    path = tmp_path / "s.h5"
    writer = StoreWriter(path, flow_codec="uint8", rgb_codec="raw")
    writer.write("v0", *make_video(0))
    with h5py.File(tmp_path / "s.h5.parts" / "v0.h5", "r") as f:
        chunk = f["videos/v0/rgb"].id.read_direct_chunk((1, 0, 0, 0))
        flow_chunk = f["videos/v0/flow"].id.read_direct_chunk((0, 0, 0, 0))
    assert writer.finalize() == path
    mtime = path.stat().st_mtime_ns
    assert writer.finalize() == path and path.stat().st_mtime_ns == mtime  # nothing to join
    writer.write("v1", *make_video(1))  # a finalized store takes more videos
    writer.finalize()
    writer.close()
    with h5py.File(path, "r") as f:
        assert f["videos/v0/rgb"].id.read_direct_chunk((1, 0, 0, 0)) == chunk
        assert f["videos/v0/flow"].id.read_direct_chunk((0, 0, 0, 0)) == flow_chunk
    assert Store(path).video_ids == ["v0", "v1"]


def test_reader_follows_a_finalize_that_happens_while_it_is_open(tmp_path):
    path = tmp_path / "s.h5"
    writer = StoreWriter(path, root_attrs={"size": (224, 224)})
    writer.write("v0", *make_video(0))
    writer.write("v1", *make_video(1))
    store = Store(path)
    assert_video(store, 0)  # opens the main file and v0's part
    writer.finalize()  # replaces the main file and deletes the parts
    mtime = path.stat().st_mtime_ns
    assert writer.finalize() == path and path.stat().st_mtime_ns == mtime
    writer.close()
    assert_video(store, 1)
    assert store.validate() == []


def test_stale_temporaries_are_ignored_and_cleaned(tmp_path):
    path = tmp_path / "s.h5"
    write_videos(path, [0])
    parts = tmp_path / "s.h5.parts"
    parts.mkdir()
    (parts / ".deadbeef.tmp").write_bytes(b"half a video")
    (tmp_path / "s.h5.tmp").write_bytes(b"half a finalize")
    store = Store(path)
    assert store.video_ids == ["v0"] and store.validate() == []
    with StoreWriter(path) as writer:
        assert writer.done_ids() == {"v0"}
        assert not (parts / ".deadbeef.tmp").exists() and not (tmp_path / "s.h5.tmp").exists()
    assert not parts.exists()


def test_part_duplicating_main_is_read_once(tmp_path):
    """A kill between finalize's rename and its cleanup leaves parts that repeat the main file."""
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError):
        with StoreWriter(path) as writer:
            writer.write("v0", *make_video(0))
            raise RuntimeError
    part = tmp_path / "s.h5.parts" / "v0.h5"
    kept = part.read_bytes()
    with StoreWriter(path) as writer:
        pass  # finalizes
    part.parent.mkdir()
    part.write_bytes(kept)
    store = Store(path)
    assert store.video_ids == ["v0"] and store.validate() == []
    with StoreWriter(path) as writer:
        assert writer.done_ids() == {"v0"}
    assert_video(Store(path), 0)


# --- validate --------------------------------------------------------------------------------


def _corrupt_chunk(path: Path, dataset: str) -> None:
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(1)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 2)
        fh.write(b"\x00\xff" * ((info.size - 4) // 2))


def _drop_attr(path: Path, video: str, key: str) -> None:
    with h5py.File(path, "r+") as f:
        del f[f"videos/{video}"].attrs[key]


def _shorten_flow(path: Path, video: str, key: str) -> None:
    with h5py.File(path, "r+") as f:
        g = f[f"videos/{video}"]
        data = g["flow"][:-1]
        del g["flow"]
        g.create_dataset("flow", data=data)


def _schema(path: Path, video: str, key: str) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99


def _corrupt_jpeg(path: Path, video: str, key: str) -> None:
    """Overwrite the JPEG start marker of frame 1 where the payload lies in the file."""
    with h5py.File(path, "r") as f:
        payload = f[f"videos/{video}/rgb"][1].tobytes()
    data = path.read_bytes()
    at = data.index(payload)
    path.write_bytes(data[:at] + b"\0" * 4 + data[at + 4 :])


@pytest.mark.parametrize(
    "plant, expected",
    [
        (lambda p: _corrupt_chunk(p, "videos/v1/rgb"), "v1: unreadable"),
        (lambda p: _corrupt_jpeg(p, "v1", ""), "video 'v1': corrupt rgb payload"),  # names the video
        (lambda p: _drop_attr(p, "v1", "source_fps"), "v1: missing attr 'source_fps'"),
        (lambda p: _drop_attr(p, "v1", "flow_codec"), "v1: missing attr 'flow_codec'"),
        (lambda p: _shorten_flow(p, "v1", ""), "v1: 2 flow fields for 4 frames"),
        (lambda p: _schema(p, "", ""), "schema version 99"),
    ],
)
def test_validate_finds_planted_problems(tmp_path, plant, expected):
    path = tmp_path / "s.h5"
    jpeg = "corrupt rgb payload" in expected
    write_videos(path, [0, 1], flow_codec="uint8", rgb_codec="jpeg" if jpeg else "raw")
    assert Store(path).validate() == []
    plant(path)
    problems = Store(path).validate()
    assert any(expected in p for p in problems), problems
    assert not any(p.startswith("v0") for p in problems)


def test_validate_reports_truncated_part_file(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError):
        with StoreWriter(path) as writer:
            writer.write("v0", *make_video(0))
            writer.write("v1", *make_video(1))
            raise RuntimeError
    part = tmp_path / "s.h5.parts" / "v1.h5"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    problems = Store(path).validate()
    assert any(p.startswith("v1: unreadable") for p in problems), problems
    assert not any(p.startswith("v0") for p in problems)


def test_sizes(tmp_path):
    path = tmp_path / "s.h5"
    write_videos(path, [0, 1, 2])
    store = Store(path)
    assert store.disk_bytes() == path.stat().st_size
    with h5py.File(path, "r") as f:
        payload = sum(b.size for i in range(3) for b in f[f"videos/v{i}/flow"][:])
        fields = sum(f[f"videos/v{i}/flow"].shape[0] for i in range(3))
    per_field = store.flow_bytes_per_field()
    assert payload / fields < per_field < payload / fields + 200


# --- kill -9 ---------------------------------------------------------------------------------

N_KILL = 16
KILL_SIZE = (128, 160)  # big enough that a write takes a while, so kills land inside writes too
_CHILD = f"""
import sys
from data.store import StoreWriter
from tests.data.test_store import make_video
with StoreWriter(sys.argv[1], root_attrs={{"purpose": "kill test"}}) as writer:
    done = writer.done_ids()
    for i in range({N_KILL}):
        if f"v{{i}}" in done:
            continue
        writer.write(f"v{{i}}", *make_video(i, size={KILL_SIZE}))
        print(f"v{{i}}", flush=True)
        if i % 3 == 2:
            writer.finalize()
            print("finalized", flush=True)
print("done", flush=True)
"""


def _run_child(path: Path, kill_after_lines: int | None, delay: float) -> tuple[list[str], bool]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    if kill_after_lines is not None:
        while len(lines) < kill_after_lines:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    lines += out.split()
    return lines, proc.returncode == 0


def test_kill_minus_9_at_random_instants_keeps_every_completed_video(tmp_path):
    path = tmp_path / "s.h5"
    rng = np.random.default_rng(1)
    confirmed: set[str] = set()  # videos known to be complete: printed, or seen after a kill
    kills = 0
    trials = [(0, 0.0), (0, 0.25)] + [
        (int(rng.integers(1, 4)), float(rng.uniform(0, 0.06))) for _ in range(6)
    ]
    for kill_after, delay in trials:
        lines, finished = _run_child(path, kill_after, delay)
        kills += not finished
        confirmed |= {x for x in lines if x.startswith("v")}
        if not path.exists() and not (tmp_path / "s.h5.parts").exists():
            assert not confirmed  # killed before the store was created
            continue
        store = Store(path)
        assert store.validate() == []
        held = set(store.video_ids)
        # At most one video more than confirmed: the one whose write returned just before the kill.
        in_flight = next((f"v{i}" for i in range(N_KILL) if f"v{i}" not in confirmed), None)
        assert confirmed <= held <= confirmed | {in_flight}, (confirmed, held)
        for video_id in held:
            assert_video(store, int(video_id[1:]), size=KILL_SIZE)
        store.close()
        confirmed = held
    assert kills >= 3
    lines, finished = _run_child(path, None, 0.0)
    assert finished and lines[-1] == "done"
    store = Store(path)
    assert store.video_ids == sorted(f"v{i}" for i in range(N_KILL)) and store.validate() == []
    assert not (tmp_path / "s.h5.parts").exists() and not (tmp_path / "s.h5.tmp").exists()
    assert store.root_attrs["purpose"] == "kill test"


# --- shards ----------------------------------------------------------------------------------


def test_shard_path():
    assert shard_path("out/store.h5", 0, 4) == Path("out/store.shard-0-of-4.h5")
    assert shard_path(Path("s.h5"), 3, 4).name == "s.shard-3-of-4.h5"
    for index, count in [(4, 4), (-1, 4), (0, 0)]:
        with pytest.raises(ValueError):
            shard_path("s.h5", index, count)


def test_merge_and_index(tmp_path):
    shards = [shard_path(tmp_path / "s.h5", i, 2) for i in range(2)]
    write_videos(shards[0], [0, 1], root_attrs={"run": "r1", "shard": 0})
    with pytest.raises(RuntimeError):  # the second shard is left unfinalized: parts still join
        with StoreWriter(shards[1], root_attrs={"run": "r1", "shard": 1}) as writer:
            writer.write("v2", *make_video(2))
            raise RuntimeError
    merged = merge(shards, tmp_path / "all.h5")
    store = Store(merged)
    assert store.video_ids == ["v0", "v1", "v2"] and store.validate() == []
    for i in range(3):
        assert_video(store, i)
    assert store.root_attrs["run"] == "r1" and "shard" not in store.root_attrs
    assert not (tmp_path / "all.h5.tmp").exists()
    with pytest.raises(ValueError, match="already exists"):
        merge(shards, merged)
    with pytest.raises(ValueError, match="also an input"):
        merge(shards, shards[0], overwrite=True)

    index = write_index(shards, tmp_path / "index.h5")
    assert index.stat().st_size < 20_000
    joined = Store(index)
    assert joined.video_ids == ["v0", "v1", "v2"] and joined.validate() == []
    assert_video(joined, 2)
    assert joined.disk_bytes() > sum(p.stat().st_size for p in shards)


def test_merge_duplicates_need_an_identical_source(tmp_path):
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    write_videos(a, [0, 1])
    write_videos(b, [1, 2])  # v1 again, same source: kept once
    merged = merge([a, b], tmp_path / "ab.h5")
    assert Store(merged).video_ids == ["v0", "v1", "v2"]
    rgb, flow, attrs = make_video(1)
    with StoreWriter(c) as writer:
        writer.write("v1", rgb, flow, {**attrs, "source_path": "elsewhere.mp4"})
    with pytest.raises(ValueError, match="different sources"):
        merge([a, c], tmp_path / "ac.h5")
    assert not (tmp_path / "ac.h5").exists()
    with pytest.raises(ValueError, match="share video ids"):
        write_index([a, b], tmp_path / "ab.index.h5")


# --- pickling and worker processes -----------------------------------------------------------


def _child_reads(store: Store) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    return (
        store.video_ids,
        [store.label(v) for v in store.video_ids],
        store.rgb("v1", [2, 0]),
        store.flow("v1", 1),
    )


def test_store_pickles_and_reads_in_a_spawned_process(tmp_path):
    path = tmp_path / "s.h5"
    write_videos(path, [0, 1])
    store = Store(path)
    blob = pickle.dumps(store)
    assert len(blob) < 2000 and not store._handles  # nothing opened yet in the parent
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        ids, labels, rgb, flow = pool.apply(_child_reads, (store,))
    assert not store._handles
    assert ids == ["v0", "v1"] and labels == [0, 1]
    want_rgb, want_flow, _ = make_video(1)
    assert_frames(rgb, want_rgb[[2, 0]], "jpeg")
    assert flow.shape == (H, W, 2) and np.abs(flow - want_flow[1]).max() <= 0.126
    # A store that was used, then pickled, reopens its files in the new process.
    store.rgb("v0")
    again = pickle.loads(pickle.dumps(store))
    assert not again._handles and again.video_ids == ["v0", "v1"]
    np.testing.assert_array_equal(again.rgb("v1", [2, 0]), rgb)


def test_forked_reader_reopens_files(tmp_path):
    path = tmp_path / "s.h5"
    write_videos(path, [0])
    store = Store(path)
    store.rgb("v0")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        ok = psnr(store.rgb("v0"), make_video(0)[0]) >= MIN_PSNR and store._pid == os.getpid()
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


# --- damaged files and files that are not stores ----------------------------------------------


def _damage_header(path: Path, name: str) -> None:
    """Overwrite the first bytes of the object header of `name` (found through h5py's low-level
    API): h5py then fails to open it with KeyError('... bad object header version number')."""
    with h5py.File(path, "r") as f:
        addr = h5py.h5o.get_info(f[name].id).addr
    with open(path, "r+b") as fh:
        fh.seek(addr)
        fh.write(b"\0" * 8)


@pytest.mark.parametrize("video", ["v0", "v1"])  # v0: the one the catalogue scan looks at
def test_damaged_video_header_is_a_one_line_error(tmp_path, video):
    path = tmp_path / "s.h5"
    write_videos(path, [0, 1, 2])
    _damage_header(path, f"videos/{video}")
    store = Store(path)
    assert store.video_ids == ["v0", "v1", "v2"]  # the others stay readable
    for read in (store.attrs, store.label, store.num_frames, store.rgb, store.flow):
        with pytest.raises(CorruptStoreError) as err:
            read(video)
        message = str(err.value)
        assert isinstance(err.value, ValueError) and "\n" not in message
        assert str(path) in message and repr(video) in message and "header" in message
    other = "v2"
    assert_frames(store.rgb(other), make_video(2)[0], "jpeg")
    problems = store.validate()
    assert problems == [f"{video}: unreadable (bad object header version number)"], problems


def test_damaged_dataset_header_names_the_dataset(tmp_path):
    path = tmp_path / "s.h5"
    write_videos(path, [0, 1])
    _damage_header(path, "videos/v1/flow")
    store = Store(path)
    assert store.label("v1") == 1
    with pytest.raises(CorruptStoreError, match=r"video 'v1' is unreadable \(bad object header"):
        store.flow("v1")
    assert [p.split(" (")[0] for p in store.validate()] == ["v1: unreadable"]


def test_unreadable_data_is_a_one_line_error(tmp_path):
    """h5py failing inside a read (here a damaged gzip chunk of flow) becomes CorruptStoreError."""
    path = tmp_path / "s.h5"
    write_videos(path, [0], flow_codec="uint8")
    _corrupt_chunk(path, "videos/v0/flow")
    store = Store(path)
    assert store.num_frames("v0") == 3
    store.flow("v0", 0)  # the first chunk is whole
    with pytest.raises(CorruptStoreError) as err:
        store.flow("v0")
    assert f"store {path}: video 'v0' flow data is unreadable (" in str(err.value)
    assert "\n" not in str(err.value)
    assert store.validate()[0].startswith("v0: unreadable (")


def test_damaged_video_list_is_a_one_line_error(tmp_path):
    path = tmp_path / "s.h5"
    write_videos(path, [0, 1])
    _damage_header(path, "videos")
    with pytest.raises(CorruptStoreError, match=r"s\.h5: cannot list its videos"):
        len(Store(path))
    assert Store(path).validate()[0].endswith("the file is damaged)")


def _feature_cache(path: Path, store: Path | None = None) -> Path:
    """The layout streams/features.py writes: /videos/<id>/features and index, feature attrs."""
    with h5py.File(path, "w") as f:
        f.attrs.update(schema_version=1, stream="rgb", backbone="hoghof", feature_dim=8, views=1)
        if store is not None:
            f.attrs["store"] = str(store)
        for i in range(2):
            group = f.create_group(f"videos/v{i}")
            group["features"] = np.zeros((1, 3, 8), np.float16)
            group["index"] = np.zeros((1, 3), np.int64)
            group.attrs.update(label=i, views=1)
    return path


def test_feature_cache_is_not_a_store(tmp_path):
    cache = _feature_cache(tmp_path / "s.h5.features-rgb-hoghof.h5", tmp_path / "s.h5")
    with pytest.raises(ValueError, match="is a feature cache .*not a twostream store.*s\\.h5\\)$"):
        len(Store(cache))
    # Without the attrs that say so, the video groups give it away.
    with h5py.File(cache, "a") as f:
        del f.attrs["feature_dim"]
    with pytest.raises(ValueError, match=r"not a twostream store \(a feature cache\)"):
        len(Store(cache))
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["videos/a/x"] = [1, 2]
    with pytest.raises(ValueError, match="not a twostream store"):
        len(Store(other))


def test_store_identity_is_kept_by_a_resumed_extraction_and_changed_by_new_videos(tmp_path):
    path = tmp_path / "s.h5"

    def identity():
        with Store(path) as s:
            return store_identity(s.root_attrs), len(s)

    with StoreWriter(path, flow_codec="float16") as w:
        w.write("v0", *make_video(0))
    first, n = identity()
    assert first and n == 1
    with StoreWriter(path, flow_codec="float16"):
        pass  # opened and finalized again, nothing added: the same store
    assert identity() == (first, 1)
    with StoreWriter(path, flow_codec="float16") as w:
        w.write("v1", *make_video(1))  # videos joined a finished store: another store now
    grown, n = identity()
    assert n == 2 and grown != first
    path.unlink()
    with StoreWriter(path, flow_codec="float16") as w:  # extracted again at the same path
        w.write("v0", *make_video(0))
    assert identity()[0] not in (first, grown)
    assert store_identity({"created_at": "2026-01-01T00:00:00+00:00"}) == "2026-01-01T00:00:00+00:00"  # older stores
