import json

import pytest
from typer.testing import CliRunner

import fusion.presets as presets
import streams.features as features
from cli.app import app
from fusion.presets import CPU, GPU, choose_preset, with_changes

runner = CliRunner()

# The CPU preset cut down to seconds: 24 tiny clips, 4 steps of 32 px, one feature view, 3 epochs.
TINY = with_changes(
    CPU,
    synthetic_videos=24,
    synthetic_recordings=6,
    size=32,
    steps=4,
    clip_size=32,
    flow_stack=2,
    views=1,
    minority_views=1,
    epochs=3,
    batch_size=8,
    lstm_hidden=8,
    attention_heads=2,
    dense_units=(8, 4),
)


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_presets():
    assert choose_preset("cpu") is CPU and choose_preset("gpu") is GPU and choose_preset(TINY) is TINY
    assert choose_preset("auto").name in ("cpu", "gpu")
    cfg = CPU.run_config(epochs=7)
    assert cfg.train.epochs == 7 and cfg.train.stage == "head" and cfg.model.backbone == CPU.backbone
    assert GPU.run_config().train.stage == "both" and GPU.tta > 1
    assert CPU.extract_config().sampling.size == CPU.size
    with pytest.raises(ValueError, match="unknown preset"):
        choose_preset("tpu")


@pytest.mark.slow
def test_run_end_to_end_then_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "CPU", TINY)
    out = tmp_path / "run"
    res = _run("run", "--out", out, "--preset", "cpu")
    assert res.exit_code == 0, res.output
    for path in ("data/groups.csv", "manifest.csv", "store.h5", "rgb/best.pt", "flow/best.pt",
                 "rgb/predictions_test.csv", "flow/predictions_val.csv", "fusion.json",
                 "eval/metrics.json", "eval/report.md", "eval/roc.png"):
        assert (out / path).is_file(), path
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"rgb", "flow", "fused"}
    assert "fused" in res.output and f"report: {out / 'eval' / 'report.md'}" in res.output.replace("\n", "")
    assert "fused vs rgb: right where rgb is wrong on" in res.output and "fused vs flow:" in res.output

    # A second run finds every step done and only re-evaluates.
    mtime = (out / "flow" / "best.pt").stat().st_mtime
    res = _run("run", "--out", out, "--preset", "cpu")
    assert res.exit_code == 0, res.output
    assert "rgb reused, flow reused" in res.output
    assert "0 written, 24 reused" in res.output
    assert (out / "flow" / "best.pt").stat().st_mtime == mtime

    # Other settings or another dataset in the same folder are refused, not taken for done.
    (tmp_path / "elsewhere").mkdir()
    for args, message in ((("--epochs", "5"), "trained with other settings (train.epochs (3 -> 5))"),
                          ((tmp_path / "elsewhere",), "holds the job of the embedded synthetic dataset")):
        res = _run("run", *args, "--out", out, "--preset", "cpu")
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert res.exit_code == 2 and len(errors) == 1 and message in errors[0], res.output
    assert (out / "flow" / "best.pt").stat().st_mtime == mtime

    # Once the descriptors change, the finished streams are stale: refused, never reported as new.
    monkeypatch.setattr(features, "HOGHOF_VERSION", features.HOGHOF_VERSION + 1)
    for args in (("run", "--out", out, "--preset", "cpu"), ("evaluate", out)):
        res = _run(*args)
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert res.exit_code == 2 and len(errors) == 1 and "predictions are stale" in errors[0], res.output
    assert (out / "flow" / "best.pt").stat().st_mtime == mtime

    # A video gone from the dataset: the manifest, store and streams are of the old one.
    next((out / "data").rglob("*.mp4")).unlink()
    res = _run("run", "--out", out, "--preset", "cpu")
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "changed since" in errors[0] and "(1 removed)" in errors[0], res.output


def test_run_with_a_missing_dataset(tmp_path):
    res = _run("run", tmp_path / "nowhere", "--out", tmp_path / "run", "--preset", "cpu")
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not exist" in errors[0]


def test_run_with_a_missing_weights_file_writes_nothing(tmp_path):
    res = _run("run", "--out", tmp_path / "run", "--preset", "gpu", "--weights", tmp_path / "no.pth")
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "weights file not found" in errors[0]
    assert not (tmp_path / "run").exists()


def test_run_with_tta_zero(tmp_path):
    res = _run("run", "--out", tmp_path / "run", "--tta", "0")
    assert res.exit_code == 2 and "--tta must be at least 1" in res.output
