import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

import fusion
from fusion.ensemble import (
    EnsembleWeights,
    combine,
    combine_logits,
    fit_ensemble,
    load_ensemble,
    load_ensemble_config,
    load_member_predictions,
    save_ensemble,
)
from fusion.predictions import Predictions, write_predictions

EXAMPLE = Path(fusion.__file__).parent / "ensemble_example.toml"


def _members(n=600, seed=0):
    """A strong, a weak and a pure-noise member on the same videos."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.78).astype(int)
    sign = 2 * y - 1
    ids = [f"v{i:04d}" for i in range(n)]
    return {
        "strong": Predictions(ids, y, 3.0 * sign + rng.normal(0, 1.5, n)),
        "weak": Predictions(ids, y, 0.7 * sign + rng.normal(0, 1.5, n)),
        "noise": Predictions(ids, y, rng.normal(0, 1.5, n)),
    }


class TestFitEnsemble:
    @pytest.mark.parametrize("method", ["logit", "probability"])
    def test_weights_on_simplex_favour_informative_member(self, method):
        ew = fit_ensemble(_members(), method=method)
        w = dict(zip(ew.members, ew.weights, strict=True))
        assert all(v >= 0 for v in ew.weights)
        assert sum(ew.weights) == pytest.approx(1.0)
        assert w["strong"] > 0.6 and w["strong"] > w["weak"] > w["noise"] - 1e-9
        assert w["noise"] == 0.0  # solver round-off is snapped to an exact zero
        assert 0 < ew.threshold < 1 and ew.n_val == 600
        val = _members()  # a dropped member is not needed to combine
        assert len(combine(ew, {k: val[k] for k in ew.members if k != "noise"})) == 600

    def test_equal_members_share_the_weight(self):
        rng = np.random.default_rng(2)
        n = 800
        y = (rng.random(n) < 0.78).astype(int)
        ids = [f"v{i:04d}" for i in range(n)]
        val = {
            f"m{k}": Predictions(ids, y, 1.5 * (2 * y - 1) + rng.normal(0, 2.0, n))
            for k in range(2)
        } | {"noise": Predictions(ids, y, rng.normal(0, 2.0, n))}
        ew = fit_ensemble(val)
        w = dict(zip(ew.members, ew.weights, strict=True))
        assert w["m0"] == pytest.approx(0.5, abs=0.12) and w["m1"] == pytest.approx(0.5, abs=0.12)
        assert w["noise"] < 0.05

    def test_single_member_and_starting_point(self):
        val = _members(seed=1)
        fitted = fit_ensemble(val)
        uniform = fit_ensemble({"strong": val["strong"]})  # a single member keeps weight 1
        assert uniform.weights == (1.0,)
        started = fit_ensemble(val, init={"strong": 0.2, "weak": 0.3, "noise": 0.5})
        assert started.weights == pytest.approx(fitted.weights, abs=0.02)

    def test_errors(self):
        val = _members(n=50)
        with pytest.raises(ValueError, match="unknown ensemble method"):
            fit_ensemble(val, method="vote")
        with pytest.raises(ValueError, match="at least one member"):
            fit_ensemble({})
        one = Predictions(["a", "b"], [1, 1], [0.0, 1.0])
        with pytest.raises(ValueError, match="only one class"):
            fit_ensemble({"x": one, "y": one})
        with pytest.raises(ValueError, match="positive weight"):
            fit_ensemble(val, init={"strong": 0.0})


class TestCombine:
    def test_logit_and_probability_mixing(self):
        ew = EnsembleWeights(("a", "b", "c"), (0.25, 0.75, 0.0), "logit", 0.5, "accuracy")
        out = combine_logits(
            ew, {"a": np.array([2.0, -4.0]), "b": np.array([0.0, 4.0])}
        )  # c unused
        np.testing.assert_allclose(out, [0.5, 2.0])
        ew_p = EnsembleWeights(("a", "b"), (0.5, 0.5), "probability", 0.5, "accuracy")
        out_p = combine_logits(ew_p, {"a": np.array([2.0]), "b": np.array([0.0])})
        np.testing.assert_allclose(expit(out_p), [(expit(2.0) + 0.5) / 2])
        with pytest.raises(ValueError, match="needs member"):
            combine_logits(ew, {"a": np.array([1.0])})

    def test_combine_aligns_predictions(self):
        ew = EnsembleWeights(("a", "b"), (0.5, 0.5), "logit", 0.5, "accuracy")
        a = Predictions(["x", "y"], [1, 0], [2.0, 4.0])
        b = Predictions(["y", "z"], [0, 1], [0.0, 1.0])
        out = combine(ew, {"a": a, "b": b})
        assert out.video_ids.tolist() == ["y"] and out.logits.tolist() == [2.0]

    def test_json_round_trip(self, tmp_path):
        ew = fit_ensemble(_members(n=200))
        path = save_ensemble(ew, tmp_path / "ensemble.json")
        assert json.loads(path.read_text())["format"] == "twostream-ensemble"
        assert load_ensemble(path) == ew
        path.write_text('{"format": "twostream-fusion"}')
        with pytest.raises(ValueError, match="not a version-1 ensemble"):
            load_ensemble(path)
        with pytest.raises(FileNotFoundError):
            load_ensemble(tmp_path / "missing.json")


class TestConfig:
    def test_example_file_is_the_report_ensemble(self):
        members = load_ensemble_config(EXAMPLE)
        assert [(m["backbone"], m["head"]) for m in members] == [
            ("vgg19", "bilstm_attention"),
            ("resnet50", "bilstm_attention"),
            ("efficientnet_b4", "gru_attention"),
            ("vgg19", "conv1d_lstm"),
            ("vit_b_16", "transformer"),
        ]
        assert [m["weight"] for m in members] == [0.25, 0.25, 0.20, 0.15, 0.15]
        assert all(Path(m["run"]).parent.parent == EXAMPLE.parent for m in members)
        assert all(m["stream"] == "rgb" for m in members)

    def test_defaults_and_member_predictions(self, tmp_path):
        (tmp_path / "cfg.toml").write_text(
            '[[member]]\nname = "m1"\nbackbone = "vgg19"\nhead = "bilstm_attention"\nrun = "runs/a"\n'
            '[[member]]\nname = "m2"\nbackbone = "resnet50"\nhead = "gru_attention"\nrun = "runs/b"\nstream = "flow"\n'
        )
        members = load_ensemble_config(tmp_path / "cfg.toml")
        assert members[0]["stream"] == "rgb" and members[0]["weight"] is None
        write_predictions(
            tmp_path / "runs/a/rgb/predictions_val.csv", ["v1", "v2"], [1, 0], [1.0, -1.0]
        )
        write_predictions(
            tmp_path / "runs/b/flow/predictions_val.csv", ["v2", "v1"], [0, 1], [-2.0, 2.0]
        )
        preds = load_member_predictions(members, "val")
        assert preds["m1"].logits.tolist() == [1.0, -1.0] and preds["m2"].logits.tolist() == [
            2.0,
            -2.0,
        ]

    @pytest.mark.parametrize(
        "text, match",
        [
            ("[[member]\n", "invalid TOML"),
            ("", "no \\[\\[member\\]\\] tables"),
            ('method = "logit"\n', "unknown top-level"),
            ('[[member]]\nname = "a"\nbackbone = "vgg19"\nrun = "r"\n', "missing head"),
            (
                '[[member]]\nname = "a"\nbackbone = "vgg19"\nhead = "h"\nrun = "r"\nwieght = 1\n',
                "unknown key.*wieght",
            ),
            (
                '[[member]]\nname = "a"\nbackbone = "vgg19"\nhead = "h"\nrun = "r"\nweight = -1\n',
                "weight must be",
            ),
            ('[[member]]\nname = "a"\nbackbone = 3\nhead = "h"\nrun = "r"\n', "backbone must be"),
            (
                '[[member]]\nname = "a"\nbackbone = "b"\nhead = "h"\nrun = "r"\n' * 2,
                "duplicate name",
            ),
        ],
    )
    def test_bad_configs(self, tmp_path, text, match):
        path = tmp_path / "e.toml"
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_ensemble_config(path)

    def test_missing_config(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="ensemble config not found"):
            load_ensemble_config(tmp_path / "none.toml")
