import json

import numpy as np
import pytest
from scipy.special import expit, logit

from fusion.late import (
    FusionConfig,
    FusionModel,
    apply,
    baselines,
    fit_fusion,
    fuse,
    fuse_logits,
    load_fusion,
    save_fusion,
)
from fusion.predictions import Predictions


def _ids(n, prefix="v"):
    return [f"{prefix}{i:05d}" for i in range(n)]


def _logistic_streams(n, seed, w_rgb=1.0, w_flow=1.5, bias=1.2):
    """Labels drawn from a known logistic model over two independent per-stream logits."""
    rng = np.random.default_rng(seed)
    x_rgb, x_flow = rng.normal(0, 2, n), rng.normal(0, 2, n)
    y = (rng.random(n) < expit(w_rgb * x_rgb + w_flow * x_flow + bias)).astype(int)
    ids = _ids(n, f"s{seed}_")
    return {"rgb": Predictions(ids, y, x_rgb), "flow": Predictions(ids, y, x_flow)}


def _accuracy(pred, logits, threshold):
    return float(((expit(logits) >= threshold) == pred.labels).mean())


def _perfect_and_noise(n, seed, scale=6.0):
    """RGB separates the classes perfectly with logits of about +-scale; flow is noise."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.78).astype(int)
    rgb = np.where(y == 1, 1.0, -1.0) * scale * (1 + np.abs(rng.normal(0, 1, n)) / 6)
    flow = rng.normal(0, 1, n)
    ids = _ids(n)
    return {"rgb": Predictions(ids, y, rgb), "flow": Predictions(ids, y, flow)}


class TestLearnedFusion:
    def test_recovers_known_weight_ratio(self):
        model = fit_fusion(_logistic_streams(2000, seed=1))
        assert model.method == "learned" and model.cv_folds == 5
        w = dict(zip(model.features, model.weights, strict=True))
        assert w["flow:logit"] / w["rgb:logit"] == pytest.approx(1.5, rel=0.15)
        assert w["rgb:logit"] == pytest.approx(1.0, rel=0.15)

    def test_fused_beats_each_stream_on_complementary_signal(self):
        val, test = _logistic_streams(1500, seed=2), _logistic_streams(2000, seed=3)
        model = fit_fusion(val)
        assert model.method == "learned" and model.fallback_reason is None
        scores = model.validation
        assert scores["learned"]["accuracy"] >= max(
            scores["rgb"]["accuracy"], scores["flow"]["accuracy"]
        )
        fused_acc = _accuracy(test["rgb"], apply(model, test), model.threshold)
        for s in ("rgb", "flow"):
            single_acc = _accuracy(test[s], test[s].logits, scores[s]["threshold"])
            assert fused_acc > single_acc + 0.03

    def test_falls_back_when_one_stream_is_noise_and_the_other_perfect(self):
        val = _perfect_and_noise(60, seed=4)
        model = fit_fusion(val)
        assert model.method == "single" and model.selected == "rgb"
        assert "rgb scored best" in model.fallback_reason
        assert model.features == ("rgb:logit",)
        test = _perfect_and_noise(40, seed=5)
        np.testing.assert_array_equal(apply(model, test), test["rgb"].logits)
        # the fallback model needs only the stream it kept
        np.testing.assert_array_equal(apply(model, {"rgb": test["rgb"]}), test["rgb"].logits)

    def test_small_validation_fits_no_weights(self):
        # Too few videos to learn weights: the streams' standardised logits count equally (c = 0:
        # no departure from equal weights is fitted); only the average's scale and bias are.
        val = _logistic_streams(30, seed=6, w_rgb=3.0, w_flow=3.0, bias=0.0)
        model = fit_fusion(val)
        assert model.cv_folds == 0 and model.c == 0.0 and model.method == "equal"
        w = dict(zip(model.features, model.weights, strict=True))
        assert w["rgb:logit"] * val["rgb"].logits.std() == pytest.approx(w["flow:logit"] * val["flow"].logits.std())

    def test_small_validation_learns_no_weights(self):
        # 10 videos: a layer would fit them perfectly; with fewer than ~10 videos of the rarer
        # class per weight, only fixed candidates compete, and the noise stream loses.
        val = _perfect_and_noise(10, seed=11, scale=0.3)
        model = fit_fusion(val)
        assert model.cv_folds == 0 and "learned" not in model.validation
        assert model.method == "single" and model.selected == "rgb"
        assert "too few to learn fusion weights" in model.fallback_reason
        assert "calibrated_log_loss" in model.validation["rgb"]

    def test_small_validation_can_choose_equal_weights(self):
        # Two equally informative, independent streams: their equal-weight average beats either alone.
        val = _logistic_streams(36, seed=12, w_rgb=3.0, w_flow=3.0, bias=0.0)
        model = fit_fusion(val)
        assert model.method == "equal" and model.selected is None and model.fallback_reason is None
        assert model.features == ("rgb:logit", "flow:logit")
        standardised = sum((p.logits - p.logits.mean()) / p.logits.std() for p in val.values())
        fused = apply(model, val)
        assert np.array_equal(np.argsort(fused), np.argsort(standardised))  # the same ranking of the videos
        assert model.validation["equal"]["roc_auc"] > max(model.validation[s]["roc_auc"] for s in ("rgb", "flow"))

    def test_strong_regularisation_gives_equal_weights_not_none(self):
        # The layer shrinks towards the equal-weight average of standardised logits, so a tiny C
        # keeps both streams (scaled to calibrate) where plain L2 would leave a constant.
        from fusion.late import _fit_lr

        val = _logistic_streams(400, seed=13, w_rgb=0.5, w_flow=2.0)
        x = np.c_[val["rgb"].logits * 5.0, val["flow"].logits]  # rgb on another scale
        w, _ = _fit_lr(x, val["rgb"].labels, 1e-6, np.array([0.5, 0.5]))
        assert w[0] * x[:, 0].std() == pytest.approx(w[1] * x[:, 1].std(), rel=1e-3)
        assert w[1] > 0.1  # calibrated: not shrunk to nothing
        free, _ = _fit_lr(x, val["rgb"].labels, 1e4, np.array([0.5, 0.5]))
        assert free[1] / (free[0] * 5.0) == pytest.approx(4.0, rel=0.3)  # the true 0.5 : 2.0

    def test_the_equal_weight_average_is_never_reversed(self):
        # Two streams whose logits run against the labels: the average may only be scaled, not
        # flipped, so it cannot win by inverting both trained models on a handful of videos.
        val = _logistic_streams(12, seed=14, w_rgb=-3.0, w_flow=-3.0, bias=0.0)
        model = fit_fusion(val)
        if model.method == "equal":
            assert min(model.weights) >= 0.0
        from fusion.late import _fit_lr

        w, _ = _fit_lr(np.c_[val["rgb"].logits, val["flow"].logits], val["rgb"].labels, 0.0, np.array([0.5, 0.5]))
        assert w == pytest.approx([0.0, 0.0], abs=1e-6)

    def test_calibration_layers_follow_their_strength(self):
        # Without a prior the layer is plain L2 logistic regression: a stronger penalty, a smaller weight.
        from fusion.late import _fit_lr

        val = _logistic_streams(200, seed=15)
        x, y = val["rgb"].logits.reshape(-1, 1), val["rgb"].labels
        weights = [_fit_lr(x, y, c)[0][0] for c in (0.01, 1.0, 100.0)]
        assert 0 < weights[0] < weights[1] < weights[2]
        with pytest.raises(ValueError, match="needs a prior"):
            _fit_lr(x, y, 0.0)

    def test_one_minority_video_keeps_the_best_candidate(self):
        ids = _ids(6)
        y = np.array([1, 1, 1, 1, 1, 0])
        val = {
            "rgb": Predictions(ids, y, np.array([2.0, 1.0, 3.0, 0.5, 1.5, -1.0])),
            "flow": Predictions(ids, y, np.array([0.1, -0.3, 0.2, 0.4, 0.0, 0.3])),
        }
        model = fit_fusion(val)
        assert model.method == "single" and model.selected == "rgb"
        assert "learned" not in model.validation and "calibrated_log_loss" not in model.validation["rgb"]

    def test_threshold_follows_goal(self):
        val = _logistic_streams(800, seed=7)
        model = fit_fusion(val, FusionConfig(goal="recall", min_recall=0.95))
        fused = fuse(model, val)
        # Picked on out-of-fold scores, so check recall on them loosely via the recorded metric.
        assert model.validation["learned"]["recall"] >= 0.95
        assert model.goal == "recall" and model.min_recall == 0.95
        assert (
            (expit(fused.logits) >= model.threshold) & (fused.labels == 1)
        ).sum() / fused.labels.sum() > 0.9

    def test_uses_embeddings_when_asked(self):
        rng = np.random.default_rng(8)
        n = 400
        y = (rng.random(n) < 0.7).astype(int)
        ids = _ids(n)
        emb = np.c_[rng.normal(0, 1, n), 2.0 * (2 * y - 1) + rng.normal(0, 1, n)].astype(np.float32)
        val = {
            "rgb": Predictions(ids, y, rng.normal(0, 1, n), emb),
            "flow": Predictions(ids, y, rng.normal(0, 1, n), emb[:, ::-1].copy()),
        }
        model = fit_fusion(val, FusionConfig(use_embeddings=True))
        assert model.method == "learned"
        assert model.features == (
            "rgb:logit",
            "rgb:emb0",
            "rgb:emb1",
            "flow:logit",
            "flow:emb0",
            "flow:emb1",
        )
        assert model.validation["learned"]["accuracy"] > 0.9
        without = {s: Predictions(p.video_ids, p.labels, p.logits) for s, p in val.items()}
        with pytest.raises(ValueError, match="needs embeddings"):
            apply(model, without)
        narrow = {
            s: Predictions(p.video_ids, p.labels, p.logits, p.embeddings[:, :1])
            for s, p in val.items()
        }
        with pytest.raises(ValueError, match="expects 2-d embeddings"):
            apply(model, narrow)
        with pytest.raises(ValueError, match="no validation embeddings"):
            fit_fusion(without, FusionConfig(use_embeddings=True))


class TestApply:
    def test_aligns_inputs_and_matches_manual_formula(self):
        model = FusionModel(
            streams=("rgb", "flow"),
            features=("rgb:logit", "flow:logit"),
            weights=(0.5, 2.0),
            bias=-1.0,
            threshold=0.5,
            goal="accuracy",
            min_recall=None,
            method="learned",
        )
        rgb = Predictions(["a", "b", "c"], [1, 0, 1], [1.0, 2.0, 3.0])
        flow = Predictions(["c", "b", "x"], [1, 0, 0], [10.0, 20.0, 30.0])
        out = fuse(model, {"rgb": rgb, "flow": flow})
        assert out.video_ids.tolist() == ["b", "c"]
        np.testing.assert_allclose(out.logits, [0.5 * 2 + 2 * 20 - 1, 0.5 * 3 + 2 * 10 - 1])
        np.testing.assert_allclose(
            fuse_logits(model, {"rgb": np.array([1.0]), "flow": np.array([1.0])}), [1.5]
        )
        with pytest.raises(ValueError, match="needs stream"):
            apply(model, {"rgb": rgb})


class TestBaselines:
    def test_average_and_tsn(self):
        rgb = Predictions(["a", "b"], [1, 0], [2.0, -1.0])
        flow = Predictions(["a", "b"], [1, 0], [0.0, 3.0])
        out = baselines({"rgb": rgb, "flow": flow})
        assert set(out) == {"rgb", "flow", "average", "tsn"}
        np.testing.assert_allclose(out["tsn"].logits, [(2.0 + 0.0) / 2.5, (-1.0 + 4.5) / 2.5])
        np.testing.assert_allclose(
            out["average"].probabilities, (expit([2.0, -1.0]) + expit([0.0, 3.0])) / 2
        )
        assert logit(out["average"].probabilities[0]) == pytest.approx(out["average"].logits[0])

    def test_no_tsn_without_rgb_and_flow(self):
        p = Predictions(["a"], [1], [1.0])
        assert set(baselines({"m1": p, "m2": p})) == {"m1", "m2", "average"}


class TestSerialisation:
    def test_json_round_trip(self, tmp_path):
        model = fit_fusion(_perfect_and_noise(60, seed=9))
        path = save_fusion(model, tmp_path / "fusion.json")
        d = json.loads(path.read_text())
        assert d["format"] == "twostream-fusion" and d["fallback_reason"] == model.fallback_reason
        again = load_fusion(path)
        assert again == model
        learned = fit_fusion(_logistic_streams(300, seed=10))
        assert load_fusion(save_fusion(learned, tmp_path / "l.json")) == learned

    @pytest.mark.parametrize(
        "text, match",
        [
            ("{", "not valid JSON"),
            ('{"format": "other"}', "not a fusion model"),
            ('{"format": "twostream-fusion", "version": 1, "oops": 1}', "malformed"),
        ],
    )
    def test_bad_files(self, tmp_path, text, match):
        path = tmp_path / "f.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_fusion(path)

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError):
            load_fusion(tmp_path / "none.json")


class TestErrors:
    def test_empty_validation(self):
        empty = Predictions([], [], [])
        with pytest.raises(ValueError, match="empty"):
            fit_fusion({"rgb": empty, "flow": empty})
        with pytest.raises(ValueError, match="at least one stream"):
            fit_fusion({})

    def test_single_class_validation(self):
        p = Predictions(["a", "b", "c"], [1, 1, 1], [0.1, 0.2, 0.3])
        with pytest.raises(ValueError, match="only violent videos"):
            fit_fusion({"rgb": p, "flow": p})

    @pytest.mark.parametrize("name", ["average", "equal", "learned"])
    def test_reserved_stream_name(self, name):
        p = Predictions(["a", "b"], [1, 0], [0.1, 0.2])
        with pytest.raises(ValueError, match="reserved"):
            fit_fusion({name: p, "flow": p})

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"goal": "auc"}, "goal"),
            ({"select_metric": "speed"}, "select_metric"),
            ({"cs": (0.0,)}, "positive"),
            ({"cv_folds": 1}, "cv_folds"),
            ({"goal": "recall"}, "needs min_recall"),
            ({"goal": "f1", "min_recall": 0.9}, "applies to goal 'recall'"),
        ],
    )
    def test_bad_config(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            FusionConfig(**kwargs)


class TestRecordingFolds:
    """With the recordings known, every cross-validation inside the fit holds out whole recordings."""

    @staticmethod
    def _spy(monkeypatch):
        import fusion.late as late

        splits, real = [], late._out_of_fold

        def spy(x, y, c, folds, prior=None, groups=None):
            splits.append([(train, test, groups) for train, test in folds.split(x, y, groups)])
            return real(x, y, c, folds, prior, groups)

        monkeypatch.setattr(late, "_out_of_fold", spy)
        return splits

    @staticmethod
    def _no_recording_on_both_sides(splits):
        for split in splits:
            for train, test, groups in split:
                assert groups is not None and not set(groups[train]) & set(groups[test])

    def test_learned_fusion_folds_hold_out_recordings(self, monkeypatch):
        splits = self._spy(monkeypatch)
        val = _logistic_streams(400, seed=4)
        groups = {v: f"rec{i % 7}" for i, v in enumerate(val["rgb"].video_ids)}
        model = fit_fusion(val, groups=groups)
        assert model.method in ("learned", "single") and model.cv_by == "recording" and model.cv_folds == 5
        assert splits
        self._no_recording_on_both_sides(splits)

    def test_fewer_recordings_than_folds_give_one_fold_per_recording(self):
        val = _logistic_streams(300, seed=5)
        model = fit_fusion(val, groups={v: f"rec{i % 3}" for i, v in enumerate(val["rgb"].video_ids)})
        assert model.cv_by == "recording" and model.cv_folds == 3

    def test_small_validation_compares_candidates_leaving_one_recording_out(self, monkeypatch):
        splits = self._spy(monkeypatch)
        val = _logistic_streams(40, seed=6)
        groups = {v: f"rec{i % 6}" for i, v in enumerate(val["rgb"].video_ids)}
        model = fit_fusion(val, groups=groups)
        assert model.cv_folds == 0 and model.cv_by == "recording"
        assert splits and all(len(split) == 6 for split in splits)  # one held-out recording per split
        self._no_recording_on_both_sides(splits)

    def test_without_recordings_or_with_one_the_folds_hold_out_videos(self):
        val = _logistic_streams(400, seed=4)
        assert fit_fusion(val).cv_by == "video"
        assert fit_fusion(val, groups={v: "one" for v in val["rgb"].video_ids}).cv_by == "video"

    def test_older_fusion_files_without_the_field_still_load(self, tmp_path):
        model = fit_fusion(_logistic_streams(400, seed=4))
        doc = model.to_dict()
        del doc["cv_by"]
        path = tmp_path / "fusion.json"
        path.write_text(json.dumps(doc))
        assert load_fusion(path).cv_by == "video"


def test_recordings_that_each_hold_one_class_fall_back_to_video_folds():
    val = _logistic_streams(400, seed=7)
    by_class = {v: f"rec{y}" for v, y in zip(val["rgb"].video_ids, val["rgb"].labels, strict=True)}
    model = fit_fusion(val, groups=by_class)  # holding out a recording would leave one class to fit on
    assert model.cv_by == "video" and model.cv_folds == 5
    small = _logistic_streams(40, seed=8)
    one_positive_home = {v: ("pos" if y else f"rec{i % 4}")
                         for i, (v, y) in enumerate(zip(small["rgb"].video_ids, small["rgb"].labels, strict=True))}
    assert fit_fusion(small, groups=one_positive_home).cv_by == "video"
