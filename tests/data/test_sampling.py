import math

import h5py
import numpy as np
import pytest

from data.sampling import Sampling, output_size, sample_indices


@pytest.mark.parametrize(
    "n, source_fps, sampling, expected",
    [
        (10, 30.0, Sampling(fps=10), [0, 3, 6, 9]),  # every 3rd frame
        (11, 25.0, Sampling(fps=10), [0, 3, 5, 8, 10]),  # ticks at 0.1 s land on 0.12, 0.2, ...
        (5, 10.0, Sampling(fps=30), [0, 1, 2, 3, 4]),  # above the source rate: all, no duplicates
        (5, 30.0, Sampling(fps=30), [0, 1, 2, 3, 4]),
        (7, 15.0, Sampling(fps=5), [0, 3, 6]),
        (5, 30.0, Sampling(), [0, 1, 2, 3, 4]),  # every frame
        (7, 30.0, Sampling(frames=16), [0, 1, 2, 3, 4, 5, 6]),  # fewer than N: all of them
        (7, 30.0, Sampling(frames=7), [0, 1, 2, 3, 4, 5, 6]),
        (100, 30.0, Sampling(frames=4), [0, 33, 66, 99]),
        (100, 30.0, Sampling(frames=5), [0, 25, 50, 74, 99]),  # 24.75, 49.5, 74.25 rounded
        (3, 30.0, Sampling(frames=2), [0, 2]),
        (0, 30.0, Sampling(fps=10), []),
        (0, 30.0, Sampling(frames=4), []),
    ],
)
def test_sample_indices_table(n, source_fps, sampling, expected):
    got = sample_indices(n, source_fps, sampling)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("source_fps", [10.0, 12.5, 15.0, 24.0, 25.0, 29.97, 30.0])
def test_target_fps_steps_are_the_same_time_across_sources(source_fps):
    n = int(source_fps * 4)  # four seconds
    idx = sample_indices(n, source_fps, Sampling(fps=10))
    steps = np.diff(idx / source_fps)
    # each kept frame is the first at or after its 0.1 s tick, so steps stay within one source frame
    assert np.all(steps > 0.1 - 1 / source_fps - 1e-9)
    assert np.all(steps < 0.1 + 1 / source_fps + 1e-9)
    assert abs(len(idx) - min(n, math.ceil(n / source_fps * 10))) <= 1


@pytest.mark.parametrize("n", [2, 3, 17, 100, 1001])
@pytest.mark.parametrize("frames", [2, 5, 16, 32])
def test_uniform_indices_are_sorted_distinct_and_span_the_video(n, frames):
    idx = sample_indices(n, 30.0, Sampling(frames=frames))
    assert len(idx) == min(n, frames)
    assert np.all(np.diff(idx) > 0)
    assert idx[0] == 0 and idx[-1] == n - 1


def test_sample_indices_rejects_bad_inputs():
    with pytest.raises(ValueError, match="n_decoded"):
        sample_indices(-1, 30.0, Sampling())
    with pytest.raises(ValueError, match="source_fps"):
        sample_indices(10, 0.0, Sampling(fps=10))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fps=10, frames=8), "either fps or frames"),
        (dict(size=112, short_side=112), "either size or short_side"),
        (dict(size=8), "size must be at least 16"),
        (dict(size=None, short_side=15), "short_side must be at least 16"),
        (dict(fps=0), "fps must be a positive"),
        (dict(fps=-5), "fps must be a positive"),
        (dict(fps=float("nan")), "fps must be a positive"),
        (dict(frames=1), "frames must be at least 2"),
    ],
)
def test_sampling_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


@pytest.mark.parametrize(
    "width, height, sampling, expected",
    [
        (320, 240, Sampling(), (224, 224)),  # square, aspect not kept
        (320, 240, Sampling(size=None), (320, 240)),
        (320, 240, Sampling(size=None, short_side=112), (149, 112)),
        (240, 320, Sampling(size=None, short_side=112), (112, 149)),
        (1920, 1080, Sampling(size=None, short_side=256), (455, 256)),
        (64, 48, Sampling(size=None, short_side=96), (128, 96)),  # enlarging is allowed
        (50, 50, Sampling(size=None, short_side=20), (20, 20)),
    ],
)
def test_output_size(width, height, sampling, expected):
    assert output_size(width, height, sampling) == expected


def test_output_size_rejects_empty_frames():
    with pytest.raises(ValueError, match="positive"):
        output_size(0, 10, Sampling())


SAMPLINGS = [
    Sampling(),
    Sampling(fps=12.5, size=None),
    Sampling(frames=16, size=None, short_side=128),
    Sampling(fps=10, size=112),
]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_attrs_round_trip_through_hdf5(tmp_path, sampling):
    with h5py.File(tmp_path / "s.h5", "w") as fh:
        fh.attrs.update(sampling.to_attrs(prefix="sampling_"))
        fh.attrs["other"] = 3  # unrelated keys are ignored
    with h5py.File(tmp_path / "s.h5", "r") as fh:
        back = Sampling.from_attrs(fh.attrs, prefix="sampling_")
    assert back == sampling


def test_attrs_are_plain_values_with_none_spelled_out():
    attrs = Sampling(size=None, short_side=128).to_attrs()
    assert attrs == {"fps": "none", "frames": "none", "size": "none", "short_side": 128}
    # a missing key takes the default, but an explicit "none" stays None
    assert Sampling.from_attrs({"size": b"none"}).size is None
    assert Sampling.from_attrs({}).size == 224


def test_from_attrs_rejects_garbage():
    with pytest.raises(ValueError, match="not a number"):
        Sampling.from_attrs({"fps": "fast"})
