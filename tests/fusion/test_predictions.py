import csv
import os

import numpy as np
import pytest
from scipy.special import expit

from fusion.predictions import (
    Predictions,
    align,
    align_all,
    average_views,
    load_split,
    read_predictions,
    split_paths,
    write_atomic,
    write_embeddings,
    write_predictions,
)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class TestPredictionsRecord:
    def test_sorted_on_construction(self):
        p = Predictions(["c", "a", "b"], [1, 0, 1], [3.0, 1.0, 2.0], np.arange(6.0).reshape(3, 2))
        assert p.video_ids.tolist() == ["a", "b", "c"]
        assert p.labels.tolist() == [0, 1, 1]
        assert p.logits.tolist() == [1.0, 2.0, 3.0]
        assert p.embeddings.tolist() == [[2, 3], [4, 5], [0, 1]]
        np.testing.assert_allclose(p.probabilities, expit([1.0, 2.0, 3.0]))

    @pytest.mark.parametrize(
        "ids, labels, logits, match",
        [
            (["a", "b"], [1], [0.0, 1.0], "one label"),
            (["a", "b"], [1, 2], [0.0, 1.0], "labels must be"),
            (["a", "b"], [1, 0], [0.0, np.nan], "finite"),
            (["a", "a"], [1, 1], [0.0, 1.0], "more than once"),
        ],
    )
    def test_bad_inputs(self, ids, labels, logits, match):
        with pytest.raises(ValueError, match=match):
            Predictions(ids, labels, logits)

    def test_take(self):
        p = Predictions(["a", "b", "c"], [0, 1, 1], [1.0, 2.0, 3.0])
        q = p.take(np.array([False, True, True]))
        assert q.video_ids.tolist() == ["b", "c"] and q.logits.tolist() == [2.0, 3.0]


class TestCsvRoundTrip:
    def test_round_trip_exact_and_sorted(self, tmp_path):
        rng = np.random.default_rng(0)
        ids = [f"vid_{i:03d}" for i in rng.permutation(20)]
        labels = rng.integers(0, 2, 20)
        logits = rng.normal(0, 3, 20)
        path = write_predictions(tmp_path / "predictions_val.csv", ids, labels, logits)
        rows = _rows(path)
        assert list(rows[0]) == ["video_id", "label", "logit", "probability"]
        assert rows[0]["video_id"] == ids[0]  # written in the given order
        np.testing.assert_allclose(float(rows[0]["probability"]), expit(logits[0]))
        p = read_predictions(path)
        order = np.argsort(ids)
        assert p.video_ids.tolist() == sorted(ids)
        assert p.labels.tolist() == labels[order].tolist()
        assert np.array_equal(p.logits, logits[order])  # bit-exact
        assert not list(tmp_path.glob(".*tmp"))

    def test_views_average_logits_not_probabilities(self, tmp_path):
        path = write_predictions(
            tmp_path / "p.csv",
            ["b", "a", "a", "b"],
            [0, 1, 1, 0],
            [-1.0, 4.0, -2.0, 3.0],
            views=[0, 0, 1, 1],
        )
        assert "view" in _rows(path)[0]
        p = read_predictions(path)
        assert p.video_ids.tolist() == ["a", "b"]
        np.testing.assert_allclose(p.logits, [1.0, 1.0])
        np.testing.assert_allclose(p.probabilities, expit([1.0, 1.0]))
        assert not np.isclose(p.probabilities[0], np.mean(expit([4.0, -2.0])))

    def test_average_views_with_embeddings(self):
        ids, labels, logits, emb = average_views(
            np.array(["x", "y", "x"]),
            np.array([1, 0, 1]),
            np.array([1.0, 5.0, 3.0]),
            np.array([[0.0, 2.0], [9.0, 9.0], [2.0, 4.0]], np.float32),
        )
        assert ids.tolist() == ["x", "y"] and labels.tolist() == [1, 0]
        assert logits.tolist() == [2.0, 5.0]
        assert emb.tolist() == [[1.0, 3.0], [9.0, 9.0]] and emb.dtype == np.float32

    def test_views_with_conflicting_labels(self, tmp_path):
        path = write_predictions(tmp_path / "p.csv", ["a", "a"], [1, 0], [1.0, 2.0], views=[0, 1])
        with pytest.raises(ValueError, match="different labels"):
            read_predictions(path)

    def test_repeated_ids_without_views(self, tmp_path):
        path = write_predictions(tmp_path / "p.csv", ["a", "a"], [1, 1], [1.0, 2.0])
        with pytest.raises(ValueError, match="more than once"):
            read_predictions(path)

    def test_embeddings_follow_csv_rows(self, tmp_path):
        csv_path, npy_path = split_paths(tmp_path / "rgb", "val")
        assert csv_path.name == "predictions_val.csv" and npy_path.name == "embeddings_val.npy"
        write_predictions(csv_path, ["b", "a", "b"], [1, 0, 1], [0.0, 1.0, 2.0], views=[0, 0, 1])
        write_embeddings(npy_path, np.array([[1.0, 1.0], [5.0, 6.0], [3.0, 3.0]]))
        p = load_split(tmp_path / "rgb", "val", embeddings=True)
        assert p.video_ids.tolist() == ["a", "b"]
        assert p.embeddings.tolist() == [[5.0, 6.0], [2.0, 2.0]]
        assert load_split(tmp_path / "rgb", "val").embeddings is None

    def test_embeddings_row_mismatch(self, tmp_path):
        csv_path, npy_path = split_paths(tmp_path, "test")
        write_predictions(csv_path, ["a", "b"], [1, 0], [0.0, 1.0])
        write_embeddings(npy_path, np.zeros((3, 4)))
        with pytest.raises(ValueError, match="expected 2 rows"):
            read_predictions(csv_path, npy_path)

    def test_probability_only_file(self, tmp_path):
        path = tmp_path / "p.csv"
        path.write_text("video_id,label,probability\na,1,0.8\nb,0,0.25\n")
        p = read_predictions(path)
        np.testing.assert_allclose(p.probabilities, [0.8, 0.25])

    @pytest.mark.parametrize(
        "text, match",
        [
            ("video,label,logit\na,1,0.5\n", "expected columns"),
            ("video_id,label,logit\na,yes,0.5\n", r"p.csv:2: label"),
            ("video_id,label,logit\na,1,0.5\nb,3,0.1\n", "labels must be"),
        ],
    )
    def test_malformed_files(self, tmp_path, text, match):
        path = tmp_path / "p.csv"
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_predictions(path)

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="predictions file not found"):
            read_predictions(tmp_path / "nope.csv")
        with pytest.raises(FileNotFoundError):
            load_split(tmp_path, "val")

    def test_write_rejects_bad_labels(self, tmp_path):
        with pytest.raises(ValueError, match="labels"):
            write_predictions(tmp_path / "p.csv", ["a"], [2], [0.0])
        assert not (tmp_path / "p.csv").exists()


