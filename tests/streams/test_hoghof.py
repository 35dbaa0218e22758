"""The hand-crafted HOG/HOF encoder: known values, invariances, and its place among the backbones."""

from __future__ import annotations

import math

import pytest
import torch

from streams.backbones import build_backbone
from streams.config import ModelConfig
from streams.hoghof import (
    CHANGE_STATS,
    GREY_LEVEL,
    MOTION_STATS,
    TEMPORAL_BANDS,
    HogHof,
    frame_difference_features,
    hof_features,
    motion_boundary_histograms,
    oriented_histograms,
    step_differences,
    temporal_bands,
)
from streams.model import build_stream_model

GRID = 4
HOF, CELLS = 8, GRID * GRID  # global orientation bins, sorted cell magnitudes
MAG_HIST = HOF + CELLS  # first of the 9 magnitude-histogram bins
STATS = MAG_HIST + 9  # mean, std, max, p90, std dx, std dy, |div|, |curl|, change
DRIFT = STATS + 9  # mean dx, mean dy
MBH = HOF + CELLS + MOTION_STATS  # first of the 2 x 8 motion boundary bins (MBHx, then MBHy)
FLOW_DIM = MBH + 2 * HOF
MEAN_CHANGE, MEAN_ACCEL, SPEED, ABRUPT, LIGHTING = (TEMPORAL_BANDS + i for i in (0, 3, 4, 5, 6))
RGB_DIM = TEMPORAL_BANDS + CHANGE_STATS


def _uniform_flow(n: int, fields: int, dx: float, dy: float, side: int = 16) -> torch.Tensor:
    """(n, 2 * fields, side, side) stacks where every field moves every pixel by (dx, dy)."""
    one = torch.tensor([dx, dy]).repeat(fields)[None, :, None, None]
    return one.expand(n, -1, side, side).clone()


def _ramp(angle: float, side: int = 16) -> torch.Tensor:
    """A (1, 3, side, side) image whose intensity grows along `angle` (radians, y down)."""
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                          indexing="ij")
    return (x * math.cos(angle) + y * math.sin(angle)).expand(1, 3, side, side).clone()


class TestOrientedHistograms:
    @pytest.mark.parametrize("signed, bins, k", [(True, 8, 0), (True, 8, 5), (False, 9, 2), (False, 9, 8)])
    def test_a_vector_at_a_bin_centre_votes_its_length_into_that_bin(self, signed, bins, k):
        period = 2 * math.pi if signed else math.pi
        angle = (k + 0.5) * period / bins
        dx = torch.full((1, 8, 8), 3.0 * math.cos(angle))
        dy = torch.full((1, 8, 8), 3.0 * math.sin(angle))
        hist = oriented_histograms(dx, dy, grid=2, bins=bins, signed=signed)
        expected = torch.zeros(1, 2, 2, bins)
        expected[..., k] = 3.0
        torch.testing.assert_close(hist, expected)

    def test_an_angle_between_two_centres_splits_its_vote(self):
        hist = oriented_histograms(torch.ones(1, 4, 4), torch.zeros(1, 4, 4), grid=1, bins=8, signed=True)
        # Angle 0 lies halfway between the centres of bin 7 (-22.5 deg) and bin 0 (22.5 deg).
        torch.testing.assert_close(hist[0, 0, 0], torch.tensor([0.5, 0, 0, 0, 0, 0, 0, 0.5]))

    def test_unsigned_orientations_fold_opposite_vectors_together(self):
        dx, dy = torch.full((1, 4, 4), 0.3), torch.full((1, 4, 4), 0.7)
        forward = oriented_histograms(dx, dy, 1, 9, signed=False)
        torch.testing.assert_close(oriented_histograms(-dx, -dy, 1, 9, signed=False), forward)
        assert not torch.allclose(oriented_histograms(-dx, -dy, 1, 8, signed=True),
                                  oriented_histograms(dx, dy, 1, 8, signed=True))

    def test_cells_only_see_their_own_pixels(self):
        dx = torch.zeros(1, 8, 8)
        dx[0, :4, :4] = 2.0  # motion in the top-left cell only
        hist = oriented_histograms(dx, torch.zeros_like(dx), grid=2, bins=8, signed=True)
        assert hist[0, 0, 0].sum().item() == pytest.approx(2.0)
        assert hist[0, 0, 1].sum() == 0 and hist[0, 1, 0].sum() == 0 and hist[0, 1, 1].sum() == 0

    def test_mismatched_fields_are_refused(self):
        with pytest.raises(ValueError, match="dx and dy"):
            oriented_histograms(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5), 2, 8, True)


