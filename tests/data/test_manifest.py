import os

import pytest

from data.manifest import (
    ManifestRow,
    MissingPathError,
    parse_label,
    parse_split,
    read_manifest,
    summarize,
    video_id_for,
    write_manifest,
)


def _rows(folder, n_violent=2, n_calm=3):
    rows = []
    for i in range(n_violent):
        path = str(folder / "Fight" / f"f{i}.mp4")
        rows.append(ManifestRow(f"Fight__f{i}", path, 1, f"rec{i}", "train"))
    for i in range(n_calm):
        path = str(folder / "NonFight" / f"n{i}.avi")
        rows.append(ManifestRow(f"NonFight__n{i}", path, 0, f"rec{i}", "" if i else "test"))
    return rows


class TestVideoId:
    @pytest.mark.parametrize(
        "relpath, expected",
        [
            ("Fight/fi001.avi", "Fight__fi001"),
            ("fi1_xvid.avi", "fi1_xvid"),
            ("train/NonFight/a.b.mp4", "train__NonFight__a.b"),
            ("./videos//x.MKV", "videos__x"),
            ("a\\b\\c.mp4", "a__b__c"),
            ("noext", "noext"),
        ],
    )
    def test_known_ids(self, relpath, expected):
        assert video_id_for(relpath) == expected

    def test_distinct_paths_distinct_ids(self):
        paths = ["Fight/1.avi", "NonFight/1.avi", "train/Fight/1.avi", "val/Fight/1.avi"]
        ids = [video_id_for(p) for p in paths]
        assert len(set(ids)) == len(ids)
        assert not any("/" in i for i in ids)

    def test_empty_path_raises(self):
        with pytest.raises(ValueError, match="empty path"):
            video_id_for("./")


class TestParsing:
    @pytest.mark.parametrize(
        "cell, label",
        [
            ("1", 1), ("0", 0), ("violent", 1), ("non-violent", 0), ("Violence", 1),
            ("non_violence", 0), ("fight", 1), ("nofight", 0), ("NonFight", 0),
            ("true", 1), ("False", 0), (" 1 ", 1),
        ],
    )  # fmt: skip
    def test_label_spellings(self, cell, label):
        assert parse_label(cell) == label

    @pytest.mark.parametrize("cell", ["2", "maybe", "", "violentish"])
    def test_bad_label(self, cell):
        with pytest.raises(ValueError, match="bad label"):
            parse_label(cell)

    @pytest.mark.parametrize(
        "cell, split",
        [("", ""), ("train", "train"), ("Validation", "val"), ("valid", "val"), ("TEST", "test")],
    )
    def test_split_spellings(self, cell, split):
        assert parse_split(cell) == split

    def test_bad_split(self):
        with pytest.raises(ValueError, match="bad split"):
            parse_split("holdout")


class TestRoundTrip:
    def test_write_then_read_gives_same_rows(self, tmp_path):
        rows = _rows(tmp_path)
        write_manifest(rows, tmp_path / "manifest.csv")
        assert read_manifest(tmp_path / "manifest.csv") == rows

    def test_paths_under_the_folder_are_written_relative(self, tmp_path):
        rows = _rows(tmp_path)
        write_manifest(rows, tmp_path / "manifest.csv")
        text = (tmp_path / "manifest.csv").read_text()
        assert text.splitlines()[0] == "video_id,path,label,group,split"
        assert "Fight__f0,Fight/f0.mp4,1,rec0,train" in text
        assert str(tmp_path) not in text

    def test_folder_moves_with_its_manifest(self, tmp_path):
        old, new = tmp_path / "old", tmp_path / "new"
        old.mkdir()
        write_manifest(_rows(old), old / "m.csv")
        os.rename(old, new)
        rows = read_manifest(new / "m.csv")
        assert rows == _rows(new)

    def test_paths_elsewhere_stay_absolute(self, tmp_path):
        (tmp_path / "out").mkdir()
        rows = _rows(tmp_path / "data")
        write_manifest(rows, tmp_path / "out" / "m.csv")
        text = (tmp_path / "out" / "m.csv").read_text()
        assert str(tmp_path / "data" / "Fight" / "f0.mp4") in text
        assert read_manifest(tmp_path / "out" / "m.csv") == rows

    def test_relative_paths_resolve_against_the_manifest_folder(self, tmp_path, monkeypatch):
        sub = tmp_path / "sub"
        sub.mkdir()
        (sub / "m.csv").write_text("video_id,path,label,group,split\nv,../clips/v.mp4,1,g,\n")
        monkeypatch.chdir(tmp_path)  # the reader must not resolve against the working dir
        (row,) = read_manifest("sub/m.csv")
        assert row.path == str(tmp_path / "clips" / "v.mp4")
        assert os.path.isabs(row.path)


