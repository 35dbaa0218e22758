"""`index` and `synth`: user mistakes end in one line and exit 2, and the user's files stay as they were."""

import errno
import os

import pytest
from typer.testing import CliRunner

from cli.app import app
from cli.errors import write_error

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


@pytest.fixture()
def source_csv(tmp_path):
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"not really a video")
    path = tmp_path / "videos.csv"
    path.write_text("path,label,group\na.mp4,1,r0\nb.mp4,0,r1\n")
    return path


def test_index_writes_a_manifest(tmp_path, source_csv):
    res = _run("index", source_csv, "-o", tmp_path / "m.csv")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.csv").read_text().startswith("video_id,path,label,group,split")


@pytest.mark.parametrize("spelling", ["same", "dotted", "link"])
def test_index_refuses_to_overwrite_its_input(tmp_path, source_csv, spelling):
    before = source_csv.read_bytes()
    output = {"same": source_csv, "dotted": tmp_path / "." / source_csv.name, "link": tmp_path / "link.csv"}[spelling]
    if spelling == "link":
        output.symlink_to(source_csv)
    line = _one_error_line(_run("index", source_csv, "-o", output))
    assert "is the input CSV" in line and "choose another output path" in line
    assert source_csv.read_bytes() == before


def test_index_refuses_to_overwrite_the_groups_file(tmp_path, source_csv):
    groups = tmp_path / "groups.csv"
    groups.write_text("video,group\na.mp4,r9\n")
    before = groups.read_bytes()
    line = _one_error_line(_run("index", source_csv, "--groups", groups, "-o", groups))
    assert "--groups file" in line
    assert groups.read_bytes() == before


@pytest.mark.parametrize("command", [["index", "SRC", "-o", "OUT"], ["synth", "OUT", "--videos", "2"]])
def test_negative_seed_names_the_option(tmp_path, source_csv, command):
    args = [source_csv if a == "SRC" else tmp_path / "out" if a == "OUT" else a for a in command]
    line = _one_error_line(_run(*args, "--seed", "-5"))
    assert line == "error: --seed must be a non-negative integer, got -5"
    assert not (tmp_path / "out").exists()


def test_synth_into_a_non_empty_folder_says_what_to_do(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    line = _one_error_line(_run("synth", folder, "--videos", "2"))
    assert "is not empty" in line and "choose a new or empty folder" in line and "overwrite" not in line
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "code, reason",
    [(errno.EROFS, "read-only file system"), (errno.ENOSPC, "no space left on device"),
     (errno.EDQUOT, "disk quota exceeded")],
)
def test_disk_refusing_the_manifest_is_one_line(tmp_path, source_csv, monkeypatch, code, reason):
    import data.manifest

    out = tmp_path / "m.csv"

    def refuse(rows, path):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(data.manifest, "write_manifest", refuse)
    assert _one_error_line(_run("index", source_csv, "-o", out)) == f"error: cannot write {out}: {reason}"


def test_write_error_messages():
    assert write_error(OSError(errno.ENOSPC, "No space left on device")) == "cannot write: no space left on device"
    assert write_error(OSError(errno.EROFS, "", "/mnt/x")) == "cannot write /mnt/x: read-only file system"
    assert write_error(OSError(errno.EIO, "Input/output error", "/mnt/x")) is None  # not a user error
    assert write_error(ValueError("x")) is None


def test_other_os_errors_keep_their_traceback(tmp_path, source_csv, monkeypatch):
    import data.manifest

    def broken(rows, path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(data.manifest, "write_manifest", broken)
    res = _run("index", source_csv, "-o", tmp_path / "m.csv")
    assert res.exit_code == 1 and isinstance(res.exception, OSError)


def test_index_into_a_folder_says_to_name_the_file(tmp_path, source_csv):
    (tmp_path / "out").mkdir()
    line = _one_error_line(_run("index", source_csv, "-o", tmp_path / "out"))
    assert "is a folder; give the manifest's file name" in line and "manifest.csv" in line


def test_index_with_a_folder_as_groups_file(tmp_path, source_csv):
    (tmp_path / "groups").mkdir()
    line = _one_error_line(_run("index", source_csv, "-o", tmp_path / "m.csv", "--groups", tmp_path / "groups"))
    assert "is a folder, not a CSV" in line
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.parametrize("which", ["source", "manifest"])
def test_a_csv_that_is_not_utf8_names_the_file(tmp_path, source_csv, which):
    bad = b"path,label,group\n\xe9t\xe9.mp4,1,r0\n".replace(b"\n", b"\r\n")  # Latin-1 text
    if which == "source":
        source_csv.write_bytes(bad)
        line = _one_error_line(_run("index", source_csv, "-o", tmp_path / "m.csv"))
        named = source_csv
    else:
        named = tmp_path / "m.csv"
        named.write_bytes(b"video_id,path,label\n\xe9,a.mp4,1\n")
        line = _one_error_line(_run("extract", named, "-o", tmp_path / "s.h5"))
    assert f"{named} is not UTF-8 text" in line