class TestAtomicWrite:
    def test_failed_replace_keeps_old_file(self, tmp_path, monkeypatch):
        target = tmp_path / "f.txt"
        write_atomic(target, "old")

        def boom(*_):
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", boom)
        with pytest.raises(OSError):
            write_atomic(target, "new")
        assert target.read_text() == "old"
        assert [f.name for f in tmp_path.iterdir()] == ["f.txt"]


class TestAlign:
    def test_intersection_in_one_order(self, caplog):
        a = Predictions(["a", "b", "c"], [1, 0, 1], [1.0, 2.0, 3.0])
        b = Predictions(["d", "c", "b"], [0, 1, 0], [9.0, 8.0, 7.0])
        a2, b2 = align(a, b)
        assert a2.video_ids.tolist() == b2.video_ids.tolist() == ["b", "c"]
        assert a2.logits.tolist() == [2.0, 3.0] and b2.logits.tolist() == [7.0, 8.0]
        assert "dropped" in caplog.text

    def test_nothing_matches(self):
        with pytest.raises(ValueError, match="no video_id is shared"):
            align(Predictions(["a"], [1], [0.0]), Predictions(["b"], [1], [0.0]))

    def test_labels_disagree(self):
        with pytest.raises(ValueError, match="labels disagree.*'b'"):
            align(
                Predictions(["a", "b"], [1, 0], [0.0, 0.0]),
                Predictions(["a", "b"], [1, 1], [0.0, 0.0]),
            )

    def test_align_all_three(self):
        out = align_all(
            {
                "x": Predictions(["a", "b", "c"], [1, 0, 1], [0.0, 0.0, 0.0]),
                "y": Predictions(["b", "c"], [0, 1], [0.0, 0.0]),
                "z": Predictions(["c", "b", "a"], [1, 0, 1], [0.0, 0.0, 0.0]),
            }
        )
        assert [p.video_ids.tolist() for p in out.values()] == [["b", "c"]] * 3