class TestWriteErrors:
    def test_missing_output_folder_is_named(self, tmp_path):
        target = tmp_path / "nope" / "m.csv"
        with pytest.raises(ValueError, match="nope"):
            write_manifest(_rows(tmp_path), target)

    def test_failed_write_leaves_old_file_and_no_temp(self, tmp_path):
        target = tmp_path / "m.csv"
        write_manifest(_rows(tmp_path), target)
        before = target.read_text()
        bad = _rows(tmp_path) + [ManifestRow("Fight__f0", "x.mp4", 1, "g", "")]
        with pytest.raises(ValueError, match="duplicate video_id 'Fight__f0'"):
            write_manifest(bad, target)
        assert target.read_text() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]

    def test_crash_mid_write_keeps_old_file(self, tmp_path):
        target = tmp_path / "m.csv"
        write_manifest(_rows(tmp_path), target)
        before = target.read_text()
        broken = _rows(tmp_path, n_violent=1) + [ManifestRow("z", None, 1, "g")]  # fails mid-file
        with pytest.raises(TypeError):
            write_manifest(broken, target)
        assert target.read_text() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]

    @pytest.mark.parametrize(
        "row, message",
        [
            (ManifestRow("a/b", "x.mp4", 1, "g"), "bad video_id"),
            (ManifestRow("a", "x.mp4", 2, "g"), "label must be 0 or 1"),
            (ManifestRow("a", "x.mp4", 1, "g", "holdout"), "bad split"),
        ],
    )
    def test_invalid_rows_are_refused(self, tmp_path, row, message):
        with pytest.raises(ValueError, match=message):
            write_manifest([row], tmp_path / "m.csv")
        assert not (tmp_path / "m.csv").exists()


class TestReadErrors:
    def test_missing_file(self, tmp_path):
        with pytest.raises(ValueError, match="does not exist"):
            read_manifest(tmp_path / "absent.csv")
        with pytest.raises(FileNotFoundError):
            read_manifest(tmp_path / "absent.csv")
        assert issubclass(MissingPathError, ValueError)

    @pytest.mark.parametrize(
        "header, missing",
        [
            ("path,label,group,split", "video_id"),
            ("video_id,label", "path"),
            ("video_id,path", "label"),
            ("id,file,class", "video_id, path, label"),
        ],
    )
    def test_missing_columns_are_named(self, tmp_path, header, missing):
        (tmp_path / "m.csv").write_text(header + "\n")
        with pytest.raises(ValueError, match=f"lacks column\\(s\\) {missing}"):
            read_manifest(tmp_path / "m.csv")

    def test_empty_file(self, tmp_path):
        (tmp_path / "m.csv").write_text("")
        with pytest.raises(ValueError, match="empty"):
            read_manifest(tmp_path / "m.csv")

    def test_bad_label_names_the_line(self, tmp_path):
        (tmp_path / "m.csv").write_text("video_id,path,label\na,a.mp4,1\nb,b.mp4,sometimes\n")
        with pytest.raises(ValueError, match=r"m\.csv:3: bad label 'sometimes'"):
            read_manifest(tmp_path / "m.csv")

    def test_duplicate_ids_name_both_lines(self, tmp_path):
        text = "video_id,path,label\na,a.mp4,1\nb,b.mp4,0\na,c.mp4,0\n"
        (tmp_path / "m.csv").write_text(text)
        with pytest.raises(ValueError, match=r"duplicate video_id 'a' \(lines 2 and 4\)"):
            read_manifest(tmp_path / "m.csv")

    def test_group_and_split_columns_are_optional(self, tmp_path):
        (tmp_path / "m.csv").write_text("\ufeffvideo_id,path,label\nv1,v1.mp4,violent\n")
        (row,) = read_manifest(tmp_path / "m.csv")
        assert (row.video_id, row.label, row.group, row.split) == ("v1", 1, "v1", "")


class TestSummarize:
    def test_counts_per_class_and_split(self, tmp_path):
        summary = summarize(_rows(tmp_path, n_violent=2, n_calm=3))
        assert summary["videos"] == 5
        assert summary["groups"] == 3  # rec0..rec2 shared across classes
        assert (summary["violent"], summary["non_violent"]) == (2, 3)
        assert summary["imbalance_ratio"] == pytest.approx(1.5)
        assert list(summary["splits"]) == ["train", "test", "unassigned"]
        assert summary["splits"]["train"] == {
            "videos": 2, "groups": 2, "violent": 2, "non_violent": 0,
        }  # fmt: skip
        assert summary["splits"]["unassigned"]["non_violent"] == 2

    def test_single_class_has_no_ratio(self, tmp_path):
        assert summarize(_rows(tmp_path, n_violent=0))["imbalance_ratio"] is None
