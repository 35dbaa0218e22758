import logging

import pytest

from data.layouts import LAYOUTS, detect_layout, index_dataset
from data.manifest import read_manifest, write_manifest


def make(root, *relpaths):
    """Tiny fake files; layout detection only looks at names."""
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x00fake")
    return root


def ids_labels(rows):
    return [(r.video_id, r.label) for r in rows]


class TestFolderPerClass:
    @pytest.mark.parametrize(
        "violent, calm",
        [
            ("Fight", "NonFight"),
            ("fight", "noFight"),
            ("Violence", "NonViolence"),
            ("violent", "non-violent"),
            ("violence", "non_violence"),
            ("FIGHTS", "No Fights"),
            ("Violence", "Non Violence"),
        ],
    )
    def test_class_names(self, tmp_path, violent, calm):
        make(tmp_path, f"{violent}/b.mp4", f"{violent}/a.avi", f"{calm}/c.mkv")
        assert detect_layout(tmp_path) == "folder-per-class"
        rows = index_dataset(tmp_path)
        expected = [(f"{violent}__a", 1), (f"{violent}__b", 1), (f"{calm}__c", 0)]
        assert ids_labels(rows) == sorted(expected)  # sorted by path
        assert all(r.split == "" and r.group == r.video_id for r in rows)
        by_id = {r.video_id: r.path for r in rows}
        assert by_id[f"{violent}__a"] == str(tmp_path / violent / "a.avi")

    @pytest.mark.parametrize("wrap", ["videos", "data/Real Life Violence Dataset"])
    def test_nested_below_dir(self, tmp_path, wrap):
        make(tmp_path, f"{wrap}/Violence/v1.mp4", f"{wrap}/NonViolence/n1.mp4")
        assert detect_layout(tmp_path) == "folder-per-class"
        rows = index_dataset(tmp_path)
        # ids are relative to the layout's root, so indexing DIR or DIR/<wrap> agree
        assert ids_labels(rows) == [("NonViolence__n1", 0), ("Violence__v1", 1)]
        assert index_dataset(tmp_path / wrap) == rows

    def test_videos_deeper_in_class_folders_and_other_files(self, tmp_path):
        make(
            tmp_path,
            "Fight/cam1/x.MP4", "Fight/y.WebM", "Fight/notes.txt", "Fight/._y.WebM",
            "NonFight/z.mpeg", "NonFight/thumb.jpg", "NonFight/w.m4v", "NonFight/q.MOV",
            "NonFight/r.mpg", "__MACOSX/Fight/._x.mp4", "readme.md",
        )  # fmt: skip
        rows = index_dataset(tmp_path)
        assert ids_labels(rows) == [
            ("Fight__cam1__x", 1), ("Fight__y", 1),
            ("NonFight__q", 0), ("NonFight__r", 0), ("NonFight__w", 0), ("NonFight__z", 0),
        ]  # fmt: skip


class TestRwf2000:
    def test_top_folder_gives_split(self, tmp_path):
        make(
            tmp_path,
            "train/Fight/a.avi", "train/NonFight/b.avi", "val/Fight/c.avi", "val/NonFight/d.avi",
        )  # fmt: skip
        assert detect_layout(tmp_path) == "rwf-2000"
        rows = index_dataset(tmp_path)
        assert [(r.video_id, r.label, r.split) for r in rows] == [
            ("train__Fight__a", 1, "train"),
            ("train__NonFight__b", 0, "train"),
            ("val__Fight__c", 1, "val"),
            ("val__NonFight__d", 0, "val"),
        ]

    def test_same_file_name_in_both_splits_stays_unique(self, tmp_path):
        make(tmp_path, "RWF-2000/train/Fight/1.avi", "RWF-2000/train/NonFight/1.avi",
             "RWF-2000/val/Fight/1.avi", "RWF-2000/val/NonFight/1.avi")  # fmt: skip
        rows = index_dataset(tmp_path)
        assert len({r.video_id for r in rows}) == 4
        assert {r.split for r in rows} == {"train", "val"}


