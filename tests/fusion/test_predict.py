import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logit

from data.sampling import Sampling
from data.store import StoreWriter
from data.synthetic import write_video
from flow.api import FlowEstimator
from fusion.pipeline import fuse_run, stream_fingerprints
from fusion.predict import Scorer, video_seconds, window_mismatch, window_starts, write_outputs
from streams.rundir import RunDir, build_model, resolve_run_config

SIDE = 32
FPS = 10


def moving_square_video(path: Path, seconds: float, fps: int = FPS, side: int = SIDE) -> Path:
    """A square that moves right, then jumps about: enough texture for flow, cheap to write."""
    n = int(round(seconds * fps))
    rng = np.random.default_rng(0)
    frames = np.full((n, side, side, 3), 40, np.uint8)
    for i in range(n):
        x = (2 * i) % (side - 10) if i < n // 2 else int(rng.integers(0, side - 10))
        frames[i, 10:20, x : x + 10] = (220, 180, 60)
    write_video(path, frames, fps, fourcc="MJPG")
    return path


def build_run(root: Path) -> Path:
    """A run of untrained tiny models over a store made as `twostream extract` makes one."""
    store = root / "store.h5"
    est = FlowEstimator("farneback", "opencv", "cpu")
    rng = np.random.default_rng(1)
    with StoreWriter(store) as w:  # the default (lossy) codec: scoring must quantise the same way
        for i in range(6):
            rgb = rng.integers(0, 255, (6, SIDE, SIDE, 3), dtype=np.uint8)
            flow = est(rgb[:-1], rgb[1:])
            attrs = dict(label=i % 2, group=f"g{i}", split="val", source_path=f"/v{i}.mp4",
                         source_fps=float(FPS), decoded_frames=6, source_size=[SIDE, SIDE],
                         **{f"sampling_{k}": v for k, v in Sampling(size=SIDE).to_attrs().items()}, **est.describe())
            w.write(f"v{i}", rgb, flow, attrs)
    cfg = resolve_run_config(None, {"train": {"steps": 3, "stage": "head", "seed": 5},
                                    "model": {"backbone": "resnet50", "flow_stack": 2, "lstm_layers": 1,
                                              "lstm_hidden": 8, "attention_heads": 2, "dense_units": [8, 4]}})
    run = root / "run"
    for s, stream in enumerate(("rgb", "flow")):
        rd = RunDir(run, stream)
        rd.path.mkdir(parents=True)
        rd.write_config(cfg, {"stream": stream, "store": str(store)})
        head = build_model(cfg, stream).head  # a stage-1 checkpoint: the head over the seeded backbone
        rd.save_checkpoint("best", {"stage": 1, "module": "head", "model": head.state_dict()})
        for split in ("val", "test"):
            ids = [f"{split}{i}" for i in range(40)]
            y = np.arange(40) % 2
            noise = np.random.default_rng(s).normal(0, 1.5, 40)
            rd.write_predictions(split, ids, y, (2 * y - 1) + noise)
    return run


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def scorer(run) -> Scorer:
    return Scorer(run, tta=1, device="cpu")


@pytest.mark.parametrize(
    "duration, expected",
    [
        (20.0, [(float(k), k + 2.0) for k in range(19)]),  # windows end exactly at the video's end
        (1.5, [(0.0, 1.5)]),  # shorter than a window: one window over all of it
        (4.5, [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (2.5, 4.5)]),  # a tail window ends at the end
    ],
)
def test_window_starts(duration, expected):
    got = window_starts(duration, 2.0, 1.0)
    assert np.allclose(got, expected) and len(got) == len(expected)


@pytest.mark.parametrize("window, stride", [(0.0, 1.0), (2.0, -1.0), (float("nan"), 1.0), (2.0, float("inf"))])
def test_window_and_stride_must_be_finite_positive_seconds(window, stride):
    with pytest.raises(ValueError, match="positive seconds"):
        window_starts(10.0, window, stride)


def test_long_video_gives_every_window_with_bounded_memory(tmp_path, scorer):
    video = moving_square_video(tmp_path / "long.avi", 20.0)
    calls = []
    real = scorer.flow

    def counting(prev, nxt):
        calls.append(len(prev))
        return real(prev, nxt)

    scorer.flow = counting
    try:
        score = scorer.score(video, window=2.0, stride=1.0)
    finally:
        scorer.flow = real
    assert len(score.windows) == 19
    assert [w.start_s for w in score.windows] == [float(k) for k in range(19)]
    assert all(w.frames == 20 for w in score.windows)
    assert score.max_frames_held <= 20  # never more than one window's frames
    assert sum(calls) == 199  # each pair of frames gets its flow once although windows overlap
    assert score.duration_s == pytest.approx(20.0)


