import errno
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from data.manifest import ManifestRow, write_manifest
from data.synthetic import render_clip, write_video

runner = CliRunner()


@pytest.fixture()
def manifest(tmp_path):
    rows = []
    for i, frames in enumerate([4, 5]):
        path = tmp_path / f"c{i}.avi"
        write_video(path, render_clip(i % 2, np.random.default_rng(i), 40, 32, frames), fps=10)
        rows.append(ManifestRow(f"c{i}", str(path), i % 2, f"c{i}", "train"))
    out = tmp_path / "m.csv"
    write_manifest(rows, out)
    return out


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_extract_then_info(tmp_path, manifest):
    res = _run("extract", manifest, "-o", tmp_path / "s.h5", "--method", "farneback", "--size", "32", "--workers", "1")
    assert res.exit_code == 0, res.output
    res = _run("info", tmp_path / "s.h5")
    assert res.exit_code == 0, res.output
    assert "2 videos" in res.output and "check out" in res.output


def test_short_side_and_flow_dtype_alone_take_effect(tmp_path, manifest):
    from data.store import Store

    res = _run("extract", manifest, "-o", tmp_path / "s.h5", "--method", "farneback", "--short-side", "20",
               "--flow-dtype", "float16", "--workers", "1")
    assert res.exit_code == 0, res.output
    with Store(tmp_path / "s.h5") as s:
        assert s.root_attrs["flow_codec"] == "float16"
        assert s.rgb("c0").shape[1:3] == (20, 25)  # 32 x 40 sources, short side 20, aspect kept


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "8"], "at least 16"),
        (["--fps", "10", "--frames", "8"], "either --fps or --frames"),
        (["--shard", "3/2"], "--shard"),
        (["--size", "32", "--short-side", "32"], "either --size or --short-side"),
        (["--flow-codec", "qwebp", "--flow-dtype", "uint8"], "--flow-dtype uint8 and --flow-codec qwebp disagree"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, manifest, extra, message):
    res = _run("extract", manifest, "-o", tmp_path / "s.h5", *extra)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output


def test_unknown_method_is_rejected(tmp_path, manifest):
    res = _run("extract", manifest, "-o", tmp_path / "s.h5", "--method", "lucas")
    assert res.exit_code == 2 and "Traceback" not in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(tmp_path, manifest):
    res = _run("extract", manifest, "-o", tmp_path / "s.h5", "--device", "cuda:0")
    assert res.exit_code == 2 and "no CUDA device" in res.output


def test_missing_manifest(tmp_path):
    res = _run("extract", tmp_path / "nope.csv", "-o", tmp_path / "s.h5")
    assert res.exit_code == 2 and "does not exist" in res.output


def test_manifest_without_needed_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("name,category\na.mp4,fight\n")
    res = _run("extract", bad, "-o", tmp_path / "s.h5")
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_output_in_missing_folder(tmp_path, manifest):
    res = _run("extract", manifest, "-o", tmp_path / "no" / "such" / "s.h5")
    assert res.exit_code == 2 and "does not exist" in res.output


def test_nothing_extracted_exits_1(tmp_path):
    write_manifest([ManifestRow("x", str(tmp_path / "missing.mp4"), 1, "x", "train")], tmp_path / "m.csv")
    res = _run("extract", tmp_path / "m.csv", "-o", tmp_path / "s.h5", "--workers", "1")
    assert res.exit_code == 1 and "nothing was extracted" in res.output


def test_info_reports_corruption(tmp_path, manifest):
    import h5py

    assert _run("extract", manifest, "-o", tmp_path / "s.h5", "--method", "farneback", "--size", "32", "--workers", "1").exit_code == 0
    with h5py.File(tmp_path / "s.h5", "a") as f:
        vid = next(iter(f["videos"]))
        del f["videos"][vid]["flow"]
    res = _run("info", tmp_path / "s.h5")
    assert res.exit_code == 1 and "corrupt" in res.output


def test_info_on_missing_store(tmp_path):
    res = _run("info", tmp_path / "none.h5")
    assert res.exit_code == 2 and "does not exist" in res.output


def _one_error_line(res) -> str:
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def _damage_header(path, name: str) -> None:
    """Zero the start of the object header of `name` (h5py: 'bad object header version number')."""
    import h5py

    with h5py.File(path, "r") as f:
        addr = h5py.h5o.get_info(f[name].id).addr
    with open(path, "r+b") as fh:
        fh.seek(addr)
        fh.write(b"\0" * 8)


def test_info_reports_a_damaged_video_header(tmp_path):
    from tests.data.test_store import write_videos

    store = tmp_path / "s.h5"
    write_videos(store, [0, 1, 2])
    _damage_header(store, "videos/v1")
    res = _run("info", store)
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "corrupt: v1: unreadable (bad object header version number)" in text
    assert "3 videos (1 unreadable)" in text
    assert _one_error_line(res) == f"error: 1 problem(s) found in {store}"


def test_info_reports_a_damaged_video_list(tmp_path):
    from tests.data.test_store import write_videos

    store = tmp_path / "s.h5"
    write_videos(store, [0, 1])
    _damage_header(store, "videos")
    res = _run("info", store)
    assert res.exit_code == 1, res.output
    assert "cannot list its videos" in " ".join(res.output.split())  # rich wraps long lines
    _one_error_line(res)


def test_merge_into_an_existing_file_says_what_to_do(tmp_path):
    from tests.data.test_store import write_videos

    shard, existing = tmp_path / "a.h5", tmp_path / "b.h5"
    write_videos(shard, [0])
    existing.write_bytes(b"keep me")
    res = _run("merge", shard, "-o", existing)
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert "already exists" in line and "choose another output path or delete" in line
    assert "overwrite" not in line
    assert existing.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "code, reason",
    [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "no space left on device"),
     (errno.EDQUOT, "disk quota exceeded")],
)
def test_disk_refusing_writes_is_one_line(tmp_path, monkeypatch, code, reason):
    import data.shards
    from tests.data.test_store import write_videos

    shard = tmp_path / "a.h5"
    write_videos(shard, [0])
    target = tmp_path / "all.h5"

    def refuse(inputs, output, **kwargs):
        raise OSError(code, os.strerror(code), str(output))

    monkeypatch.setattr(data.shards, "merge", refuse)
    res = _run("merge", shard, "-o", target)
    assert res.exit_code == 2
    assert _one_error_line(res) == f"error: cannot write {target}: {reason}"
