import logging

import cv2
import numpy as np
import pytest

from data.sampling import Sampling
from data.synthetic import write_video
from data.video import VideoReadError, iter_frames, probe, read_video, source_fps

RAW = Sampling(size=None)  # every frame at the source size


def _frames(n: int, width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8: a smooth gradient that moves per frame, plus colour, so frames differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (xx * 3 + i * 9) % 256
        out[i, ..., 1] = (yy * 4 + i * 5) % 256
        out[i, ..., 2] = rng.integers(0, 256, (height, width))
    return out


@pytest.fixture
def lossless(tmp_path):
    """A lossless (FFV1) 13-frame 64x48 clip at 30 fps and its ground-truth frames."""
    gt = _frames(13)
    path = tmp_path / "clip.mkv"
    write_video(path, gt, 30)
    return path, gt


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def test_read_lossless_clip_exactly(lossless):
    path, gt = lossless
    frames, info, idx = read_video(path, RAW)
    np.testing.assert_array_equal(frames, gt)
    np.testing.assert_array_equal(idx, np.arange(13))
    assert info.fps == 30.0 and (info.width, info.height) == (64, 48)
    assert info.decoded_frames == 13 and info.path == str(path)


def test_rgb_order_on_a_pure_red_clip(tmp_path):
    red = np.zeros((5, 32, 32, 3), np.uint8)
    red[..., 0] = 255
    write_video(tmp_path / "red.mp4", red, 25)
    frames, _, _ = read_video(tmp_path / "red.mp4", RAW)
    mean = frames.reshape(-1, 3).mean(0)
    assert mean[0] > 230 and mean[1] < 25 and mean[2] < 25


@pytest.mark.parametrize(
    "sampling, shape",
    [
        (Sampling(), (13, 224, 224, 3)),
        (Sampling(size=32), (13, 32, 32, 3)),
        (Sampling(size=None, short_side=24), (13, 24, 32, 3)),
        (Sampling(size=None, short_side=96), (13, 96, 128, 3)),
        (RAW, (13, 48, 64, 3)),
    ],
)
def test_resize_modes(lossless, sampling, shape):
    frames, info, _ = read_video(lossless[0], sampling)
    assert frames.shape == shape and frames.dtype == np.uint8
    assert (info.width, info.height) == (64, 48)  # the info describes the source


def test_shrinking_uses_area_interpolation(lossless):
    path, gt = lossless
    frames, _, _ = read_video(path, Sampling(size=32))
    expected = np.stack([cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA) for f in gt])
    np.testing.assert_array_equal(frames, expected)


@pytest.mark.parametrize(
    "sampling, expected",
    [
        (Sampling(fps=10, size=None), [0, 3, 6, 9, 12]),
        (Sampling(fps=60, size=None), list(range(13))),
        (Sampling(frames=4, size=None), [0, 4, 8, 12]),
        (Sampling(frames=5, size=None), [0, 3, 6, 9, 12]),
        (Sampling(frames=20, size=None), list(range(13))),  # fewer frames than asked: all
    ],
)
def test_sampling_keeps_the_right_frames(lossless, sampling, expected):
    path, gt = lossless
    frames, info, idx = read_video(path, sampling)
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(frames, gt[expected])
    assert info.decoded_frames == 13


@pytest.mark.parametrize("sampling", [RAW, Sampling(fps=10, size=32), Sampling(fps=7, size=None)])
def test_iter_frames_matches_read_video(lossless, sampling):
    frames, _, idx = read_video(lossless[0], sampling)
    streamed = list(iter_frames(lossless[0], sampling))
    assert [i for i, _ in streamed] == idx.tolist()
    np.testing.assert_array_equal(np.stack([f for _, f in streamed]), frames)


def test_iter_frames_max_frames_and_refuses_uniform(lossless):
    assert [i for i, _ in iter_frames(lossless[0], RAW, max_frames=3)] == [0, 1, 2]
    assert [i for i, _ in iter_frames(lossless[0], RAW, max_frames=1)] == [0]
    with pytest.raises(ValueError, match="uniform-N"):
        iter_frames(lossless[0], Sampling(frames=4))


def test_probe_counts_decoded_frames(lossless):
    info = probe(lossless[0])
    assert (info.fps, info.width, info.height, info.decoded_frames) == (30.0, 64, 48, 13)
    assert source_fps(lossless[0]) == 30.0


@pytest.mark.parametrize(
    "name, fps",
    [("a.mp4", 25), ("a.avi", 15), ("a.mkv", 10), ("a.webm", 30), ("a.mpg", 25)],
)
def test_reads_common_containers(tmp_path, name, fps):
    gt = _frames(11, 64, 48)
    gt[..., 2] = 128  # lossy codecs smear pure noise; keep content smooth
    write_video(tmp_path / name, gt, fps)
    frames, info, idx = read_video(tmp_path / name, RAW)
    assert frames.shape == gt.shape and info.decoded_frames == 11
    assert info.fps == pytest.approx(fps, rel=1e-3)
    assert _psnr(frames, gt) > 22


def test_truncated_file_keeps_the_frames_that_decode(tmp_path, caplog):
    gt = _frames(40)
    write_video(tmp_path / "full.avi", gt, 25)
    data = (tmp_path / "full.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    cap = cv2.VideoCapture(str(tmp_path / "cut.avi"))
    claimed = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    with caplog.at_level(logging.WARNING, logger="data.video"):
        info = probe(tmp_path / "cut.avi")
    assert 2 <= info.decoded_frames < 40 <= claimed  # the header still claims all 40
    assert "header claims" in caplog.text
    frames, info2, idx = read_video(tmp_path / "cut.avi", Sampling(frames=4, size=None))
    assert idx[-1] == info.decoded_frames - 1 and len(frames) == 4
    assert info2.decoded_frames == info.decoded_frames


def test_absurd_container_fps_falls_back_to_25(tmp_path, caplog):
    write_video(tmp_path / "fast.avi", _frames(4), 1000)
    with caplog.at_level(logging.WARNING, logger="data.video"):
        _, info, _ = read_video(tmp_path / "fast.avi", Sampling(fps=5, size=None))
    assert info.fps == 25.0
    assert "assuming 25" in caplog.text


def _broken(tmp_path, kind: str):
    path = tmp_path / f"{kind}.mp4"
    if kind == "missing":
        pass
    elif kind == "zero":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 100)
    elif kind == "truncated":
        write_video(tmp_path / "full.mp4", _frames(20), 25)
        data = (tmp_path / "full.mp4").read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])  # mp4v puts the index at the end
    elif kind == "one_frame":
        write_video(path, _frames(1), 25)
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("zero", "empty"),
        ("text", "cannot be opened"),
        ("truncated", "cannot be opened"),
        ("one_frame", "only 1 decodable frame"),
        ("folder", "not a file"),
    ],
)
@pytest.mark.parametrize("reader", ["read_video", "uniform", "probe", "iter_frames"])
def test_broken_inputs_raise_video_read_error(tmp_path, kind, message, reader):
    path = _broken(tmp_path, kind)
    call = {
        "read_video": lambda: read_video(path),
        "uniform": lambda: read_video(path, Sampling(frames=8)),
        "probe": lambda: probe(path),
        "iter_frames": lambda: list(iter_frames(path)),
    }[reader]
    with pytest.raises(VideoReadError, match=message) as err:
        call()
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_iter_frames_yields_nothing_from_a_one_frame_video(tmp_path):
    gen = iter_frames(_broken(tmp_path, "one_frame"))
    with pytest.raises(VideoReadError):
        next(gen)
