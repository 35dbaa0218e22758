import json

import numpy as np
import pytest

from fusion import metrics
from fusion.metrics import (
    compute_curves,
    compute_metrics,
    expected_calibration_error,
    paired_comparison,
)

# 10 videos, threshold 0.5: predicted 1,1,1,1,0,0 | 1,0,0,0 -> tp 4, fn 2, fp 1, tn 3.
LABELS = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
PROBS = np.array([0.95, 0.85, 0.75, 0.65, 0.45, 0.35, 0.55, 0.25, 0.15, 0.05])


def _plain(x):
    """True when x holds only JSON-native Python values."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or type(x) in (int, float, str, bool)


class TestComputeMetrics:
    def test_hand_computed_case(self):
        m = compute_metrics(LABELS, PROBS, 0.5)
        assert m["confusion_matrix"] == [[3, 1], [2, 4]]
        assert m["accuracy"] == pytest.approx(0.7)
        v, nv = m["per_class"]["violent"], m["per_class"]["non_violent"]
        assert v["precision"] == pytest.approx(4 / 5)
        assert v["recall"] == pytest.approx(4 / 6)
        assert v["f1"] == pytest.approx(8 / 11)
        assert nv["precision"] == pytest.approx(3 / 5)
        assert nv["recall"] == pytest.approx(3 / 4)
        assert nv["f1"] == pytest.approx(2 / 3)
        assert m["macro_f1"] == pytest.approx((8 / 11 + 2 / 3) / 2)
        # 24 violent/non-violent pairs; the 0.45 and 0.35 videos sit below the 0.55 one.
        assert m["roc_auc"] == pytest.approx(22 / 24)
        # Precision at each violent hit, ranks 1-4 then 6 and 7: (1+1+1+1+5/6+6/7) / 6.
        assert m["pr_auc"] == pytest.approx(239 / 252)
        # Every probability falls in its own 1/15-wide bin, so ECE = mean |label - prob|.
        assert m["ece"] == pytest.approx(0.3)
        expected_ll = -np.mean(LABELS * np.log(PROBS) + (1 - LABELS) * np.log(1 - PROBS))
        assert m["log_loss"] == pytest.approx(expected_ll)
        assert m["n"] == 10 and m["n_per_class"] == {"non_violent": 4, "violent": 6}
        assert m["threshold"] == 0.5
        assert _plain(m)
        json.dumps(m)

    def test_probability_at_threshold_counts_as_violent(self):
        m = compute_metrics(np.array([1, 0]), np.array([0.5, 0.49]), 0.5)
        assert m["accuracy"] == 1.0

    def test_threshold_changes_the_confusion_matrix(self):
        assert compute_metrics(LABELS, PROBS, 0.3)["confusion_matrix"] == [[3, 1], [0, 6]]

    def test_single_class_gives_none_aucs(self):
        m = compute_metrics(np.ones(5, int), np.array([0.9, 0.8, 0.4, 0.7, 0.6]), 0.5)
        assert m["roc_auc"] is None and m["pr_auc"] is None
        assert m["accuracy"] == pytest.approx(0.8)
        assert m["per_class"]["non_violent"]["support"] == 0
        assert np.isfinite(m["log_loss"])
        assert _plain(m)

    @pytest.mark.parametrize(
        "labels, probs, match",
        [
            ([], [], "empty"),
            ([0, 1], [0.1], "2 labels"),
            ([0, 1], [0.1, 1.1], r"\[0, 1\]"),
            ([0, 3], [0.1, 0.2], "labels"),
        ],
    )
    def test_bad_inputs(self, labels, probs, match):
        with pytest.raises(ValueError, match=match):
            compute_metrics(np.array(labels), np.array(probs, dtype=float))


class TestEce:
    def test_hand_case(self):
        # bin 1 (0.1): mean label 0.5 vs 0.1 -> 0.4 * 2/4; bin 13 (0.9): 1.0 vs 0.9 -> 0.1 * 2/4.
        assert expected_calibration_error(
            np.array([0, 1, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9])
        ) == pytest.approx(0.25)

    def test_perfectly_calibrated_bins_give_zero(self):
        labels = np.array([1, 0, 0, 0, 1, 1, 1, 0])
        probs = np.array([0.25] * 4 + [0.75] * 4)
        assert expected_calibration_error(labels, probs) == pytest.approx(0.0)

    def test_probability_one_lands_in_last_bin(self):
        assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(
            0.0
        )

    def test_bins_are_equal_width_fifteen(self):
        # 0.06 and 0.07 straddle 1/15 = 0.0667: separate bins, so their errors do not cancel.
        assert expected_calibration_error(
            np.array([1, 0]), np.array([0.06, 0.07])
        ) == pytest.approx((0.94 + 0.07) / 2)


def test_curves():
    c = compute_curves(LABELS, PROBS)
    assert c["roc"]["fpr"][0] == 0.0 and c["roc"]["fpr"][-1] == 1.0 and c["roc"]["tpr"][-1] == 1.0
    assert c["roc"]["auc"] == pytest.approx(22 / 24)
    assert c["pr"]["base_rate"] == pytest.approx(0.6)
    assert _plain(c)
    assert compute_curves(np.zeros(3, int), np.array([0.1, 0.2, 0.3])) is None


def test_paired_comparison_counts_disagreements_and_tests_them_exactly():
    # a right, b wrong on videos 0-2; b right, a wrong on video 4; both right on 3 and 5.
    r = paired_comparison([1, 1, 1, 1, 0, 1], [0, 0, 0, 1, 1, 1])
    assert (r["n"], r["only_a"], r["only_b"]) == (6, 3, 1)
    assert r["difference"] == pytest.approx(2 / 6)
    assert r["p_value"] == pytest.approx(10 / 16)  # P(|X - 2| >= 1), X ~ Bin(4, 1/2)
    assert r["resampled"] == "video"
    same = paired_comparison([1, 0, 1], [1, 0, 1])
    assert (same["only_a"], same["only_b"], same["p_value"], same["ci95"]) == (0, 0, 1.0, [0.0, 0.0])


def test_paired_comparison_bootstraps_whole_recordings():
    a, b = [1, 1, 1, 0, 0, 0], [0] * 6  # every gain in recording A
    by_video = paired_comparison(a, b)
    by_recording = paired_comparison(a, b, groups=["A"] * 3 + ["B"] * 3)
    assert by_recording["resampled"] == "recording"
    # Two recordings: a resample holds A twice (+1), A and B (+0.5) or B twice (0).
    assert by_recording["ci95"] == [0.0, 1.0]
    assert by_video["ci95"][1] - by_video["ci95"][0] < 1.0  # independent videos understate the spread
    one = paired_comparison(a, b, groups=["A"] * 6)  # one recording cannot be resampled: videos are
    assert one["resampled"] == "video" and one["ci95"] == by_video["ci95"]


def test_paired_comparison_bootstrap_batches_give_the_same_interval(monkeypatch):
    rng = np.random.default_rng(1)
    a, b, g = rng.random(50) < 0.7, rng.random(50) < 0.6, rng.integers(0, 7, 50)
    whole = paired_comparison(a, b, g)
    monkeypatch.setattr(metrics, "_BOOTSTRAP_DRAWS", 7)  # one resample per batch
    assert paired_comparison(a, b, g) == whole


def test_paired_comparison_refuses_mismatched_calls():
    with pytest.raises(ValueError, match="one length"):
        paired_comparison([1, 0], [1])
    with pytest.raises(ValueError, match="one recording per video"):
        paired_comparison([1, 0], [1, 1], groups=["A"])
    with pytest.raises(ValueError, match="resamples must be a positive integer"):
        paired_comparison([1, 0], [1, 1], resamples=0)