class TestHockey:
    def test_prefix_gives_label(self, tmp_path):
        make(tmp_path, "fi1_xvid.avi", "fi10_xvid.avi", "no2_xvid.avi", "list.txt")
        assert detect_layout(tmp_path) == "hockey"
        assert ids_labels(index_dataset(tmp_path)) == [
            ("fi10_xvid", 1), ("fi1_xvid", 1), ("no2_xvid", 0),
        ]  # fmt: skip

    def test_words_that_start_with_fi_or_no_are_not_hockey(self, tmp_path):
        make(tmp_path, "fi1_xvid.avi", "no1_xvid.avi", "final.avi")
        with pytest.raises(ValueError, match="no dataset layout recognised"):
            index_dataset(tmp_path)


class TestCsvSource:
    def test_relative_paths_label_spellings_groups_splits(self, tmp_path):
        make(tmp_path, "clips/a.mp4", "clips/b.mp4", "clips/c.mp4", "clips/d.mp4")
        (tmp_path / "lists").mkdir()
        (tmp_path / "lists" / "set.csv").write_text(
            "path,label,group,split,comment\n"
            "../clips/b.mp4,non-violent,g1,train,x\n"
            "../clips/a.mp4,violent,g1,Validation,\n"
            "../clips/c.mp4,TRUE,,,\n"
            "../clips/d.mp4,nofight,g2,test,\n"
        )
        assert detect_layout(tmp_path / "lists" / "set.csv") == "csv"
        rows = index_dataset(tmp_path / "lists" / "set.csv")
        assert [(r.label, r.group, r.split) for r in rows] == [
            (1, "g1", "val"), (0, "g1", "train"), (1, rows[2].video_id, ""), (0, "g2", "test"),
        ]  # fmt: skip
        assert [r.path for r in rows] == [str(tmp_path / "clips" / f"{n}.mp4") for n in "abcd"]
        assert all("/" not in r.video_id for r in rows)

    def test_manifest_is_a_valid_source(self, tmp_path):
        make(tmp_path, "Fight/a.mp4", "NonFight/b.mp4")
        rows = index_dataset(tmp_path)
        write_manifest(rows, tmp_path / "manifest.csv")
        assert (
            index_dataset(tmp_path / "manifest.csv")
            == rows
            == read_manifest(tmp_path / "manifest.csv")
        )

    @pytest.mark.parametrize(
        "text, message",
        [
            ("file,label\nx.mp4,1\n", "lacks column\\(s\\) path"),
            ("path,class\nx.mp4,1\n", "lacks column\\(s\\) label"),
            ("path,label\nx.mp4,perhaps\n", r"set\.csv:2: bad label"),
            ("path,label\n", "lists no videos"),
            ("path,label\nx.mp4,1\nmissing.mp4,0\n", "1 listed video\\(s\\) do not exist"),
            ("path,label,split\nx.mp4,1,holdout\n", "bad split"),
        ],
    )
    def test_errors(self, tmp_path, text, message):
        make(tmp_path, "x.mp4")
        (tmp_path / "set.csv").write_text(text)
        with pytest.raises(ValueError, match=message):
            index_dataset(tmp_path / "set.csv")

    def test_other_files_are_refused(self, tmp_path):
        make(tmp_path, "x.mp4")
        with pytest.raises(ValueError, match="not a CSV"):
            index_dataset(tmp_path / "x.mp4")


