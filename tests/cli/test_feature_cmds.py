import h5py
import pytest
from typer.testing import CliRunner

import streams.features as features_mod
from cli.app import app
from streams.features import FeatureDataset, features_path
from tests.data.test_clips import make_store
from tests.streams.test_features import mean_backbone

runner = CliRunner()

VIDEOS = {"a": (6, 1, "g0", "train"), "b": (5, 1, "g1", "train"), "c": (4, 0, "g2", "val")}


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(features_mod, "build_backbone", mean_backbone)
    return make_store(tmp_path / "s.h5", VIDEOS)


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_features_writes_the_file_and_summarises(store):
    res = _run("features", store, "--stream", "flow", "--views", "2", "--minority-views", "3", "--steps", "3",
               "--flow-stack", "2", "--size", "16", "--device", "cpu", "--batch-size", "2")
    assert res.exit_code == 0, res.output
    path = features_path(store, "flow", "vgg19")
    ds = FeatureDataset(path)
    assert sorted(ds.video_ids) == ["a", "b", "c"]
    assert dict(zip(ds.video_ids, ds.views.tolist())) == {"a": 2, "b": 2, "c": 3}
    assert ds.steps == 3 and ds.feature_dim == 4  # the stand-in backbone returns one mean per channel
    assert "7 (2 per video, 3 for label 0)" in res.output


def test_every_backbone_the_model_knows_is_a_choice(store):
    from streams.config import BACKBONES

    assert "hoghof" in BACKBONES
    res = _run("features", store, "--stream", "flow", "--backbone", "hoghof", "--steps", "3", "--flow-stack", "2",
               "--size", "16", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert FeatureDataset(features_path(store, "flow", "hoghof")).video_ids


def _assert_one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    for fragment in fragments:
        assert fragment in errors[0]


def test_missing_store(tmp_path):
    _assert_one_line_error(_run("features", tmp_path / "none.h5", "--stream", "rgb"), "twostream extract")


def test_not_a_store(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("hello\n")
    _assert_one_line_error(_run("features", path, "--stream", "rgb"), "not a twostream store", "twostream extract")


def test_hdf5_file_that_is_not_a_store(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = [1, 2, 3]
    _assert_one_line_error(_run("features", path, "--stream", "rgb"), "twostream extract")


def test_store_without_the_stream(store):
    with h5py.File(store, "a") as f:
        for group in f["videos"].values():
            del group["flow"]
    _assert_one_line_error(_run("features", store, "--stream", "flow", "--device", "cpu"), "no flow data", "twostream extract")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--views", "0"], "views"),
        (["--steps", "0"], "steps"),
        (["--size", "8"], "size"),
        (["--workers", "-1"], "workers"),
        (["--seed", "-1"], "--seed must be a non-negative integer"),
    ],
)
def test_bad_options(store, extra, message):
    _assert_one_line_error(_run("features", store, "--stream", "rgb", "--device", "cpu", *extra), message)


def test_unknown_stream_is_refused(store):
    res = _run("features", store, "--stream", "depth")
    assert res.exit_code == 2 and "Traceback" not in res.output


@pytest.mark.parametrize("command", [["info"], ["train", "--stream", "rgb", "--out", "RUN"],
                                     ["train", "--stream", "both", "--out", "RUN"], ["cv", "--out", "RUN"],
                                     ["features", "--stream", "flow", "--device", "cpu"]])
def test_feature_cache_passed_as_a_store(store, tmp_path, command):
    """The file `features` writes beside a store is refused in one line that says what it is."""
    assert _run("features", store, "--stream", "rgb", "--steps", "3", "--size", "16", "--device", "cpu").exit_code == 0
    cache = features_path(store, "rgb", "vgg19")
    args = [str(tmp_path / "run") if a == "RUN" else a for a in command]
    res = _run(args[0], cache, *args[1:])
    _assert_one_line_error(res, f"{cache} is a feature cache", "not a twostream store", str(store))
    assert not (tmp_path / "run" / "rgb" / "best.pt").exists()
