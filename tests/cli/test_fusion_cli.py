import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from data.store import StoreWriter
from tests.fusion.test_pipeline import _complementary, _perfect_and_noise, make_run
from tests.fusion.test_predict import build_run, moving_square_video

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fuse_prints_the_comparison(tmp_path):
    run = make_run(tmp_path / "run", _complementary)
    res = _run("fuse", run)
    assert res.exit_code == 0, res.output
    for name in ("rgb", "flow", "average", "tsn", "fused", "fusion.json"):
        assert name in res.output
    assert (run / "fusion.json").is_file()


@pytest.mark.parametrize("value", ["1.5", "0", "nan"])
def test_min_recall_out_of_range_names_the_option(tmp_path, value):
    run = make_run(tmp_path / "run", _complementary)
    _one_line_error(_run("fuse", run, "--min-recall", value), "--min-recall must be in (0, 1]")


def test_a_file_given_as_the_run_folder(tmp_path):
    path = tmp_path / "fusion.json"
    path.write_text("{}")
    _one_line_error(_run("fuse", path), "is a file, not a run folder")


def test_an_ensemble_of_one_run_given_twice_is_refused(tmp_path):
    run = make_run(tmp_path / "run", _complementary)
    _one_line_error(_run("fuse", run, tmp_path / "." / "run"), "is given twice")
    assert not (run / "ensemble.json").exists()


def test_opencv_and_ffmpeg_keep_quiet_beside_the_commands_own_errors(tmp_path):
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    probe = f"import cv2; cv2.VideoCapture({str(bad)!r})"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    loud = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    quiet = subprocess.run([sys.executable, "-c", "import cli; " + probe], capture_output=True, text=True, env=env)
    assert "moov atom not found" in loud.stderr  # what a broken mp4 makes ffmpeg print
    assert quiet.stderr == ""


def test_fuse_reports_the_fallback(tmp_path):
    run = make_run(tmp_path / "run", _perfect_and_noise, n_val=30, n_test=40)
    res = _run("fuse", run)
    assert res.exit_code == 0, res.output
    assert "fallback" in res.output and "rgb scored best" in " ".join(res.output.split())


def test_evaluate_prints_the_table_and_the_report(tmp_path):
    run = make_run(tmp_path / "run", _complementary, n_val=100, n_test=100)
    res = _run("evaluate", run, "--goal", "f1")
    assert res.exit_code == 0, res.output
    assert "fused" in res.output and "report:" in res.output
    assert (run / "eval" / "report.md").is_file()
    paired = json.loads((run / "eval" / "metrics.json").read_text())["paired"]
    for s in ("rgb", "flow"):
        line = next(ln for ln in res.output.splitlines() if ln.startswith(f"fused vs {s}:"))
        a, b = paired[s]["only_a"], paired[s]["only_b"]
        assert f"right where {s} is wrong on {a} video{'' if a == 1 else 's'}, wrong where it is right on {b} " in line


def test_run_without_both_streams(tmp_path):
    run = make_run(tmp_path / "run", _complementary, n_val=20, n_test=20, streams=("rgb",))
    _one_line_error(_run("evaluate", run), "no trained flow stream", "twostream train")


def test_single_class_validation(tmp_path):
    def one_class(n, seed):
        return np.zeros(n, int), {"rgb": np.linspace(-1, 1, n), "flow": np.linspace(1, -1, n)}

    run = make_run(tmp_path / "run", one_class, n_val=10, n_test=10)
    _one_line_error(_run("fuse", run), "only non-violent videos", "both classes")


@pytest.mark.parametrize("command", ["fuse", "evaluate", "predict", "cv"])
def test_tta_zero(tmp_path, command):
    run = make_run(tmp_path / "run", _complementary, n_val=20, n_test=20)
    args = {
        "fuse": [run],
        "evaluate": [run],
        "predict": [tmp_path / "v.mp4", "--model", run],
        "cv": [tmp_path / "s.h5", "--out", tmp_path / "cv"],
    }[command]
    _one_line_error(_run(command, *args, "--tta", "0"), "--tta must be at least 1")


def test_cv_with_more_folds_than_groups(tmp_path):
    store = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    with StoreWriter(store, flow_codec="float16") as w:
        for i in range(6):  # 3 recordings, two clips each
            rgb = rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
            w.write(f"v{i}", rgb, np.zeros((2, 16, 16, 2), np.float32),
                    dict(label=i % 2, group=f"rec{i // 2}", source_path=f"/v{i}.mp4", source_fps=10.0,
                         source_size=[16, 16], flow_method="synthetic"))
    _one_line_error(_run("cv", store, "--out", tmp_path / "cv", "--folds", "4"), "3 source recordings")


@pytest.mark.parametrize("k, message", [("1", "--inner-folds must be 0 (off) or at least 2"),
                                        ("5", "--inner-folds 5 is more than the 4 recordings with")])
