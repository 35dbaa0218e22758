"""Flow-aware augmentation: each geometric op is checked on known fields and by warping real texture."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from data.augment import (
    AugmentConfig,
    ClipParams,
    augment_clip,
    color_jitter,
    hflip_flow,
    mixup,
    resized_crop,
    rotate_flow,
    sample_params,
    scale_flow,
    spatial_matrix,
    temporal_dropout,
    temporal_resample,
    warp_affine,
)
from flow.groundtruth import synthetic_pair

H = W = 64


@pytest.fixture(scope="module")
def pair():
    """prev, nxt as float (H, W, 1) and the exact flow from prev to nxt: prev(x) = nxt(x + u(x))."""
    prev, nxt, flow = synthetic_pair(H, W, seed=3, max_px=3.0, noise=0.0)
    return prev[..., None].astype(np.float32), nxt[..., None].astype(np.float32), flow


def warp_error(prev: np.ndarray, nxt: np.ndarray, flow: np.ndarray, margin: int = 12) -> float:
    """Mean |prev(x) - nxt(x + u(x))| inside a margin: small exactly when u is prev -> nxt's flow."""
    h, w = flow.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    back = cv2.remap(nxt[..., 0], xx + flow[..., 0], yy + flow[..., 1], cv2.INTER_LINEAR)
    return float(np.abs(back - prev[..., 0])[margin:-margin, margin:-margin].mean())


def uniform(dx: float, dy: float, h: int = 16, w: int = 16) -> np.ndarray:
    flow = np.zeros((h, w, 2), np.float32)
    flow[..., 0], flow[..., 1] = dx, dy
    return flow


class TestFlip:
    def test_known_field(self):
        flow = np.zeros((2, 3, 2), np.float32)
        flow[0, 0] = (1.0, 2.0)  # top-left
        out = hflip_flow(flow)
        assert out[0, 2].tolist() == [-1.0, 2.0]  # now top-right, dx negated, dy kept
        assert np.abs(out).sum() == 3.0
        np.testing.assert_array_equal(hflip_flow(out), flow)

    def test_tensor_matches_numpy(self):
        flow = np.random.default_rng(0).normal(size=(2, 4, 5, 2)).astype(np.float32)
        np.testing.assert_array_equal(hflip_flow(torch.from_numpy(flow)).numpy(), hflip_flow(flow))

    def test_consistent_with_flipped_images(self, pair):
        prev, nxt, flow = pair
        flipped = [img[:, ::-1] for img in (prev, nxt)]
        good = warp_error(*flipped, hflip_flow(flow))
        assert good < 3.0
        assert good * 2 < warp_error(*flipped, flow[:, ::-1])  # mirrored without negating dx


class TestRotate:
    def test_uniform_right_turns_up_at_plus_90(self):
        # +90 degrees is counter-clockwise on screen; with y down, "right" becomes "up" = (0, -1).
        out = rotate_flow(uniform(1.0, 0.0), 90.0)
        np.testing.assert_allclose(out[4:12, 4:12], np.broadcast_to([0.0, -1.0], (8, 8, 2)), atol=1e-5)
        out = rotate_flow(uniform(1.0, 0.0), -90.0)
        np.testing.assert_allclose(out[4:12, 4:12], np.broadcast_to([0.0, 1.0], (8, 8, 2)), atol=1e-5)

    def test_field_moves_with_the_image(self):
        # A marked pixel right of centre moves above centre, as cv2 rotates the image.
        flow = np.zeros((15, 15, 2), np.float32)
        flow[7, 11] = (1.0, 0.0)
        out = rotate_flow(flow, 90.0)
        assert np.unravel_index(np.abs(out).sum(-1).argmax(), (15, 15)) == (3, 7)
        np.testing.assert_allclose(out[3, 7], [0.0, -1.0], atol=1e-5)

    @pytest.mark.parametrize("angle", [30.0, -90.0])
    def test_consistent_with_rotated_images(self, pair, angle):
        prev, nxt, flow = pair
        m = spatial_matrix(ClipParams(angle=angle), H, W)
        images = [warp_affine(img, m) for img in (prev, nxt)]
        good = warp_error(*images, rotate_flow(flow, angle))
        assert good < 3.0
        opposite = warp_affine(flow, m) @ spatial_matrix(ClipParams(angle=-angle), H, W)[:, :2].T.astype(np.float32)
        assert good * 2 < warp_error(*images, opposite)  # vectors turned the other way
        assert good * 2 < warp_error(*images, warp_affine(flow, m))  # vectors not turned at all


