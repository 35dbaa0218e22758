from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from fusion.predictions import load_split
from streams.config import ModelConfig
from streams.features import FeatureDataset
from streams.heads import build_head, masked_statistics
from streams.launch import train_stream
from streams.logistic import LogisticHead, fit_logistic
from streams.rundir import RunDir
from tests.streams.test_train import make_data, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = ModelConfig(head="logistic", dense_units=(4,), logistic_c=0.3)


def _clips(n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 6, 5))
    x[y == 1, :, 0] += 1.0  # a shifted mean
    x[y == 1, :, 1] *= 2.0  # a larger spread
    x[:, :, 2] *= 100.0  # a feature on another scale
    return torch.tensor(x, dtype=torch.float32), y


def test_the_head_is_scikit_learns_logistic_regression_on_standardised_statistics():
    x, y = _clips(60)
    head = fit_logistic(build_head(CFG, 5), x, y, CFG.logistic_c).eval()
    assert isinstance(head, LogisticHead) and bool(head.initialized)
    stats = masked_statistics(x.double()).numpy()
    z = (stats - stats.mean(0)) / (stats.std(0) + 1e-3)
    expected = LogisticRegression(C=0.3, class_weight="balanced", max_iter=10_000).fit(z, y).decision_function(z)
    with torch.no_grad():
        np.testing.assert_allclose(head(x).numpy(), expected, atol=1e-4)
        # The embedding carries the decision value in its first unit; the logit reads it out.
        np.testing.assert_allclose(head.embed(x)[:, 0].numpy(), expected - head.out.bias.item(), atol=1e-4)
    # A weaker penalty fits the training clips at least as well.
    loose = fit_logistic(build_head(CFG, 5), x, y, 100.0).eval()
    with torch.no_grad():
        assert ((loose(x) > 0).numpy() == y).mean() >= ((head(x) > 0).numpy() == y).mean()


def test_the_fitted_head_survives_a_state_dict_round_trip():
    x, y = _clips(40, seed=1)
    head = fit_logistic(build_head(CFG, 5), x, y, 1.0).eval()
    again = build_head(CFG, 5)
    again.load_state_dict(head.state_dict())
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), head(x))


@pytest.mark.parametrize("labels, message", [(np.zeros(8, np.int64), "both classes"),
                                             (np.arange(7) % 2, "one label per clip")])
def test_bad_training_sets(labels, message):
    x, _ = _clips(8)
    with pytest.raises(ValueError, match=message):
        fit_logistic(build_head(CFG, 5), x, labels, 1.0)


def test_training_a_logistic_head_fits_once_and_writes_a_run(tmp_path):
    store = make_data(tmp_path / "data", n=32, streams=("rgb",))
    runs = []
    for epochs in (1, 9):  # closed form: the epoch count changes nothing
        cfg = tiny_config(epochs=epochs)
        cfg = replace(cfg, model=replace(cfg.model, head="logistic"))
        events = []
        path = train_stream(store, "rgb", tmp_path / f"run{epochs}", cfg, "cpu", on_event=events.append)
        runs.append(path)
        assert [e["epoch"] for e in events if e.get("event") == "epoch"] == [0]
    rd = RunDir(runs[0].parent, "rgb")
    best = rd.load_checkpoint("best")
    assert best["epoch"] == 0 and best["module"] == "head" and best["stage_finished"]
    assert len(rd.read_metrics()) == 1
    other = RunDir(runs[1].parent, "rgb").load_checkpoint("best")
    for name, value in best["model"].items():
        torch.testing.assert_close(other["model"][name], value)

    # The saved head reproduces the run's test predictions from the cached features, and separates the classes.
    cfg, info = rd.read_config()
    test = load_split(runs[0], "test")
    ds = FeatureDataset(info["features"], test.video_ids.tolist())
    head = build_head(cfg.model, ds.feature_dim)
    head.load_state_dict(best["model"])
    head.eval()
    with torch.no_grad():
        logits = head(torch.stack([ds[i]["features"] for i in range(len(ds))])).numpy()
    np.testing.assert_allclose(logits, test.logits, atol=1e-4)
    assert ((logits > 0) == test.labels).mean() >= 0.75


def test_a_logistic_head_is_not_trained_end_to_end_from_scratch():
    from streams.rundir import RunConfig
    from streams.train import TrainConfig

    with pytest.raises(ValueError, match="stage = head or both"):
        RunConfig(train=TrainConfig(stage="finetune"), model=CFG)
    assert RunConfig(train=TrainConfig(stage="both"), model=CFG).model.head == "logistic"