def test_cv_with_bad_inner_folds(tmp_path, k, message):
    store = tmp_path / "s.h5"
    rng = np.random.default_rng(0)
    with StoreWriter(store, flow_codec="float16") as w:
        for i in range(12):  # 6 recordings of both classes: 3 folds leave 4 outside each test fold
            rgb = rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
            w.write(f"v{i:02d}", rgb, np.zeros((2, 16, 16, 2), np.float32),
                    dict(label=i % 2, group=f"rec{i // 2}", source_path=f"/v{i}.mp4", source_fps=10.0,
                         source_size=[16, 16], flow_method="synthetic"))
    _one_line_error(_run("cv", store, "--out", tmp_path / "cv", "--folds", "3", "--preset", "cpu",
                         "--inner-folds", k), message)


def test_cv_seed_with_a_config_is_refused_not_ignored(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[train]\nseed = 3\n")
    _one_line_error(_run("cv", tmp_path / "none.h5", "--out", tmp_path / "cv", "--config", config, "--seed", "1"),
                    "train.seed")


@pytest.mark.parametrize("repeats", ["1", "3"])
def test_cv_asked_for_weights_the_preset_cannot_use_stops_before_any_work(tmp_path, repeats):
    dataset = tmp_path / "data"  # never read: the weights are checked first
    dataset.mkdir()
    _one_line_error(_run("cv", dataset, "--out", tmp_path / "cv", "--preset", "cpu", "--pretrained",
                         "--repeats", repeats), "hoghof backbone has no weights")
    _one_line_error(_run("cv", dataset, "--out", tmp_path / "cv", "--preset", "gpu", "--weights", tmp_path / "no.pth",
                         "--repeats", repeats), "weights file not found")
    assert not (tmp_path / "cv").exists()


def test_cv_repeats_below_one(tmp_path):
    _one_line_error(_run("cv", tmp_path / "none.h5", "--out", tmp_path / "cv", "--repeats", "0"),
                    "--repeats must be at least 1")


def test_cv_negative_seed(tmp_path):
    _one_line_error(_run("cv", tmp_path / "none.h5", "--out", tmp_path / "cv", "--seed", "-3"),
                    "--seed must be a non-negative integer")


def test_evaluate_where_its_folder_is_a_file(tmp_path):
    run = make_run(tmp_path / "run", _complementary)
    (run / "eval").write_text("in the way")
    _one_line_error(_run("evaluate", run), "is a file, where the evaluation writes its folder")
    assert (run / "eval").read_text() == "in the way"


def test_cv_missing_store(tmp_path):
    _one_line_error(_run("cv", tmp_path / "none.h5", "--out", tmp_path / "cv"), "twostream extract")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("predict_cli"))


def test_predict_scores_the_good_videos_and_reports_the_broken_one(tmp_path, trained_run):
    run = trained_run
    good = [moving_square_video(tmp_path / "a.avi", 3.0), moving_square_video(tmp_path / "b.avi", 4.0)]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    res = _run("predict", good[0], broken, good[1], "--model", run, "--out", tmp_path / "scores", "--device", "cpu")
    assert res.exit_code == 2, res.output
    assert "broken.mp4" in res.output
    assert [line for line in res.output.splitlines() if line.startswith("error:") and "broken.mp4" in line]
    for name in ("a", "b"):
        for suffix in ("csv", "json", "png"):
            assert (tmp_path / "scores" / f"{name}.{suffix}").is_file()
    assert not (tmp_path / "scores" / "broken.csv").exists()
    assert "2 video(s) scored" in res.output


def test_predict_out_that_is_a_file(tmp_path, trained_run):
    (tmp_path / "taken").write_text("x")
    _one_line_error(_run("predict", tmp_path / "v.mp4", "--model", trained_run, "--out", tmp_path / "taken"),
                    "is a file; give a folder")


def test_predict_all_good_exits_zero(tmp_path, trained_run):
    run = trained_run
    video = moving_square_video(tmp_path / "a.avi", 2.5)
    res = _run("predict", video, "--model", run, "--window", "1.0", "--stride", "0.5", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (run / "predict" / "a.json").is_file()


def test_predict_warns_when_windows_are_far_from_the_training_clip_length(tmp_path, trained_run):
    video = moving_square_video(tmp_path / "a.avi", 2.5)
    far = _run("predict", video, "--model", trained_run, "--out", tmp_path / "far", "--device", "cpu")
    assert far.exit_code == 0, far.output
    assert "warning:" in far.output and "--window 0.6" in far.output  # trained on 0.6 s clips, default 2 s windows
    near = _run("predict", video, "--model", trained_run, "--window", "0.6", "--stride", "0.3",
                "--out", tmp_path / "near", "--device", "cpu")
    assert near.exit_code == 0, near.output
    assert "warning:" not in near.output
