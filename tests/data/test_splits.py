import logging

import numpy as np
import pytest

from data.manifest import ManifestRow
from data.splits import assign_splits, fold_split, group_kfold


def grouped_data(seed, n_groups=40, positive=0.3):
    """Groups of 1-7 clips, each group mostly one class (as recordings are)."""
    rs = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_groups), rs.integers(1, 8, n_groups))
    group_label = rs.random(n_groups) < positive
    flip = rs.random(len(groups)) < 0.1
    labels = np.where(flip, ~group_label[groups], group_label[groups]).astype(int)
    return labels, np.array([f"rec{g:03d}" for g in groups])


def as_rows(labels, groups, splits=None):
    splits = [""] * len(labels) if splits is None else splits
    return [
        ManifestRow(f"v{i:04d}", f"/d/v{i:04d}.mp4", int(y), str(g), s)
        for i, (y, g, s) in enumerate(zip(labels, groups, splits, strict=True))
    ]


def groups_per_part(rows):
    parts = {}
    for r in rows:
        parts.setdefault(r.group, set()).add(r.split)
    return parts


class TestGroupKFold:
    @pytest.mark.parametrize("seed", range(30))
    @pytest.mark.parametrize("k", [2, 3, 5])
    def test_no_group_in_two_folds_and_no_empty_fold(self, seed, k):
        labels, groups = grouped_data(seed)
        folds = group_kfold(labels, groups, k, seed=seed)
        assert folds.shape == labels.shape and folds.dtype == np.int64
        for g in np.unique(groups):
            assert len(np.unique(folds[groups == g])) == 1, g
        assert sorted(np.unique(folds)) == list(range(k))
        for i in range(k):  # every class spans >= k groups here, so every fold gets both
            assert set(labels[folds == i]) == {0, 1}

    @pytest.mark.parametrize("seed", range(10))
    def test_class_rate_per_fold_close_to_overall(self, seed):
        labels, groups = grouped_data(seed + 100)
        folds = group_kfold(labels, groups, 4, seed=seed)
        rate = labels.mean()
        for i in range(4):
            assert abs(labels[folds == i].mean() - rate) < 0.08
            assert abs((folds == i).mean() - 0.25) < 0.08

    @pytest.mark.parametrize("k", [2, 3, 5, 7])
    def test_singletons_split_exactly(self, k):
        labels = (np.arange(100) < 30).astype(int)
        folds = group_kfold(labels, np.arange(100), k, seed=3)
        positives = [int(labels[folds == i].sum()) for i in range(k)]
        sizes = [int((folds == i).sum()) for i in range(k)]
        assert max(positives) - min(positives) <= 1
        assert max(sizes) - min(sizes) <= 1

    def test_deterministic_by_seed(self):
        labels, groups = grouped_data(7)
        first = group_kfold(labels, groups, 5, seed=11)
        np.testing.assert_array_equal(first, group_kfold(labels, groups, 5, seed=11))
        others = [group_kfold(labels, groups, 5, seed=s) for s in range(5)]
        assert any(not np.array_equal(first, o) for o in others)

    def test_row_order_does_not_matter(self):
        labels, groups = grouped_data(8)
        perm = np.random.default_rng(0).permutation(len(labels))
        folds = group_kfold(labels, groups, 3, seed=2)
        np.testing.assert_array_equal(
            group_kfold(labels[perm], groups[perm], 3, seed=2), folds[perm]
        )

    def test_any_label_values(self):
        labels = np.array(["fight", "calm"] * 10)
        folds = group_kfold(labels, np.arange(20) // 2, 2)
        assert all(set(labels[folds == i]) == {"fight", "calm"} for i in range(2))

    @pytest.mark.parametrize(
        "k, message",
        [(5, "5 folds but only 3 groups"), (1, "at least 2"), (0, "at least 2"), (2.5, "integer")],
    )
    def test_bad_k(self, k, message):
        with pytest.raises(ValueError, match=message):
            group_kfold([0, 1, 0, 1], ["a", "b", "c", "c"], k)

    def test_length_mismatch(self):
        with pytest.raises(ValueError, match="equal length"):
            group_kfold([0, 1, 0], ["a", "b"], 2)

    def test_warns_when_a_class_cannot_reach_every_fold(self, caplog):
        labels = [1, 0, 0, 0, 0, 0]  # one violent group for three folds
        with caplog.at_level(logging.WARNING, logger="data.splits"):
            group_kfold(labels, ["a", "b", "c", "d", "e", "f"], 3)
        assert caplog.text.count("has no samples of label 1") == 2


class TestAssignSplits:
    @pytest.mark.parametrize("seed", range(10))
    def test_fractions_stratified_by_group(self, seed):
        labels, groups = grouped_data(seed, n_groups=120)
        rows = assign_splits(as_rows(labels, groups), 0.15, 0.15, seed=seed)
        assert all(len(s) == 1 for s in groups_per_part(rows).values())
        split = np.array([r.split for r in rows])
        assert set(split) == {"train", "val", "test"}
        rate = labels.mean()
        for name, fraction in [("train", 0.7), ("val", 0.15), ("test", 0.15)]:
            assert abs((split == name).mean() - fraction) < 0.05
            assert abs(labels[split == name].mean() - rate) < 0.08

    def test_singletons_get_exact_counts(self):
        labels = (np.arange(200) < 60).astype(int)
        rows = assign_splits(as_rows(labels, np.arange(200)), 0.1, 0.2, seed=0)
        split = np.array([r.split for r in rows])
        assert [(int((split == s).sum()), int(labels[split == s].sum())) for s in ("val", "test")] == [
            (20, 6), (40, 12),
        ]  # fmt: skip

    def test_deterministic_by_seed(self):
        labels, groups = grouped_data(3, n_groups=60)
        rows = as_rows(labels, groups)
        assert assign_splits(rows, seed=4) == assign_splits(rows, seed=4)
        assert any(assign_splits(rows, seed=4) != assign_splits(rows, seed=s) for s in range(3))

    def test_official_train_val_kept_and_test_carved_from_train(self):
        labels = np.tile([1, 0], 100)
        splits = ["train"] * 160 + ["val"] * 40
        rows = assign_splits(as_rows(labels, np.arange(200), splits), 0.15, 0.15, seed=0)
        split = np.array([r.split for r in rows])
        assert list(split[160:]) == ["val"] * 40  # the official val is untouched
        assert set(split[:160]) == {"train", "test"}
        assert (split == "test").sum() == 30 and labels[split == "test"].sum() == 15

    def test_given_split_pulls_the_rest_of_its_group(self):
        labels = [1, 0, 1, 0, 1, 0, 1, 0]
        groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
        splits = ["test", "", "", "", "", "", "", ""]
        rows = assign_splits(as_rows(labels, groups, splits), 0.25, 0.25)
        assert rows[1].split == "test"
        assert all(len(s) == 1 for s in groups_per_part(rows).values())
        assert sum(r.split == "test" for r in rows) == 2  # test was given, so it gets no more

    def test_group_in_two_given_splits_raises(self):
        rows = as_rows([1, 0], ["a", "a"], ["train", "val"])
        with pytest.raises(ValueError, match="group 'a' has videos in both train and val"):
            assign_splits(rows)

    def test_zero_fraction_gives_no_split(self):
        labels = np.tile([1, 0], 20)
        rows = assign_splits(as_rows(labels, np.arange(40)), val_fraction=0.2, test_fraction=0)
        assert {r.split for r in rows} == {"train", "val"}

    @pytest.mark.parametrize(
        "val, test, message",
        [(0.6, 0.5, "below 1"), (-0.1, 0.1, "val_fraction"), (0.1, 1.0, "test_fraction")],
    )
    def test_bad_fractions(self, val, test, message):
        with pytest.raises(ValueError, match=message):
            assign_splits(as_rows([1, 0], ["a", "b"]), val, test)

    def test_empty(self):
        assert assign_splits([]) == []


class TestFoldSplit:
    def test_each_group_is_test_once_and_never_shares_parts(self):
        labels, groups = grouped_data(5, n_groups=50)
        rows = as_rows(labels, groups)
        test_count = {}
        for fold in range(5):
            out = fold_split(rows, fold, 5, seed=1, val_fraction=0.2)
            assert [r.video_id for r in out] == [r.video_id for r in rows]
            parts = groups_per_part(out)
            assert all(len(s) == 1 for s in parts.values())
            assert {r.split for r in out} == {"train", "val", "test"}
            n_rest = sum(r.split != "test" for r in out)
            assert abs(sum(r.split == "val" for r in out) / n_rest - 0.2) < 0.07
            for g, (s,) in parts.items():
                test_count[g] = test_count.get(g, 0) + (s == "test")
        assert set(test_count.values()) == {1}

    def test_test_part_matches_group_kfold(self):
        labels, groups = grouped_data(6)
        folds = group_kfold(labels, groups, 3, seed=9)
        out = fold_split(as_rows(labels, groups), 2, 3, seed=9)
        assert [r.split == "test" for r in out] == list(folds == 2)

    def test_given_splits_are_replaced_and_val_fraction_zero(self):
        labels = np.tile([1, 0], 10)
        out = fold_split(as_rows(labels, np.arange(20), ["val"] * 20), 0, 4, val_fraction=0)
        assert {r.split for r in out} == {"train", "test"}

    @pytest.mark.parametrize("fold", [-1, 3, 1.5])
    def test_bad_fold(self, fold):
        with pytest.raises(ValueError, match="fold must be in 0..2"):
            fold_split(as_rows([1, 0, 1], ["a", "b", "c"]), fold, 3)

    def test_too_few_groups_left_for_val(self):
        with pytest.raises(ValueError, match="only 1 group for train and val"):
            fold_split(as_rows([1, 0], ["a", "b"]), 0, 2)