class TestScale:
    def test_factor_scales_vectors_and_size(self):
        out = scale_flow(uniform(1.0, 2.0), factor=2.0)
        assert out.shape == (32, 32, 2)
        np.testing.assert_allclose(out, uniform(2.0, 4.0, 32, 32), atol=1e-5)

    def test_aspect_change_scales_axes_separately(self):
        flow = np.broadcast_to(uniform(1.0, 1.0), (40, 16, 16, 2)).copy()  # many frames, shrinking (area)
        out = scale_flow(flow, size=(24, 5))
        assert out.shape == (40, 24, 5, 2)
        np.testing.assert_allclose(out[..., 0], 5 / 16, atol=1e-5)
        np.testing.assert_allclose(out[..., 1], 24 / 16, atol=1e-5)

    def test_needs_factor_or_size(self):
        with pytest.raises(ValueError, match="exactly one"):
            scale_flow(uniform(1, 1))

    def test_resized_crop_scales_each_axis_and_matches_images(self, pair):
        prev, nxt, flow = pair
        box, size = (10, 5, 40, 50), (48, 32)  # top, left, height, width -> x 0.64, y 1.2
        crop = [resized_crop(img, *box, size) for img in (prev, nxt)]
        out = resized_crop(flow, *box, size, vectors=True)
        assert out.shape == (48, 32, 2)
        plain = resized_crop(flow, *box, size)
        np.testing.assert_allclose(out[..., 0], plain[..., 0] * 32 / 50, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[..., 1], plain[..., 1] * 48 / 40, rtol=1e-5, atol=1e-6)
        good = warp_error(*crop, out, margin=6)
        assert good < 3.0
        assert good * 1.4 < warp_error(*crop, plain, margin=6)

    def test_resized_crop_of_the_whole_frame_is_identity(self, pair):
        prev = pair[0]
        np.testing.assert_allclose(resized_crop(prev, 0, 0, H, W, (H, W)), prev, atol=1e-4)


class TestColour:
    def test_known_values(self):
        rgb = np.full((1, 2, 2, 3), 100, np.uint8)
        assert (color_jitter(rgb, brightness=1.5) == 150).all()
        assert (color_jitter(rgb, brightness=3.0) == 255).all()  # saturates, no wrap-around
        img = np.zeros((2, 1, 3), np.uint8)
        img[0] = (200, 0, 0)
        assert (color_jitter(img, saturation=0.0)[0] == round(0.299 * 200)).all()  # grey
        out = color_jitter(img, contrast=0.0)
        assert (out == out[0, 0, 0]).all()  # every pixel at the mean grey level
        np.testing.assert_array_equal(color_jitter(img), img)

    def test_uint8_and_float_paths_agree(self):
        rgb = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
        fast = color_jitter(rgb, 1.2, 0.8, 1.3).astype(np.int16)
        exact = np.rint(color_jitter(rgb.astype(np.float32), 1.2, 0.8, 1.3)).astype(np.int16)
        assert np.abs(fast - exact).max() <= 2  # uint8 rounds after each step

    def test_leaves_flow_untouched(self):
        cfg = dataclasses.replace(AugmentConfig.off(), brightness=0.5, contrast=0.5, saturation=0.5)
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
        flow = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
        rgb_out, flow_out = augment_clip(rgb, flow, cfg, np.random.default_rng(1))
        np.testing.assert_array_equal(flow_out, flow)
        assert not np.array_equal(rgb_out, rgb)


class TestTemporal:
    def test_resample(self):
        idx = np.arange(10)
        assert temporal_resample(idx, 2.0).tolist() == [0, 2, 4, 6, 8]
        assert temporal_resample(idx, 0.5, length=6).tolist() == [0, 0, 1, 1, 2, 2]
        assert temporal_resample(idx, 1.2).tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
        assert temporal_resample(idx, 1.5, length=8).tolist() == [0, 1, 3, 4, 6, 7, 9, 9]  # runs out: repeats

    def test_dropout_keeps_length_and_repeats_the_previous_frame(self):
        idx = np.arange(20) * 10
        out = temporal_dropout(idx, 0.15, np.random.default_rng(0))
        assert len(out) == 20 and out[0] == 0
        assert int((out != idx).sum()) == 3
        changed = np.flatnonzero(out != idx)
        assert all(out[i] == out[i - 1] for i in changed)
        np.testing.assert_array_equal(out, temporal_dropout(idx, 0.15, np.random.default_rng(0)))


