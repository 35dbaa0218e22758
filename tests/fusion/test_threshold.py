import numpy as np
import pytest

from fusion.threshold import choose_threshold, threshold_table

# Hand case A: violent at 0.9, 0.8, 0.7, 0.6; non-violent at 0.65, 0.3, 0.2.
LABELS_A = np.array([1, 1, 1, 1, 0, 0, 0])
PROBS_A = np.array([0.9, 0.8, 0.7, 0.6, 0.65, 0.3, 0.2])

# Hand case B: accuracy wants a high threshold, violent F1 a low one.
# violent at 0.9, 0.3, 0.25; non-violent at 0.8, 0.7, 0.6, 0.2, 0.1, 0.05, 0.01.
# t = 0.85: tp 1, fp 0, fn 2, tn 7 -> accuracy 0.8, F1 0.5
# t = 0.225: tp 3, fp 3, fn 0, tn 4 -> accuracy 0.7, F1 0.667
LABELS_B = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
PROBS_B = np.array([0.9, 0.3, 0.25, 0.8, 0.7, 0.6, 0.2, 0.1, 0.05, 0.01])


def _recall(labels, probs, t):
    pred = probs >= t
    return (pred & (labels == 1)).sum() / (labels == 1).sum()


class TestChooseThreshold:
    @pytest.mark.parametrize(
        "target, expected",
        [
            (1.0, 0.45),  # all four: below 0.6, above 0.3
            (0.75, 0.675),  # three: below 0.7, above 0.65
            (0.5, 0.75),  # two: between 0.7 and 0.8
            (0.25, 0.85),  # one: between 0.8 and 0.9
        ],
    )
    def test_min_recall_hand_case(self, target, expected):
        t = choose_threshold(LABELS_A, PROBS_A, "recall", min_recall=target)
        assert t == pytest.approx(expected)
        assert _recall(LABELS_A, PROBS_A, t) >= target

    def test_accuracy_and_f1_differ(self):
        assert choose_threshold(LABELS_B, PROBS_B, "accuracy") == pytest.approx(0.85)
        assert choose_threshold(LABELS_B, PROBS_B, "f1") == pytest.approx(0.225)

    def test_accuracy_ties_go_to_the_lower_threshold(self):
        # Case A: t = 0.675 and t = 0.45 both give 6/7 correct.
        assert choose_threshold(LABELS_A, PROBS_A, "accuracy") == pytest.approx(0.45)

    def test_min_recall_is_the_highest_meeting_the_floor(self):
        rng = np.random.default_rng(3)
        labels = (rng.random(300) < 0.78).astype(int)
        probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
        t = choose_threshold(labels, probs, "recall", min_recall=0.95)
        assert _recall(labels, probs, t) >= 0.95
        higher = np.unique(probs)[np.unique(probs) >= t][0]  # the first score at or above t
        assert _recall(labels, probs, higher + 1e-9) < 0.95

    def test_probability_of_one(self):
        t = choose_threshold(np.array([1, 1, 0]), np.array([1.0, 1.0, 0.2]), "accuracy")
        assert 0.2 < t <= 1.0

    @pytest.mark.parametrize(
        "labels, probs, kwargs, match",
        [
            ([], [], {}, "empty"),
            ([1, 1], [0.2, 0.9], {}, "all violent"),
            ([0, 0], [0.2, 0.9], {"goal": "f1"}, "all non-violent"),
            ([0, 1], [0.2, 0.9], {"goal": "recall"}, "needs min_recall"),
            ([0, 1], [0.2, 0.9], {"goal": "recall", "min_recall": 1.5}, "needs min_recall"),
            (
                [0, 1],
                [0.2, 0.9],
                {"goal": "accuracy", "min_recall": 0.9},
                "applies to goal 'recall'",
            ),
            ([0, 1], [0.2, 0.9], {"goal": "auc"}, "unknown threshold goal"),
            ([0, 1], [0.2, 1.9], {}, r"lie in \[0, 1\]"),
            ([0, 1], [0.2, np.nan], {}, "finite"),
            ([0, 2], [0.2, 0.9], {}, "labels must be"),
            ([0, 1, 1], [0.2, 0.9], {}, "3 labels and 2"),
        ],
    )
    def test_degenerate_inputs(self, labels, probs, kwargs, match):
        with pytest.raises(ValueError, match=match):
            choose_threshold(np.array(labels), np.array(probs, dtype=float), **kwargs)


def test_threshold_table_counts_match_direct_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    probs = np.round(rng.random(50) * 0.9, 1)  # many ties, none at 1
    table = threshold_table(labels, probs)
    assert np.all(np.diff(table["threshold"]) > 0)
    for t, tp, fp in zip(table["threshold"], table["tp"], table["fp"], strict=True):
        pred = probs >= t
        assert tp == (pred & (labels == 1)).sum() and fp == (pred & (labels == 0)).sum()
    assert table["tp"][-1] == 0 and table["fp"][-1] == 0  # top cut calls nothing violent