class TestGroupsFile:
    @pytest.fixture
    def dataset(self, tmp_path):
        return make(tmp_path / "ds", "Fight/a.mp4", "Fight/b.mp4", "NonFight/c.mp4",
                    "NonFight/d.mp4")  # fmt: skip

    def test_paths_names_and_ids_all_match(self, tmp_path, dataset):
        groups = tmp_path / "groups.csv"
        groups.write_text(
            "video,group\nFight/a.mp4,cam1\nb.mp4,cam1\nNonFight__c,cam2\n"
            f"{dataset / 'NonFight' / 'd.mp4'},cam2\n"
        )
        rows = index_dataset(dataset, groups_file=groups)
        assert [r.group for r in rows] == ["cam1", "cam1", "cam2", "cam2"]

    def test_unlisted_videos_keep_their_own_group(self, tmp_path, dataset, caplog):
        groups = tmp_path / "groups.csv"
        groups.write_text("video,group\na.mp4,cam1\nzzz.mp4,cam9\n")
        with caplog.at_level(logging.WARNING):
            rows = index_dataset(dataset, groups_file=groups)
        assert [r.group for r in rows] == ["cam1", "Fight__b", "NonFight__c", "NonFight__d"]
        assert "1 entries match no video" in caplog.text

    @pytest.mark.parametrize(
        "text, message",
        [
            ("name,cluster\na.mp4,g\n", "needs columns video,group"),
            ("video,group\nnothing.mp4,g\n", "matches none of the 4 videos"),
            ("video,group\na.mp4,g1\nFight/a.mp4,g2\n", "two groups"),
            ("video,group\na.mp4,\n", "empty group"),
        ],
    )
    def test_errors(self, tmp_path, dataset, text, message):
        (tmp_path / "groups.csv").write_text(text)
        with pytest.raises(ValueError, match=message):
            index_dataset(dataset, groups_file=tmp_path / "groups.csv")

    def test_ambiguous_file_name(self, tmp_path):
        make(tmp_path / "ds", "Fight/1.mp4", "NonFight/1.mp4")
        (tmp_path / "groups.csv").write_text("video,group\n1.mp4,g\n")
        with pytest.raises(ValueError, match="matches several videos"):
            index_dataset(tmp_path / "ds", groups_file=tmp_path / "groups.csv")

    def test_missing_groups_file(self, tmp_path, dataset):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            index_dataset(dataset, groups_file=tmp_path / "nope.csv")


class TestErrorsAndOrder:
    def test_unknown_layout_lists_recognised_ones(self, tmp_path):
        make(tmp_path, "cats/a.mp4", "dogs/b.mp4")
        with pytest.raises(ValueError) as err:
            index_dataset(tmp_path)
        message = str(err.value)
        assert "no dataset layout recognised" in message and "cats/" in message
        assert all(name in message for name in LAYOUTS)
        assert "\n" not in message

    def test_single_class_folder_is_not_a_layout(self, tmp_path):
        make(tmp_path, "Fight/a.mp4")
        with pytest.raises(ValueError, match="no dataset layout recognised"):
            detect_layout(tmp_path)

    def test_empty_dir(self, tmp_path):
        with pytest.raises(ValueError, match="is empty"):
            index_dataset(tmp_path)

    def test_class_folders_without_videos(self, tmp_path):
        make(tmp_path, "Fight/readme.txt", "NonFight/readme.txt")
        with pytest.raises(ValueError, match="hold no video files"):
            index_dataset(tmp_path)

    def test_missing_source(self, tmp_path):
        with pytest.raises(ValueError, match="does not exist"):
            index_dataset(tmp_path / "absent")

    def test_two_datasets_side_by_side(self, tmp_path):
        make(tmp_path, "a/Fight/1.mp4", "a/NonFight/2.mp4", "b/fi1.avi", "b/no1.avi")
        with pytest.raises(ValueError, match="several datasets: a \\(folder-per-class\\), b"):
            index_dataset(tmp_path)

    def test_ids_differing_only_by_extension(self, tmp_path):
        make(tmp_path, "Fight/a.mp4", "Fight/a.avi", "NonFight/b.mp4")
        with pytest.raises(ValueError, match="same video id 'Fight__a'"):
            index_dataset(tmp_path)

    def test_order_is_sorted_whatever_the_creation_order(self, tmp_path):
        names = ["Fight/z.mp4", "NonFight/m.mp4", "Fight/a.mp4", "NonFight/b.mp4"]
        make(tmp_path / "one", *names)
        make(tmp_path / "two", *reversed(names))
        one = [r.video_id for r in index_dataset(tmp_path / "one")]
        assert one == sorted(one)
        assert one == [r.video_id for r in index_dataset(tmp_path / "two")]