class TestAugmentClip:
    def make_clip(self, pair):
        prev, nxt, flow = pair
        rgb = np.stack([prev, nxt]).repeat(3, axis=-1).clip(0, 255).astype(np.uint8)  # (2, H, W, 3)
        return rgb, flow[None]  # (1, H, W, 2)

    def test_same_geometry_for_both_streams(self, pair):
        rgb, flow = self.make_clip(pair)
        cfg = AugmentConfig(hflip_p=1.0, scale_range=(1.1, 1.1), rotation_deg=15.0, brightness=0.0,
                            contrast=0.0, saturation=0.0, frame_rate_range=(1.0, 1.0), temporal_dropout=0.0)
        rgb_out, flow_out = augment_clip(rgb, flow, cfg, np.random.default_rng(5))
        assert rgb_out.shape == rgb.shape and flow_out.shape == flow.shape
        frames = [f[..., :1].astype(np.float32) for f in rgb_out]
        good = warp_error(*frames, flow_out[0])
        assert good < 3.0
        params = sample_params(cfg, np.random.default_rng(5))
        unturned = warp_affine(flow[0], spatial_matrix(params, H, W))  # field moved, vectors unchanged
        assert good * 2 < warp_error(*frames, unturned)

    def test_streams_at_different_resolutions_share_the_geometry(self, pair):
        rgb, flow = self.make_clip(pair)
        half = scale_flow(flow, factor=0.5)
        cfg = AugmentConfig(hflip_p=0.0, scale_range=(1.0, 1.0), rotation_deg=20.0,
                            frame_rate_range=(1.0, 1.0), temporal_dropout=0.0)
        _, full_out = augment_clip(rgb, flow, cfg, np.random.default_rng(2))
        _, half_out = augment_clip(rgb, half, cfg, np.random.default_rng(2))
        inner = (slice(16, 48), slice(16, 48))
        np.testing.assert_allclose(scale_flow(half_out, factor=2.0)[0][inner], full_out[0][inner], atol=0.3)

    def test_frame_rate_scales_vectors_and_keeps_lengths(self):
        rgb = np.zeros((9, 8, 8, 3), np.uint8)
        flow = np.broadcast_to(uniform(1.0, -1.0, 8, 8), (8, 8, 8, 2)).copy()
        cfg = dataclasses.replace(AugmentConfig.off(), frame_rate_range=(1.25, 1.25))
        rgb_out, flow_out = augment_clip(rgb, flow, cfg, np.random.default_rng(0), length=6)
        assert rgb_out.shape[0] == 6 and flow_out.shape[0] == 5
        np.testing.assert_allclose(flow_out[..., 0], 1.25)
        np.testing.assert_allclose(flow_out[..., 1], -1.25)

    def test_deterministic_given_a_seed(self):
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
        flow = rng.normal(size=(5, 16, 16, 2)).astype(np.float32)
        a = augment_clip(rgb, flow, AugmentConfig(), np.random.default_rng(7))
        b = augment_clip(rgb, flow, AugmentConfig(), np.random.default_rng(7))
        c = augment_clip(rgb, flow, AugmentConfig(), np.random.default_rng(8))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[1], c[1])

    def test_off_is_identity(self):
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
        flow = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
        rgb_out, flow_out = augment_clip(rgb, flow, AugmentConfig.off(), rng)
        np.testing.assert_array_equal(rgb_out, rgb)
        np.testing.assert_array_equal(flow_out, flow)

    @pytest.mark.parametrize(
        "rgb, flow, message",
        [
            (None, None, "rgb, flow or both"),
            (np.zeros((2, 8, 8, 3), np.float32), None, "uint8"),
            (None, np.zeros((2, 8, 8, 3), np.float32), r"\(T, H, W, 2\)"),
        ],
    )
    def test_bad_input(self, rgb, flow, message):
        with pytest.raises(ValueError, match=message):
            augment_clip(rgb, flow, AugmentConfig(), np.random.default_rng(0))


class TestMixup:
    def test_labels_mix_like_clips(self):
        y = np.array([0.0, 1.0, 2.0, 3.0])  # distinct values reveal the pairing
        x = np.broadcast_to(y[:, None, None], (4, 3, 2)).copy()  # each clip filled with its label
        flow = x * 10
        (xm, fm), ym = mixup((x, flow), y, 0.2, np.random.default_rng(0))
        np.testing.assert_allclose(xm[:, 0, 0], ym, rtol=1e-6)
        np.testing.assert_allclose(fm[:, 0, 0], ym * 10, rtol=1e-5)  # same partners and weight
        assert not np.allclose(ym, y)
        assert np.isclose(ym.sum(), y.sum(), rtol=1e-5)  # a convex blend over a permutation keeps the total

    def test_tensors(self):
        y = torch.tensor([0.0, 1.0, 1.0])
        x = y[:, None].repeat(1, 5)
        xm, ym = mixup(x, y, 0.4, np.random.default_rng(1))
        assert isinstance(xm, torch.Tensor)
        torch.testing.assert_close(xm[:, 0], ym)


class TestConfig:
    def test_defaults_follow_the_report(self):
        cfg = AugmentConfig()
        assert (cfg.hflip_p, cfg.scale_range, cfg.rotation_deg) == (0.5, (0.85, 1.15), 10.0)
        assert (cfg.brightness, cfg.contrast, cfg.saturation) == (0.2, 0.2, 0.2)
        assert (cfg.frame_rate_range, cfg.temporal_dropout, cfg.mixup, cfg.mixup_alpha) == ((0.8, 1.2), 0.15, False, 0.2)

    def test_round_trip_and_unknown_keys(self):
        cfg = AugmentConfig(scale_range=(0.9, 1.1), mixup=True)
        assert cfg.to_dict()["scale_range"] == [0.9, 1.1]
        assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
        with pytest.raises(ValueError, match="flip_p"):
            AugmentConfig.from_dict({"flip_p": 0.5})

    @pytest.mark.parametrize("d", [{"hflip_p": 1.5}, {"scale_range": [1.2, 0.8]}, {"scale_range": 1.0}])
    def test_bad_values(self, d):
        with pytest.raises(ValueError, match="AugmentConfig"):
            AugmentConfig.from_dict(d)
