"""Warm-up + cosine schedule values, restarts, the optimiser adapter and the optimiser config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from streams.config import OptimConfig
from streams.schedule import WarmupCosine, lr_at, set_lr

BASE, MIN = 1e-3, 1e-6


def test_warmup_endpoints():
    assert lr_at(0, 100, BASE, warmup_steps=10, min_lr=MIN) == pytest.approx(BASE / 11)
    assert lr_at(9, 100, BASE, warmup_steps=10, min_lr=MIN) == pytest.approx(BASE * 10 / 11)
    assert lr_at(10, 100, BASE, warmup_steps=10, min_lr=MIN) == pytest.approx(BASE)  # cosine starts at the peak
    warm = [lr_at(s, 100, BASE, 10, MIN) for s in range(11)]
    assert all(a < b for a, b in zip(warm, warm[1:], strict=False))


def test_cosine_midpoint_and_end():
    # 101 decay steps: step 50 is half-way through the cosine.
    assert lr_at(50, 101, BASE, 0, MIN) == pytest.approx((BASE + MIN) / 2)
    assert lr_at(25, 101, BASE, 0, MIN) == pytest.approx(MIN + (BASE - MIN) * (1 + 2**-0.5) / 2)
    assert lr_at(100, 101, BASE, 0, MIN) == pytest.approx(MIN)  # the last step runs at the floor
    assert lr_at(500, 101, BASE, 0, MIN) == pytest.approx(MIN)  # and it stays there


def test_decay_is_monotone_without_restarts():
    lrs = [lr_at(s, 60, BASE, 6, MIN) for s in range(6, 60)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert min(lrs) == pytest.approx(MIN)


def test_warm_restarts():
    lrs = [lr_at(s, 110, BASE, warmup_steps=10, min_lr=MIN, restarts=1) for s in range(110)]
    # Two cycles of 50 steps after the warm-up: peaks at 10 and 60, floors at 59 and 109.
    assert lrs[10] == pytest.approx(BASE) and lrs[60] == pytest.approx(BASE)
    assert lrs[59] == pytest.approx(MIN) and lrs[109] == pytest.approx(MIN)
    assert lrs[35] == pytest.approx(lrs[85])
    assert sum(lrs[s + 1] > lrs[s] * 1.5 for s in range(10, 109)) == 1  # exactly one restart


def test_restarts_with_uneven_cycles_cover_every_step():
    lrs = [lr_at(s, 10, BASE, 0, MIN, restarts=2) for s in range(10)]  # cycles of 3, 3, 4 steps
    assert [i for i, lr in enumerate(lrs) if lr == pytest.approx(BASE)] == [0, 3, 6]
    assert [i for i, lr in enumerate(lrs) if lr == pytest.approx(MIN)] == [2, 5, 9]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(step=-1, total_steps=10), "step >= 0"),
        (dict(step=0, total_steps=10, warmup_steps=10), "warmup_steps"),
        (dict(step=0, total_steps=10, min_lr=1.0), "min_lr"),
        (dict(step=0, total_steps=10, restarts=10), "restarts"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr_at(base_lr=BASE, **kwargs)


def test_set_lr_keeps_group_ratios():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3, "lr_scale": 1.0}, {"params": [b], "lr": 1e-4, "lr_scale": 0.1}])
    set_lr(opt, 5e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 5e-5])


def test_set_lr_infers_ratios_from_initial_rates():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 2e-3}, {"params": [b], "lr": 5e-4}])
    set_lr(opt, 1.0)
    set_lr(opt, 0.5)  # ratios are fixed on the first call, not re-derived from the changed rates
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.125])


def test_warmup_cosine_drives_the_optimiser():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.0, "lr_scale": 1.0}])
    sched = WarmupCosine(opt, total_steps=20, base_lr=BASE, warmup_steps=4, min_lr=MIN)
    for step in range(20):
        lr = sched.step(step)
        assert opt.param_groups[0]["lr"] == lr == lr_at(step, 20, BASE, 4, MIN)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(opt, total_steps=5, base_lr=BASE, warmup_steps=5)


class TestOptimConfig:
    def test_defaults_follow_the_report(self):
        cfg = OptimConfig()
        assert (cfg.optimizer, cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.grad_clip) == ("adamw", 1e-3, 1e-6, 1e-4, 1.0)
        assert cfg.stage_lr(1) == pytest.approx(1e-3)
        assert cfg.stage_lr(2) == pytest.approx(1e-4)  # 10x smaller
        assert cfg.stage_lr(2) * cfg.backbone_lr_factor == pytest.approx(1e-5)  # the report's fine-tuning rate
        assert cfg.warmup_steps(100) == 10

    def test_round_trip(self):
        cfg = OptimConfig(lr=3e-4, betas=(0.8, 0.99), restarts=2)
        d = cfg.to_dict()
        assert d["betas"] == [0.8, 0.99]
        assert OptimConfig.from_dict(d) == cfg

    @pytest.mark.parametrize("d, message", [({"learning_rate": 1}, "learning_rate"), ({"betas": [0.9]}, "2 items"),
                                            ({"optimizer": "sgd"}, "adamw, adam"), ({"min_lr": 1.0}, "min_lr"),
                                            ({"warmup_fraction": 1.0}, "warmup_fraction")])
    def test_bad_values(self, d, message):
        with pytest.raises(ValueError, match=message):
            OptimConfig.from_dict(d)

    def test_stage_must_be_1_or_2(self):
        with pytest.raises(ValueError, match="stage must be 1 or 2"):
            OptimConfig().stage_lr(3)
