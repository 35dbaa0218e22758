import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from fusion.predictions import load_split
from streams.checkpoint import load_checkpoint
from streams.rundir import read_toml
from tests.streams.test_train import make_data

runner = CliRunner()
# A tiny head, stage 1 only, on the 4-step 16-d features make_data writes.
TINY = ["--stage", "head", "--epochs", "2", "--batch-size", "8", "--steps", "4", "--workers", "0",
        "--patience", "0"]


@pytest.fixture()
def config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text("[model]\nlstm_layers = 1\nlstm_hidden = 8\nattention_heads = 2\ndense_units = [8]\n"
                    "dropout = 0.0\nlstm_dropout = 0.0\n\n[train]\nepochs = 5\npatience = 3\n")
    return path


def _train(store, out, config, *extra):
    return runner.invoke(app, ["train", str(store), "--out", str(out), "--config", str(config), *TINY, *extra])


def test_both_streams_on_two_cpu_processes(tmp_path, config, monkeypatch):
    import functools

    import streams.launch

    # Forked children skip re-importing torch and the project; the failure test below spawns.
    monkeypatch.setattr(streams.launch, "train_both", functools.partial(streams.launch.train_both,
                                                                        start_method="fork"))
    store = make_data(tmp_path / "data", n=16)
    result = _train(store, tmp_path / "run", config, "--stream", "both", "--devices", "cpu,cpu")
    assert result.exit_code == 0, result.output
    for stream in ("rgb", "flow"):
        folder = tmp_path / "run" / stream
        assert len(load_split(folder, "val")) == 4 and len(load_split(folder, "test")) == 4
        assert load_checkpoint(folder / "best.pt")["config"]["train"]["threads"] >= 1  # cores split in two
        assert "training failed" not in (folder / "train.log").read_text()
    assert "rgb" in result.output and "flow" in result.output


def test_one_stream_failing_keeps_the_other(tmp_path, config):
    store = make_data(tmp_path / "data", n=16, poison={"flow": np.nan})
    result = _train(store, tmp_path / "run", config, "--stream", "both", "--devices", "cpu,cpu")
    assert result.exit_code == 1
    assert len(load_split(tmp_path / "run" / "rgb", "test")) == 4
    log = tmp_path / "run" / "flow" / "train.log"
    assert "error: the flow stream failed: non-finite loss in stage 1 (head) at epoch 0, step 0" in result.output
    assert f"(log: {log})" in result.output
    assert "NonFiniteLossError" in log.read_text()  # the traceback is in the stream's log


def test_options_override_the_config_file_and_the_result_is_saved(tmp_path, config):
    store = make_data(tmp_path / "data", n=12, streams=("rgb",))
    result = _train(store, tmp_path / "run", config, "--stream", "rgb", "--devices", "cpu", "--seed", "3")
    assert result.exit_code == 0, result.output
    saved = read_toml(tmp_path / "run" / "rgb" / "config.toml")
    assert saved["train"]["epochs"] == 2  # option beats file
    assert saved["train"]["patience"] == 0 and saved["train"]["seed"] == 3
    assert saved["model"]["lstm_hidden"] == 8  # file beats default
    assert saved["train"]["finetune_epochs"] == 2  # --epochs sets every stage


def test_resume_continues_and_refuses_a_fresh_start_over_a_run(tmp_path, config):
    store = make_data(tmp_path / "data", n=12, streams=("rgb",))
    args = ("--stream", "rgb", "--devices", "cpu")
    missing = _train(store, tmp_path / "run", config, *args, "--resume")
    assert missing.exit_code == 2 and "nothing to resume" in missing.output
    assert _train(store, tmp_path / "run", config, *args).exit_code == 0
    again = _train(store, tmp_path / "run", config, *args)
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = _train(store, tmp_path / "run", config, *args, "--resume")
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.parametrize("stream", ["rgb", "both"])
def test_single_class_training_split_exits_2(tmp_path, config, stream):
    labels = [1 if i % 4 in (0, 1) else i % 2 for i in range(12)]
    store = make_data(tmp_path / "data", n=12, labels=labels)
    result = _train(store, tmp_path / "run", config, "--stream", stream, "--devices", "cpu")
    assert result.exit_code == 2
    assert "error: the training split holds only label 1" in result.output
    assert "Traceback" not in result.output


def test_nan_loss_exits_1_naming_the_batch(tmp_path, config):
    store = make_data(tmp_path / "data", n=12, streams=("rgb",), poison={"rgb": np.inf})
    result = _train(store, tmp_path / "run", config, "--stream", "rgb", "--devices", "cpu")
    assert result.exit_code == 1
    assert "non-finite loss in stage 1 (head) at epoch 0, step 0, batch of videos [v" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--fold", "5/5"], "need K >= 2 and 0 <= k < K"),
    (["--devices", "cpu,cpu,cpu"], "2 comma-separated devices"),
])
def test_bad_options_exit_2(tmp_path, config, args, message):
    store = make_data(tmp_path / "data", n=8, streams=())
    result = _train(store, tmp_path / "run", config, "--stream", "both", *args)
    assert result.exit_code == 2 and message in result.output


def test_missing_store_names_the_command_that_makes_it(tmp_path, config):
    result = _train(tmp_path / "none.h5", tmp_path / "run", config, "--stream", "flow")
    assert result.exit_code == 2
    assert "twostream extract" in result.output and "Traceback" not in result.output


def test_negative_seed_names_the_option(tmp_path, config):
    store = make_data(tmp_path / "data", n=8, streams=("rgb",))
    result = _train(store, tmp_path / "run", config, "--stream", "rgb", "--seed", "-5")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: --seed must be a non-negative integer, got -5" in result.output.splitlines()
