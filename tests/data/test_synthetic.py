import csv

import cv2
import numpy as np
import pytest

from data.sampling import Sampling
from data.synthetic import (
    SyntheticSpec,
    generate_dataset,
    iter_clips,
    make_recording,
    render_clip,
    write_video,
)
from data.video import read_video

SMALL = SyntheticSpec(videos=6, recordings=3, frames=(9, 12), size=(48, 64), container="mkv")


def _best_threshold_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the best one-threshold classifier on x (either direction), fit on the data itself."""
    ys = y[np.argsort(x, kind="stable")]
    below0 = np.r_[0, np.cumsum(ys == 0)]  # label-0 count at or below each cut
    above1 = (ys == 1).sum() - np.r_[0, np.cumsum(ys == 1)]
    correct = below0 + above1
    return float(np.maximum(correct, len(y) - correct).max() / len(y))


def _erratic(frames: np.ndarray, fps: int) -> float:
    """How much the optical flow changes over 0.1 s relative to its size, over moving pixels."""
    grey = [
        cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (64, 64), interpolation=cv2.INTER_AREA)
        for f in frames
    ]
    flow = np.stack(
        [
            cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 2, 9, 3, 5, 1.1, 0)
            for a, b in zip(grey[:-1], grey[1:], strict=True)
        ]
    )
    lag = max(1, round(0.1 * fps))
    a, b = flow[:-lag], flow[lag:]
    ma, mb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    moving = (ma > 0.35) | (mb > 0.35)
    return float(np.linalg.norm(b - a, axis=-1)[moving].sum() / ((ma + mb)[moving].sum() + 1e-6))


@pytest.fixture(scope="module")
def default_clips():
    return list(iter_clips(SyntheticSpec()))


def test_render_clip_is_deterministic_and_seed_dependent():
    def clip(seed, label=1):
        return render_clip(label, np.random.default_rng(seed), 64, 48, 7, fps=15)

    a = clip(3)
    assert a.shape == (7, 48, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, clip(3))
    assert not np.array_equal(a, clip(4))
    assert not np.array_equal(a, clip(3, label=0))


def test_render_clip_shares_the_recordings_background():
    rec = make_recording(np.random.default_rng(0), 64, 64)
    a = render_clip(0, np.random.default_rng(1), 64, 64, 3, recording=rec)
    b = render_clip(1, np.random.default_rng(2), 64, 64, 3, recording=rec)
    c = render_clip(1, np.random.default_rng(2), 64, 64, 3)
    # the top rows hold background only: same camera -> close, other camera -> far
    top = slice(0, 6)
    assert (
        np.abs(a[0, top].astype(int) - b[0, top]).mean()
        < np.abs(b[0, top].astype(int) - c[0, top]).mean()
    )


@pytest.mark.parametrize(
    "kwargs",
    [dict(label=2), dict(width=16), dict(frames=0), dict(fps=0.0)],
)
def test_render_clip_validation(kwargs):
    args = dict(label=0, width=64, height=48, frames=4, fps=25.0) | kwargs
    with pytest.raises(ValueError):
        render_clip(
            args.pop("label"),
            np.random.default_rng(0),
            args.pop("width"),
            args.pop("height"),
            args.pop("frames"),
            **args,
        )


def test_iter_clips_is_deterministic_and_follows_the_spec():
    first, second = list(iter_clips(SMALL)), list(iter_clips(SMALL))
    assert [c.path for c in first] == [c.path for c in second]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.frames, b.frames)
    assert sum(c.label for c in first) == 3
    assert {c.group for c in first} == {"rec00", "rec01", "rec02"}
    for c in first:
        t, h, w, _ = c.frames.shape
        assert 9 <= t <= 12 and 48 <= h <= 64 and 48 <= w <= 64 and h % 2 == 0 and w % 2 == 0
        assert c.fps in SMALL.fps
        assert c.path.startswith("Violence/V_" if c.label else "NonViolence/NV_")
        assert c.path.endswith(".mkv")


def test_generate_dataset_writes_layout_groups_and_lossless_frames(tmp_path):
    out = generate_dataset(tmp_path / "ds", SMALL)
    assert out == tmp_path / "ds"
    assert len(list((out / "Violence").glob("V_*.mkv"))) == 3
    assert len(list((out / "NonViolence").glob("NV_*.mkv"))) == 3
    with open(out / "groups.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["video", "group"]
    clips = {c.path: c for c in iter_clips(SMALL)}
    assert {r["video"]: r["group"] for r in rows} == {p: c.group for p, c in clips.items()}
    for path, clip in clips.items():
        frames, info, _ = read_video(out / path, Sampling(size=None))
        np.testing.assert_array_equal(frames, clip.frames)  # FFV1 is lossless
        assert info.fps == clip.fps


def test_generate_dataset_default_container_is_readable_mp4(tmp_path):
    spec = SyntheticSpec(videos=2, recordings=1, frames=(11, 11), size=(64, 64))
    out = generate_dataset(tmp_path, spec)
    for clip in iter_clips(spec):
        assert clip.path.endswith(".mp4")
        frames, info, _ = read_video(out / clip.path, Sampling(size=None))
        assert frames.shape == clip.frames.shape and info.decoded_frames == 11
        mse = np.mean((frames.astype(float) - clip.frames) ** 2)
        assert 10 * np.log10(255**2 / mse) > 25


def test_generate_dataset_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    generate_dataset(tmp_path, SMALL)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        generate_dataset(tmp_path, SMALL)
    smaller = SyntheticSpec(videos=2, recordings=1, frames=(4, 4), size=(48, 48), container="mkv")
    generate_dataset(tmp_path, smaller, overwrite=True)
    videos = sorted(p.name for p in tmp_path.rglob("*.mkv"))
    assert len(videos) == 2  # the six old clips are gone
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(videos=0),
        dict(violent_fraction=1.5),
        dict(recordings=0),
        dict(frames=(1, 5)),
        dict(frames=(9, 5)),
        dict(size=(16, 64)),
        dict(fps=()),
        dict(container="mov"),
    ],
)
def test_spec_validation(kwargs):
    with pytest.raises(ValueError, match="synthetic"):
        SyntheticSpec(**kwargs)


def test_write_video_rejects_bad_input(tmp_path):
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "a.mp4", np.zeros((3, 31, 32, 3), np.uint8), 25)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "a.mp4", frames.astype(np.float32), 25)
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "a.xyz", frames, 25)
    with pytest.raises(ValueError, match="cannot write"):
        write_video(tmp_path / "a.mpg", frames, 10)  # MPEG-1 has no 10 fps


def test_single_pixel_statistics_do_not_separate_the_classes(default_clips):
    """Mean brightness or frame-difference energy alone must not give a near-perfect classifier."""
    y = np.array([c.label for c in default_clips])
    brightness = np.array([c.frames.mean() for c in default_clips])
    energy = [
        np.abs(np.diff(c.frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
        for c in default_clips
    ]
    for name, stat in [
        ("brightness", brightness),
        ("difference energy", np.array([e.mean() for e in energy])),
        ("peak difference energy", np.array([e.max() for e in energy])),
    ]:
        assert _best_threshold_accuracy(stat, y) < 0.9, name


def test_motion_pattern_separates_the_classes(default_clips):
    """How erratic the flow is must separate violent from calm clips better than any pixel statistic."""
    y = np.array([c.label for c in default_clips])
    erratic = np.array([_erratic(c.frames, c.fps) for c in default_clips])
    assert _best_threshold_accuracy(erratic, y) >= 0.8
    assert erratic[y == 1].mean() > erratic[y == 0].mean()


def test_default_spec_balances_classes_and_groups(default_clips):
    labels = np.array([c.label for c in default_clips])
    assert len(default_clips) == 60 and labels.sum() == 30
    groups = {}
    for c in default_clips:
        groups.setdefault(c.group, set()).add(c.label)
    assert len(groups) == 12 and all(v == {0, 1} for v in groups.values())