def test_memory_does_not_grow_with_length(tmp_path, scorer):
    short = scorer.score(moving_square_video(tmp_path / "a.avi", 4.0), window=2.0, stride=1.0)
    long = scorer.score(moving_square_video(tmp_path / "b.avi", 9.0), window=2.0, stride=1.0)
    assert short.max_frames_held == long.max_frames_held == 20


def test_fused_window_follows_the_fusion_weights_and_verdict_the_top_windows(tmp_path, scorer):
    score = scorer.score(moving_square_video(tmp_path / "v.avi", 6.0), window=2.0, stride=1.0)
    f = scorer.fusion
    w = dict(zip(f.features, f.weights, strict=True))
    for win in score.windows:
        expected = w.get("rgb:logit", 0) * logit(win.p_rgb) + w.get("flow:logit", 0) * logit(win.p_flow) + f.bias
        assert logit(win.p_fused) == pytest.approx(expected, abs=1e-5)
    top = sorted((x.p_fused for x in score.windows), reverse=True)[:2]
    assert score.score == pytest.approx(np.mean(top)) and score.top_k == 2
    assert score.violent == (score.score >= f.threshold)


def test_tta_averages_logits_over_views(tmp_path, run, scorer):
    video = moving_square_video(tmp_path / "v.avi", 3.0)
    two = Scorer(run, tta=2, device="cpu")
    plain = scorer.score(video, 2.0, 1.0)
    both = two.score(video, 2.0, 1.0)
    assert both.tta == 2 and len(both.windows) == len(plain.windows)
    assert not np.allclose([w.p_flow for w in both.windows], [w.p_flow for w in plain.windows])


def test_outputs(tmp_path, scorer):
    score = scorer.score(moving_square_video(tmp_path / "v.avi", 4.0), 2.0, 1.0)
    paths = write_outputs(score, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["v.csv", "v.json", "v.png"]
    lines = (tmp_path / "out" / "v.csv").read_text().splitlines()
    assert lines[0] == "start_s,end_s,p_rgb,p_flow,p_fused" and len(lines) == 1 + len(score.windows)
    doc = json.loads((tmp_path / "out" / "v.json").read_text())
    assert doc["violent"] == score.violent and len(doc["windows"]) == len(score.windows)
    assert (tmp_path / "out" / "v.png").read_bytes()[:4] == b"\x89PNG"


def test_broken_video(tmp_path, scorer):
    from data.video import VideoReadError

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(VideoReadError):
        scorer.score(bad)



def test_the_scorer_knows_how_long_the_training_clips_were(scorer):
    assert scorer.clip_seconds == pytest.approx(6 / FPS)  # 6 decoded frames at 10 fps


def test_seconds_come_from_decoded_frames_and_source_fps():
    assert video_seconds({"decoded_frames": 75, "source_fps": 25.0}) == 3.0
    assert video_seconds({"decoded_frames": 75}) is None and video_seconds({"decoded_frames": 7, "source_fps": 0}) is None


@pytest.mark.parametrize("window, clip, warned", [(2.0, 2.0, False), (2.0, 2.9, False), (2.0, 5.0, True),
                                                  (5.0, 2.0, True), (2.0, None, False)])
def test_windows_far_from_the_training_clip_length_are_flagged(window, clip, warned):
    message = window_mismatch(window, clip)
    assert (message is not None) == warned
    if warned:
        assert f"--window {clip:.1f}" in message and f"{window / clip:.2g}x as far apart" in message


def test_a_fusion_fitted_before_a_stream_was_retrained_is_refused(tmp_path):
    import shutil

    (tmp_path / "a").mkdir()
    run = build_run(tmp_path / "a")
    Scorer(run, tta=1, device="cpu")  # fits fusion.json, recording what each stream predicted on validation
    copy = shutil.copytree(run, tmp_path / "copy")  # a plain copy: new file times, same streams
    Scorer(copy, tta=1, device="cpu")
    rd = RunDir(run, "flow")  # flow trained again: other validation predictions
    ids = [f"val{i}" for i in range(40)]
    rd.write_predictions("val", ids, np.arange(40) % 2, np.random.default_rng(9).normal(0, 1, 40))
    with pytest.raises(ValueError, match=r"fitted before the flow stream was trained again; refit it with `twostream fuse"):
        Scorer(run, tta=1, device="cpu")
    fuse_run(run)  # refitted on the streams as they are
    assert Scorer(run, tta=1, device="cpu").fusion.trained == stream_fingerprints(run)
