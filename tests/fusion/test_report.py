import csv
import json
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest

from fusion.late import fit_fusion, fuse
from fusion.metrics import compute_curves, compute_metrics
from fusion.predictions import Predictions
from fusion.report import write_report


def _setup(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.78).astype(int)
    ids = [f"v{i:03d}" for i in range(n)]
    sign = 2 * y - 1
    preds = {
        "rgb": Predictions(ids, y, 0.8 * sign + rng.normal(0, 1.5, n)),
        "flow": Predictions(ids, y, 1.0 * sign + rng.normal(0, 1.5, n)),
    }
    preds["fused"] = Predictions(ids, y, preds["rgb"].logits + preds["flow"].logits)
    results = {k: compute_metrics(p.labels, p.probabilities, 0.5) for k, p in preds.items()}
    return preds, results


class TestWriteReport:
    def test_files_and_contents(self, tmp_path):
        preds, results = _setup()
        model = fit_fusion({"rgb": preds["rgb"], "flow": preds["flow"]})
        written = write_report(
            tmp_path / "rep", results, None, preds, goal="accuracy", fusion=model.to_dict()
        )
        names = sorted(p.name for p in written)
        assert names == [
            "confusion.png",
            "metrics.json",
            "pr.png",
            "predictions.csv",
            "report.md",
            "roc.png",
        ]
        assert (
            sorted(p.name for p in (tmp_path / "rep").iterdir()) == names
        )  # no temporary files left

        summary = json.loads((tmp_path / "rep" / "metrics.json").read_text())
        assert summary["primary"] == "fused"
        assert summary["accuracy"] == results["fused"]["accuracy"]
        assert summary["accuracy"] != results["rgb"]["accuracy"]
        assert set(summary["models"]) == {"rgb", "flow", "fused"}
        assert summary["fusion"]["weights"] == list(model.weights)

        for png in ("roc.png", "pr.png", "confusion.png"):
            img = mpimg.imread(tmp_path / "rep" / png)
            assert img is not None and img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100

        md = (tmp_path / "rep" / "report.md").read_text()
        for name in (
            "| rgb |",
            "| flow |",
            "| **fused** |",
            "goal accuracy",
            "rgb:logit",
            "flow:logit",
        ):
            assert name in md
        assert f"{results['fused']['accuracy']:.4f}" in md
        assert f"threshold {results['fused']['threshold']:.4f}" in md

        with open(tmp_path / "rep" / "predictions.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 120
        assert list(rows[0]) == [
            "video_id",
            "label",
            "rgb_probability",
            "flow_probability",
            "fused_probability",
            "predicted",
        ]
        fused_pred = (preds["fused"].probabilities >= 0.5).astype(int)
        assert [int(r["predicted"]) for r in rows] == fused_pred.tolist()

    def test_fallback_note_and_explicit_curves(self, tmp_path):
        preds, results = _setup(seed=1)
        fusion = {
            "features": ["rgb:logit"],
            "weights": [1.0],
            "bias": 0.0,
            "method": "single",
            "selected": "rgb",
            "fallback_reason": "learned fusion scored below rgb alone",
        }
        curves = {k: compute_curves(p.labels, p.probabilities) for k, p in preds.items()}
        write_report(
            tmp_path,
            {"rgb": results["rgb"], "fused": results["fused"]},
            curves,
            None,
            goal="recall",
            min_recall=0.95,
            fusion=fusion,
        )
        md = (tmp_path / "report.md").read_text()
        assert "**Fallback:** learned fusion scored below rgb alone" in md
        assert "violent recall >= 0.95" in md
        assert not (tmp_path / "predictions.csv").exists()

    def test_ensemble_weights_and_single_class(self, tmp_path):
        y = np.ones(6, int)
        p = Predictions([f"v{i}" for i in range(6)], y, np.linspace(-1, 2, 6))
        res = {"ens": compute_metrics(y, p.probabilities, 0.5)}
        fusion = {"members": ["a", "b"], "weights": [0.7, 0.3], "method": "logit"}
        write_report(tmp_path, res, None, {"ens": p}, fusion=fusion)
        summary = json.loads((tmp_path / "metrics.json").read_text())
        assert summary["primary"] == "ens" and summary["models"]["ens"]["roc_auc"] is None
        md = (tmp_path / "report.md").read_text()
        assert "| a | 0.7000 |" in md and "n/a" in md
        assert mpimg.imread(tmp_path / "roc.png").ndim == 3

    def test_with_fused_predictions_from_model(self, tmp_path):
        preds, _ = _setup(seed=2)
        model = fit_fusion({"rgb": preds["rgb"], "flow": preds["flow"]})
        fused = fuse(model, preds)
        res = {"fused": compute_metrics(fused.labels, fused.probabilities, model.threshold)}
        write_report(tmp_path, res, None, {"fused": fused}, goal=model.goal, fusion=model.to_dict())
        assert json.loads((tmp_path / "metrics.json").read_text())["threshold"] == model.threshold

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"results": {}}, "no results"),
            ({"primary": "ens"}, "primary model 'ens'"),
            ({"predictions": None}, "needs curves or per-video predictions"),
        ],
    )
    def test_errors(self, tmp_path, kwargs, match):
        preds, results = _setup(n=30)
        args = {"results": results, "curves": None, "predictions": preds} | kwargs
        with pytest.raises(ValueError, match=match):
            write_report(tmp_path, **args)


def test_import_and_report_leave_pyplot_alone(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "from fusion.metrics import compute_metrics\n"
        "from fusion.predictions import Predictions\n"
        "from fusion.report import write_report\n"
        "p = Predictions(['a', 'b', 'c'], [1, 0, 1], [1.0, -1.0, 0.5])\n"
        f"write_report({str(tmp_path)!r}, {{'m': compute_metrics(p.labels, p.probabilities)}}, None, {{'m': p}})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "roc.png").exists()