class TestHof:
    def test_still_footage_gives_no_motion(self):
        feats = hof_features(torch.zeros(2, 4, 16, 16))
        assert feats.shape == (2, FLOW_DIM)
        assert feats[:, :MAG_HIST].abs().sum() == 0  # no orientation votes, no moving cell
        torch.testing.assert_close(feats[:, MAG_HIST:STATS], torch.eye(9)[[0, 0]])  # every pixel in the lowest bin
        assert feats[:, STATS:].abs().sum() == 0  # statistics and drift vanish

    def test_faster_motion_moves_pixels_to_higher_magnitude_bins_and_raises_the_mean(self):
        slow, fast = hof_features(_uniform_flow(1, 2, 0.01, 0.0)), hof_features(_uniform_flow(1, 2, 0.1, 0.0))
        bin_of = lambda f: int(f[0, MAG_HIST:STATS].argmax())  # noqa: E731
        assert bin_of(fast) > bin_of(slow)
        assert fast[0, STATS] > slow[0, STATS] > 0

    def test_motion_votes_for_its_direction(self):
        down = hof_features(_uniform_flow(1, 2, 0.0, 0.05))[0, :HOF]  # angle 90 deg: bins 1 and 2 share it
        assert down[1] == pytest.approx(down[2].item()) and down[1] > 0
        assert down[[0, 3, 4, 5, 6, 7]].abs().sum() == 0

    def test_drift_follows_the_direction_of_motion(self):
        right_down = hof_features(_uniform_flow(1, 2, 0.02, 0.01))[0, DRIFT:DRIFT + 2]
        left_up = hof_features(_uniform_flow(1, 2, -0.02, -0.01))[0, DRIFT:DRIFT + 2]
        assert (right_down > 0).all()
        torch.testing.assert_close(left_up, -right_down)

    def test_moving_the_action_elsewhere_in_the_frame_changes_nothing(self):
        here = torch.zeros(1, 4, 16, 16)
        here[:, :, 4:8, 4:8] = torch.randn(1, 4, 4, 4) * 0.05  # motion inside one grid cell
        there = torch.roll(here, shifts=(4, 4), dims=(2, 3))  # another cell, also clear of the borders
        torch.testing.assert_close(hof_features(there), hof_features(here))

    def test_concentrated_motion_differs_from_the_same_amount_spread_out(self):
        spread = torch.full((1, 2, 16, 16), 0.01)
        concentrated = torch.zeros(1, 2, 16, 16)
        concentrated[:, :, :4, :4] = 0.16  # the same total motion, in one cell
        cells = lambda f: hof_features(f)[0, HOF:MAG_HIST]  # noqa: E731
        assert cells(concentrated)[0] > cells(spread)[0] and cells(concentrated)[-1] < cells(spread)[-1]

    def test_irregular_motion_within_a_stack_shows_as_change(self):
        steady = _uniform_flow(1, 2, 0.02, 0.0)
        jerky = steady.clone()
        jerky[:, 2] = -0.02  # the second field reverses
        assert hof_features(steady)[0, STATS + 8] == 0
        assert hof_features(jerky)[0, STATS + 8] > 0

    def test_a_rotating_field_has_curl_and_no_divergence(self):
        y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        rotation = torch.stack([-(y - 7.5), x - 7.5])[None] * 1e-3  # (1, 2, 16, 16)
        feats = hof_features(rotation)
        divergence, curl = feats[0, STATS + 6], feats[0, STATS + 7]
        assert curl > 0 and divergence.abs() < 1e-6

    def test_each_clip_is_described_on_its_own(self):
        batch = torch.randn(3, 4, 16, 16) * 0.02
        alone = torch.cat([hof_features(batch[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(hof_features(batch), alone)

    def test_an_odd_channel_count_is_refused(self):
        with pytest.raises(ValueError, match="2L"):
            hof_features(torch.zeros(1, 3, 8, 8))


class TestMotionBoundaries:
    @staticmethod
    def _square(shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
        """(1, 4, 16, 16): a square moving right by 0.05 in both fields, on a background moving by `shift`."""
        flow = torch.zeros(1, 2, 2, 16, 16)
        flow[:, :, 0] += shift[0]
        flow[:, :, 1] += shift[1]
        flow[:, :, 0, 5:11, 5:11] += 0.05
        return flow.reshape(1, 4, 16, 16)

    def test_a_motion_shared_by_the_whole_frame_has_no_boundaries(self):
        pan = hof_features(_uniform_flow(1, 2, 0.03, -0.02))[0]
        assert pan[:HOF].sum() > 0  # HOF sees the pan
        assert pan[MBH:].abs().sum() == 0  # MBH does not

    def test_camera_motion_added_to_an_action_leaves_its_boundaries_unchanged(self):
        still, panning = hof_features(self._square())[0], hof_features(self._square((0.02, 0.01)))[0]
        assert still[MBH:].sum() > 0
        torch.testing.assert_close(panning[MBH:], still[MBH:])
        assert not torch.allclose(panning[:HOF], still[:HOF])

    def test_horizontal_motion_has_boundaries_in_its_dx_component_only(self):
        feats = hof_features(self._square())[0]
        mbh_x, mbh_y = feats[MBH:MBH + HOF], feats[MBH + HOF:]
        assert (mbh_x > 0).all() and mbh_y.abs().sum() == 0  # the square's edges face every way

    def test_a_boundary_votes_for_the_direction_its_flow_grows_in(self):
        flow = torch.zeros(1, 2, 16, 16)
        flow[:, 0, :, 8:] = 0.05  # the right half moves right: dx grows along +x (angle 0)
        mbh_x = hof_features(flow)[0, MBH:MBH + HOF]
        assert mbh_x[0] == pytest.approx(mbh_x[7].item()) and mbh_x[0] > 0  # bins 7 and 0 share angle 0
        assert mbh_x[1:7].abs().sum() == 0

    def test_magnitude_scales_the_votes(self):
        weak = motion_boundary_histograms(*self._gradients(0.01))
        strong = motion_boundary_histograms(*self._gradients(0.04))
        torch.testing.assert_close(strong, 4 * weak)

    @staticmethod
    def _gradients(step: float):
        u = torch.zeros(1, 1, 8, 8)
        u[..., 4:] = step  # a vertical boundary in dx
        zeros = torch.zeros(1, 1, 7, 7)
        du_dx = (u[..., :, 1:] - u[..., :, :-1])[..., :-1, :]
        du_dy = (u[..., 1:, :] - u[..., :-1, :])[..., :, :-1]
        return (du_dx, du_dy), (zeros, zeros)


def _waves(cycles: float, steps: int = 16, amplitude: float = 20 * GREY_LEVEL) -> torch.Tensor:
    """(1, steps, 4, 4) grey clip: half the pixels follow a cosine of `cycles` per clip, half its sine.

    Their mean square is the same at every step, so every step has the same band energies.
    """
    phase = 2 * math.pi * cycles * torch.arange(steps, dtype=torch.float32) / steps
    wave = torch.stack([torch.cos(phase), torch.sin(phase)], dim=1)  # (T, 2)
    return 0.5 + amplitude * wave.repeat_interleave(8, dim=1).view(1, steps, 4, 4)


class TestTemporalBands:
    @pytest.mark.parametrize("cycles, band", [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2), (7, 3)])
    def test_a_wave_puts_its_energy_into_the_band_of_its_frequency(self, cycles, band):
        shares = temporal_bands(_waves(cycles)).exp()  # (1, 16, 4)
        assert shares.shape == (1, 16, TEMPORAL_BANDS)
        others = [k for k in range(TEMPORAL_BANDS) if k != band]
        assert (shares[0, :, band] > 0.999).all() and (shares[0][:, others] < 1e-3).all()

    def test_shares_of_every_step_add_up_to_one_and_a_still_clip_has_equal_ones(self):
        torch.testing.assert_close(temporal_bands(torch.randn(2, 12, 8, 8)).exp().sum(dim=2), torch.ones(2, 12))
        still = temporal_bands(torch.rand(1, 1, 8, 8).expand(2, 6, 8, 8))
        torch.testing.assert_close(still, torch.full((2, 6, TEMPORAL_BANDS), math.log(1 / TEMPORAL_BANDS)))

    def test_slow_drift_sits_low_and_abrupt_flicker_high(self):
        drift = temporal_bands(0.5 + torch.linspace(0, 1, 16)[None, :, None, None].expand(1, 16, 4, 4))
        flicker = temporal_bands(0.5 + torch.tensor([1.0, -1.0] * 8)[None, :, None, None].expand(1, 16, 4, 4))
        assert (drift[0, :, 0].mean() > drift[0, :, 3].mean() + 2) and (flicker[0, :, 3] > math.log(0.999)).all()

    def test_brightness_and_contrast_leave_the_shares_alone(self):
        clip = torch.rand(2, 10, 8, 8)
        torch.testing.assert_close(temporal_bands(3 * clip + 0.7), temporal_bands(3 * clip), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(temporal_bands(3 * clip), temporal_bands(clip), atol=1e-3, rtol=1e-3)

    def test_a_band_with_no_frequency_in_a_short_clip_holds_the_floor(self):
        shares = temporal_bands(_waves(1, steps=4)).exp()  # bins of 1/4 and 2/4 cycles per step: bands 1 and 3
        assert (shares[0, :, [0, 2]] < 1e-4).all() and (shares[0, :, 1] > 0.999).all()

    @pytest.mark.parametrize("steps, cycles, band", [
        (15, 2, 1), (15, 7, 3),  # odd T: 2/15 lies just above the first edge, 7/15 in the last band
        (12, 3, 1), (56, 21, 2), (56, 7, 0),  # bins exactly on an edge (1/4, 3/8, 1/8) stay in the lower band
        (16, 8, 3),  # the Nyquist bin of an even T
    ])
    def test_band_edges_hold_for_any_clip_length(self, steps, cycles, band):
        shares = temporal_bands(_waves(cycles, steps=steps)).exp()
        assert (shares[0, :, band] > 0.999).all()

    def test_a_steady_mix_of_waves_has_the_same_shares_at_every_step_whatever_their_phase(self):
        phase = 2 * math.pi * torch.arange(16.0) / 16
        mix = 0.5 + 20 * GREY_LEVEL * (torch.cos(2 * phase) + torch.cos(6 * phase + 1.0))  # bands 0 and 2
        shares = temporal_bands(mix[None, :, None, None].expand(1, 16, 2, 2)).exp()
        torch.testing.assert_close(shares[0, :, [0, 2]], torch.full((16, 2), 0.5), atol=1e-4, rtol=0)

    def test_empty_batches_short_clips_and_half_precision(self):
        assert temporal_bands(torch.rand(0, 6, 4, 4)).shape == (0, 6, TEMPORAL_BANDS)
        assert frame_difference_features(torch.rand(0, 6, 3, 4, 4)).shape == (0, 6, RGB_DIM)
        one = temporal_bands(torch.rand(2, 1, 4, 4)).exp()  # no frequency at all: equal shares
        torch.testing.assert_close(one, torch.full((2, 1, TEMPORAL_BANDS), 1 / TEMPORAL_BANDS))
        two = temporal_bands(0.5 + torch.tensor([1.0, -1.0])[None, :, None, None].expand(1, 2, 4, 4)).exp()
        assert (two[0, :, 3] > 0.999).all()  # only the Nyquist bin, in the last band
        clip = torch.rand(1, 8, 4, 4)
        half = temporal_bands(clip.to(torch.bfloat16))
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), temporal_bands(clip.to(torch.bfloat16).float()), atol=0.05, rtol=0.01)

    def test_bad_shapes_are_refused(self):
        with pytest.raises(ValueError, match="N, T, H, W"):
            temporal_bands(torch.rand(4, 8, 8))


def _moving_square(steps: int, speed: int, at: int = 2, side: int = 24) -> torch.Tensor:
    """(1, steps, 3, side, side) clip: a bright 6 px square moving right `speed` px per step."""
    clip = torch.zeros(1, steps, 3, side, side)
    for t in range(steps):
        clip[0, t, :, at:at + 6, at + speed * t:at + speed * t + 6] = 50 * GREY_LEVEL
    return clip


class TestStepDifferences:
    def test_each_step_gets_the_change_into_it_and_the_first_step_the_second_steps(self):
        gray = torch.tensor([0.0, 1.0, 3.0, 6.0])[None, :, None, None].expand(1, 4, 2, 2)
        torch.testing.assert_close(step_differences(gray)[0, :, 0, 0], torch.tensor([1.0, 1.0, 2.0, 3.0]))

    @pytest.mark.parametrize("values, expected", [
        ([0, 1, 1, 4], [1, 1, 1, 3]),  # a repeated frame carries the change before it
        ([5, 5, 5, 7], [2, 2, 2, 2]),  # leading repeats take the first real change
        ([2, 2, 2], [0, 0, 0]),  # a still clip has no change at all
    ])
    def test_repeated_frames_carry_a_real_change(self, values, expected):
        gray = torch.tensor(values, dtype=torch.float32)[None, :, None, None].expand(1, len(values), 3, 3)
        torch.testing.assert_close(step_differences(gray)[0, :, 1, 1], torch.tensor(expected, dtype=torch.float32))

    def test_one_step_clips_have_no_change_and_bad_shapes_are_refused(self):
        assert step_differences(torch.rand(2, 1, 4, 4)).abs().sum() == 0
        with pytest.raises(ValueError, match="N, T, H, W"):
            step_differences(torch.rand(2, 4, 4))


class TestFrameDifference:
    def test_a_still_clip_has_no_change(self):
        feats = frame_difference_features(torch.rand(1, 1, 3, 16, 16).expand(2, 4, 3, 16, 16))
        assert feats.shape == (2, 4, RGB_DIM)
        torch.testing.assert_close(feats[..., :TEMPORAL_BANDS], torch.full((2, 4, TEMPORAL_BANDS), math.log(0.25)))
        assert feats[..., TEMPORAL_BANDS:].abs().sum() == 0  # statistics, speed and lighting vanish

    def test_faster_motion_changes_more_of_the_frame(self):
        slow, fast = frame_difference_features(_moving_square(3, 1)), frame_difference_features(_moving_square(3, 3))
        assert fast[0, 1, MEAN_CHANGE] > slow[0, 1, MEAN_CHANGE] > 0

    def test_a_texture_moving_one_pixel_per_step_has_normal_speed_one(self):
        ramp = torch.arange(32.0) * 3 * GREY_LEVEL  # 3 grey levels per pixel along x
        clip = torch.stack([(ramp - t * 3 * GREY_LEVEL).expand(3, 16, 32) for t in range(3)])[None]  # shifts right
        feats = frame_difference_features(clip)
        torch.testing.assert_close(feats[0, :, SPEED], torch.full((3,), math.log(2.0)))

    def test_steady_change_is_not_abrupt_and_jerky_change_is(self):
        base = torch.rand(1, 1, 3, 16, 16)
        levels = lambda steps: torch.tensor(steps)[None, :, None, None, None] * GREY_LEVEL  # noqa: E731
        steady = frame_difference_features(base + levels([0.0, 5, 10, 15, 20]))
        jerky = frame_difference_features(base + levels([0.0, 20, 0, 20, 0]))
        assert steady[0, :, MEAN_ACCEL].abs().max() < 1e-4 and steady[0, :, ABRUPT].abs().max() < 1e-3
        assert (jerky[0, 1:, MEAN_ACCEL] > 3).all() and (jerky[0, 1:, ABRUPT] > 1).all()

    def test_lighting_follows_the_sign_of_a_global_brightness_change(self):
        base = torch.rand(1, 1, 3, 16, 16)
        brighter = frame_difference_features(base + torch.arange(3.0)[None, :, None, None, None] * 4 * GREY_LEVEL)
        darker = frame_difference_features(base - torch.arange(3.0)[None, :, None, None, None] * 4 * GREY_LEVEL)
        torch.testing.assert_close(brighter[0, :, LIGHTING], torch.full((3,), math.asinh(4.0)))
        torch.testing.assert_close(darker[0, :, LIGHTING], -brighter[0, :, LIGHTING])

    def test_moving_the_action_elsewhere_in_the_frame_changes_nothing(self):
        here = _moving_square(4, 2, at=2, side=32)
        there = torch.roll(here, shifts=(16, 8), dims=(3, 4))  # another cell, clear of the borders
        torch.testing.assert_close(frame_difference_features(there), frame_difference_features(here))

    def test_each_clip_is_described_on_its_own(self):
        batch = torch.randn(3, 4, 3, 16, 16)
        alone = torch.cat([frame_difference_features(batch[i:i + 1]) for i in range(3)])
        torch.testing.assert_close(frame_difference_features(batch), alone)


class TestAsBackbone:
    @pytest.mark.parametrize("channels, dim", [(3, RGB_DIM), (4, FLOW_DIM), (10, FLOW_DIM)])
    def test_clips_give_out_dim_features_per_step_for_each_stream(self, channels, dim):
        backbone = build_backbone("hoghof", channels)
        out = backbone.forward_clips(torch.randn(2, 5, channels, 32, 32) * 0.05)
        assert out.shape == (2, 5, dim) and backbone.out_dim == dim and torch.isfinite(out).all()
        assert not list(backbone.parameters())  # nothing to train or to load

    def test_flow_steps_are_described_one_by_one_and_rgb_steps_need_their_clip(self):
        flow = torch.randn(2, 3, 4, 16, 16) * 0.05
        backbone = build_backbone("hoghof", 4)
        torch.testing.assert_close(backbone.forward_clips(flow), backbone(flow.flatten(0, 1)).view(2, 3, -1))
        with pytest.raises(ValueError, match="forward_clips"):
            build_backbone("hoghof", 3)(torch.zeros(4, 3, 16, 16))

    def test_dtype_follows_the_input(self):
        assert build_backbone("hoghof", 4)(torch.zeros(1, 4, 8, 8, dtype=torch.float64)).dtype == torch.float64
        clip = torch.zeros(1, 2, 3, 8, 8, dtype=torch.float64)
        assert build_backbone("hoghof", 3).forward_clips(clip).dtype == torch.float64

    @pytest.mark.parametrize("kwargs, match", [({"pretrained": True}, "no weights"),
                                               ({"weights_path": "w.pth"}, "no weights"),
                                               ({"in_channels": 5}, "2L channels")])
    def test_bad_requests_are_one_line_errors(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            build_backbone("hoghof", **{"in_channels": 3, **kwargs})

    @pytest.mark.parametrize("channels", [3, 4])
    def test_frames_smaller_than_the_grid_are_refused(self, channels):
        with pytest.raises(ValueError, match="at least 4x4"):
            build_backbone("hoghof", channels).forward_clips(torch.zeros(1, 2, channels, 2, 2))

    def test_the_head_trains_on_it_for_both_streams(self):
        cfg = ModelConfig(backbone="hoghof", flow_stack=2, lstm_layers=1, lstm_hidden=16, attention_heads=2,
                          dense_units=(16, 8))
        for stream, channels in (("rgb", 3), ("flow", 4)):
            model = build_stream_model(cfg, stream)
            logits = model(torch.randn(2, 3, channels, 16, 16) * 0.05)
            logits.sum().backward()
            assert logits.shape == (2,)
            assert all(p.grad is not None for p in model.head.parameters())
            assert isinstance(model.backbone.net, HogHof)


@pytest.mark.parametrize("channels", [3, 4], ids=["rgb", "flow"])
def test_an_empty_batch_gives_empty_features(channels):
    net = build_backbone("hoghof", channels, False, None, 32)
    out = net.forward_clips(torch.zeros(0, 4, channels, 32, 32))
    assert out.shape == (0, 4, net.out_dim)
