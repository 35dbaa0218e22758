"""Focal loss, BCE, class weights and the loss config against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streams.config import LossConfig
from streams.losses import BCELoss, FocalLoss, bce_loss, build_loss, class_weights, focal_loss

LOGITS = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0])
TARGETS = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_gamma_0_alpha_half_is_half_bce(smoothing):
    fl = focal_loss(LOGITS, TARGETS, alpha=0.5, gamma=0.0, label_smoothing=smoothing)
    soft = TARGETS * (1 - smoothing) + smoothing / 2
    torch.testing.assert_close(fl, 0.5 * F.binary_cross_entropy_with_logits(LOGITS, soft))


def test_hand_computed_gamma_2():
    # Non-violent (0) is the minority: alpha = 0.7 weights label 0, label 1 gets 0.3.
    logits, targets = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    p0, p1 = sigmoid(0.0), sigmoid(2.0)
    violent = 0.3 * (1 - p0) ** 2 * -math.log(p0)  # 0.3 * 0.25 * ln 2
    calm = 0.7 * p1**2 * -math.log(1 - p1)
    expected = (violent + calm) / 2
    assert expected == pytest.approx((0.0519860 + 1.1550548) / 2, rel=1e-6)
    out = focal_loss(logits, targets, alpha=0.7, gamma=2.0, minority_label=0)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_hand_computed_label_smoothing():
    z, e = 0.7, 0.1
    p = sigmoid(z)
    s = 1 * (1 - e) + e / 2  # target 1 -> 0.95
    expected = -(0.3 * s * (1 - p) ** 2 * math.log(p) + 0.7 * (1 - s) * p**2 * math.log(1 - p))
    out = focal_loss(torch.tensor([z]), torch.tensor([1.0]), alpha=0.7, gamma=2.0, label_smoothing=e)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_alpha_weights_the_named_minority():
    z, y = torch.tensor([0.4]), torch.tensor([0.0])
    bce = F.binary_cross_entropy_with_logits(z, y)
    torch.testing.assert_close(focal_loss(z, y, alpha=0.7, gamma=0.0, minority_label=0), 0.7 * bce)
    torch.testing.assert_close(focal_loss(z, y, alpha=0.7, gamma=0.0, minority_label=1), 0.3 * bce)


def test_focusing_down_weights_easy_examples():
    easy, hard = torch.tensor([4.0]), torch.tensor([-1.0])
    y = torch.tensor([1.0])
    ratio = lambda g: (focal_loss(easy, y, 0.5, g) / focal_loss(hard, y, 0.5, g)).item()  # noqa: E731
    assert ratio(2.0) < ratio(0.0) / 10


def test_class_weights_multiply_per_sample_and_mean_over_batch():
    w = torch.tensor([2.0, 0.5])
    per = focal_loss(LOGITS, TARGETS, reduction="none")
    weighted = focal_loss(LOGITS, TARGETS, class_weight=w, reduction="none")
    torch.testing.assert_close(weighted, per * torch.where(TARGETS == 1, 0.5, 2.0))
    torch.testing.assert_close(focal_loss(LOGITS, TARGETS, class_weight=w), weighted.sum() / 5)
    torch.testing.assert_close(bce_loss(LOGITS, TARGETS, class_weight=w, reduction="sum"),
                               (F.binary_cross_entropy_with_logits(LOGITS, TARGETS, reduction="none")
                                * torch.where(TARGETS == 1, 0.5, 2.0)).sum())


def test_soft_targets_interpolate_class_weights():
    w = torch.tensor([2.0, 0.5])
    z, y = torch.tensor([0.3]), torch.tensor([0.25])  # a mixup target
    plain = bce_loss(z, y, reduction="none")
    torch.testing.assert_close(bce_loss(z, y, class_weight=w, reduction="none"), plain * (0.25 * 0.5 + 0.75 * 2.0))


def test_extreme_logits_stay_finite():
    z = torch.tensor([-100.0, 100.0, -100.0, 100.0], requires_grad=True)
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    loss = focal_loss(z, y, label_smoothing=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert loss.item() > 10  # the two confident mistakes dominate


def test_gradcheck():
    z = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.float64)
    w = torch.tensor([2.27, 0.64], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: focal_loss(z, y, 0.7, 2.0, 0.1, 0, w), (z,))


def test_class_weights_from_counts():
    # The report's split: 16380 violent, 4620 non-violent.
    labels = np.array([1] * 16380 + [0] * 4620)
    torch.testing.assert_close(class_weights(labels), torch.tensor([21000 / 9240, 21000 / 32760]))
    torch.testing.assert_close(class_weights(torch.tensor([1, 1, 1, 0])), torch.tensor([2.0, 2 / 3]))


@pytest.mark.parametrize("labels, message", [([1, 1], "only class 1"), ([0, 2], "0 or 1"), ([], "at least one")])
def test_class_weights_errors(labels, message):
    with pytest.raises(ValueError, match=message):
        class_weights(labels)


def test_modules_equal_functions():
    w = torch.tensor([1.5, 0.7])
    torch.testing.assert_close(FocalLoss(0.6, 1.5, 0.1, 1, w)(LOGITS, TARGETS),
                               focal_loss(LOGITS, TARGETS, 0.6, 1.5, 0.1, 1, w))
    torch.testing.assert_close(BCELoss(0.1, w)(LOGITS, TARGETS), bce_loss(LOGITS, TARGETS, 0.1, w))
    assert "class_weight" in dict(FocalLoss(class_weight=w).named_buffers())  # follows .to(device)


def test_build_loss_from_config():
    labels = [0, 1, 1, 1]
    loss = build_loss(LossConfig(), labels)
    assert isinstance(loss, FocalLoss) and loss.alpha == 0.7 and loss.gamma == 2.0
    torch.testing.assert_close(loss.class_weight, torch.tensor([2.0, 2 / 3]))
    bce = build_loss(LossConfig(kind="bce", class_weights="none"))
    assert isinstance(bce, BCELoss) and bce.class_weight is None
    with pytest.raises(ValueError, match="training labels"):
        build_loss(LossConfig())


def test_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        focal_loss(torch.zeros(3), torch.zeros(3, 1))


class TestLossConfig:
    def test_defaults_follow_the_report(self):
        cfg = LossConfig()
        assert (cfg.kind, cfg.alpha, cfg.gamma, cfg.label_smoothing, cfg.class_weights, cfg.minority_label) == (
            "focal", 0.7, 2.0, 0.1, "balanced", 0)

    def test_round_trip(self):
        cfg = LossConfig(kind="bce", class_weights="none", label_smoothing=0.0)
        assert LossConfig.from_dict(cfg.to_dict()) == cfg
        assert LossConfig.from_dict({"class_weights": None}).class_weights == "none"

    @pytest.mark.parametrize("d, message", [({"gama": 2}, "gama"), ({"alpha": 1.5}, r"\[0, 1\]"),
                                            ({"kind": "mse"}, "focal, bce"), ({"minority_label": 2}, "0, 1")])
    def test_bad_values(self, d, message):
        with pytest.raises(ValueError, match=message):
            LossConfig.from_dict(d)
