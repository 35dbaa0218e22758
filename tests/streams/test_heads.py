"""The statistics-pooling head: pooled statistics, masks, its data-dependent affine, gradients, learning."""

from __future__ import annotations

import pytest
import torch

from streams.config import ModelConfig
from streams.heads import StatsPoolHead, build_head, masked_statistics

CFG = ModelConfig(head="stats_pool", dense_units=(32, 16), dropout=0.5)


def _mask(lengths: list[int], t: int) -> torch.Tensor:
    return torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]  # (N, T)


class TestMaskedStatistics:
    def test_known_values(self):
        x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]]])  # (1, 3, 2)
        mean, std, peak, change = masked_statistics(x, eps=0.0).split(2, dim=1)
        torch.testing.assert_close(mean, torch.tensor([[2.0, 2.0]]))
        torch.testing.assert_close(std, torch.tensor([[(2 / 3) ** 0.5, (8 / 3) ** 0.5]]))
        torch.testing.assert_close(peak, torch.tensor([[3.0, 4.0]]))
        torch.testing.assert_close(change, torch.tensor([[1.5, 2.0]]))

    def test_padding_is_ignored_even_when_infinite(self):
        torch.manual_seed(0)
        x = torch.randn(3, 5, 4)
        lengths = [5, 3, 1]
        mask = _mask(lengths, 5)
        garbage = x.masked_fill(~mask[..., None], float("inf"))
        pooled = masked_statistics(garbage, mask)
        alone = torch.cat([masked_statistics(x[i : i + 1, :n]) for i, n in enumerate(lengths)])
        torch.testing.assert_close(pooled, alone)
        # One step: no spread beyond eps and no change.
        torch.testing.assert_close(pooled[2, 4:8], torch.full((4,), 1e-3))
        torch.testing.assert_close(pooled[2, 12:], torch.zeros(4))

    def test_no_gradient_reaches_padding(self):
        x = torch.randn(2, 4, 3, requires_grad=True)
        mask = _mask([4, 2], 4)
        masked_statistics(x, mask).sum().backward()
        assert torch.isfinite(x.grad).all()
        assert x.grad[1, 2:].abs().sum() == 0
        assert x.grad[1, :2].abs().sum() > 0


class TestStatsPoolHead:
    def test_shapes_and_interface(self):
        head = build_head(CFG, 7)
        assert isinstance(head, StatsPoolHead)
        x = torch.randn(5, 6, 7)
        head.eval()
        with torch.no_grad():
            logits, emb = head(x), head.embed(x)
        assert logits.shape == (5,)
        assert emb.shape == (5, CFG.embed_dim) and head.embed_dim == CFG.embed_dim
        torch.testing.assert_close(logits, head.out(head.dropout(emb)).squeeze(-1))

    def test_padding_does_not_change_the_output_after_training_starts(self):
        torch.manual_seed(0)
        head = build_head(CFG, 6).train()
        head(torch.randn(8, 5, 6) * 3 + 1)  # the first training batch initialises the affine
        head.eval()
        x = torch.randn(3, 5, 6)
        lengths = [5, 3, 2]
        mask = _mask(lengths, 5)
        with torch.no_grad():
            padded = head(x.masked_fill(~mask[..., None], 1e3), mask)
            alone = torch.stack([head(x[i : i + 1, :n])[0] for i, n in enumerate(lengths)])
            unmasked = head(x.masked_fill(~mask[..., None], 1e3))
        torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(unmasked[1:], alone[1:], atol=1e-3)

    def test_first_training_batch_standardises_the_statistics(self):
        torch.manual_seed(0)
        head = build_head(CFG, 4)
        scales = torch.tensor([0.01, 1.0, 100.0, 5.0])
        x = torch.randn(64, 8, 4) * scales + 2.0
        with torch.no_grad():
            head.eval()
            head(x)
            assert not bool(head.initialized)  # evaluation never initialises
            head.train()
            head(x)
            assert bool(head.initialized)
            z = (masked_statistics(x) - head.shift) * head.log_scale.exp()
            torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-4, rtol=0)
            assert (z.std(0, unbiased=False) > 0.5).all() and (z.std(0, unbiased=False) < 1.01).all()
            shift = head.shift.clone()
            head(x * 10)  # later batches train the affine; they do not re-initialise it
            torch.testing.assert_close(head.shift, shift)

    def test_initialisation_survives_a_state_dict_round_trip(self):
        head = build_head(CFG, 3).train()
        head(torch.randn(4, 5, 3) + 7)
        copy = build_head(CFG, 3)
        copy.load_state_dict(head.state_dict())
        assert bool(copy.initialized)
        torch.testing.assert_close(copy.shift, head.shift)

    def test_every_parameter_gets_a_gradient(self):
        torch.manual_seed(0)
        head = build_head(CFG, 5).train()
        x = torch.randn(6, 4, 5)
        head(x, _mask([4, 4, 3, 2, 1, 4], 4)).sum().backward()
        for name, p in head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    @pytest.mark.parametrize("mask, message", [
        (torch.tensor([[True, False, True]]), "prefix"),
        (torch.tensor([[False, False, False]]), "no valid step"),
    ])
    def test_bad_masks_are_value_errors(self, mask, message):
        with pytest.raises(ValueError, match=message):
            build_head(CFG, 2)(torch.randn(1, 3, 2), mask)

    def test_rejects_features_without_time_axis(self):
        with pytest.raises(ValueError, match=r"\(N, T, D\)"):
            build_head(CFG, 2)(torch.randn(3, 2))

    def test_learns_a_tiny_separable_problem(self):
        # Both classes take the same values, half +0.05 and half -0.05 around 1 (same mean, spread
        # and max); the violent one alternates every step, the other switches once, so only the
        # temporal-change statistic separates them.
        gen = torch.Generator().manual_seed(0)
        alternating = torch.tensor([1.0, -1.0] * 4)[None, :, None]  # (1, T, 1)
        switching = torch.tensor([1.0] * 4 + [-1.0] * 4)[None, :, None]

        def clips(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(n) % 2
            noise = 0.01 * torch.rand(n, 8, 3, generator=gen)
            swing = torch.where(y[:, None, None] == 1, alternating, switching)
            return 1.0 + 0.05 * swing + noise, y.float()

        torch.manual_seed(0)
        head = build_head(ModelConfig(head="stats_pool", dense_units=(8,), dropout=0.1), 3).train()
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        x, y = clips(48)
        for _ in range(150):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(head(x), y).backward()
            opt.step()
        head.eval()
        x_test, y_test = clips(40)
        with torch.no_grad():
            accuracy = ((head(x_test) > 0).float() == y_test).float().mean()
        assert accuracy == 1.0
