import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from flow._ops import (
    centered_gradient,
    divergence,
    forward_gradient,
    gaussian_blur,
    median_filter,
    pyramid_sizes,
    resize,
    warp,
)
from flow.groundtruth import textured_image


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape)).to(dtype)


class TestCenteredGradient:
    def test_matches_ipol_border_rule(self):
        img = _rand(2, 5, 7)
        dx, dy = centered_gradient(img)
        a = img.numpy()
        ref_dx = np.empty_like(a)
        ref_dx[..., 1:-1] = 0.5 * (a[..., 2:] - a[..., :-2])
        ref_dx[..., 0] = 0.5 * (a[..., 1] - a[..., 0])  # half a one-sided difference on the border
        ref_dx[..., -1] = 0.5 * (a[..., -1] - a[..., -2])
        ref_dy = np.empty_like(a)
        ref_dy[:, 1:-1] = 0.5 * (a[:, 2:] - a[:, :-2])
        ref_dy[:, 0] = 0.5 * (a[:, 1] - a[:, 0])
        ref_dy[:, -1] = 0.5 * (a[:, -1] - a[:, -2])
        np.testing.assert_allclose(dx.numpy(), ref_dx, atol=1e-12)
        np.testing.assert_allclose(dy.numpy(), ref_dy, atol=1e-12)

    def test_leading_dims_kept(self):
        img = _rand(2, 3, 6, 5, dtype=torch.float32)
        dx, dy = centered_gradient(img)
        assert dx.shape == dy.shape == img.shape and dx.dtype == torch.float32


class TestGradientDivergence:
    def test_forward_gradient_known_values(self):
        u = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]])
        ux, uy = forward_gradient(u)
        assert torch.equal(ux, torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
        assert torch.equal(uy, torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.0, 0.0]]))

    @pytest.mark.parametrize("shape", [(3, 2, 9, 11), (1, 1, 2, 3), (4, 4)])
    def test_divergence_is_negative_adjoint(self, shape):
        u, px, py = _rand(*shape, seed=1), _rand(*shape, seed=2), _rand(*shape, seed=3)
        ux, uy = forward_gradient(u)
        lhs = (ux * px).sum() + (uy * py).sum()
        rhs = -(u * divergence(px, py)).sum()
        assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10)

    def test_divergence_is_backward_difference_inside(self):
        px, py = _rand(6, 7, seed=4), _rand(6, 7, seed=5)
        div = divergence(px, py)
        inner = (px[1:-1, 1:-1] - px[1:-1, :-2]) + (py[1:-1, 1:-1] - py[:-2, 1:-1])
        assert torch.allclose(div[1:-1, 1:-1], inner)


class TestWarp:
    @pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
    def test_zero_flow_is_identity(self, mode):
        img = _rand(2, 3, 13, 17, dtype=torch.float32)
        out = warp(img, torch.zeros(2, 13, 17, 2), mode=mode)
        assert torch.allclose(out, img, atol=1e-5)

    def test_integer_flow_samples_the_shifted_pixel(self):
        img = _rand(1, 1, 10, 12)
        flow = torch.zeros(1, 10, 12, 2, dtype=torch.float64)
        flow[..., 0], flow[..., 1] = 2.0, -1.0
        out = warp(img, flow)
        # out(y, x) = img(y - 1, x + 2) wherever that lies inside the image
        assert torch.allclose(out[0, 0, 1:, :-2], img[0, 0, :-1, 2:], atol=1e-9)

    def test_subpixel_matches_opencv_remap(self):
        rng = np.random.default_rng(0)
        img = textured_image(24, 30, rng)
        flow = rng.uniform(-1.5, 1.5, size=(24, 30, 2)).astype(np.float32)
        yy, xx = np.mgrid[0:24, 0:30].astype(np.float32)
        ref = cv2.remap(img, xx + flow[..., 0], yy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out = warp(torch.from_numpy(img)[None, None], torch.from_numpy(flow)[None], mode="bilinear")
        # OpenCV quantises positions to 1/32 px: agree to that precision
        assert np.abs(out[0, 0].numpy() - ref)[2:-2, 2:-2].max() < 255 / 32 * 0.2

    def test_mismatched_shapes_raise(self):
        with pytest.raises(ValueError, match="do not match"):
            warp(torch.zeros(1, 1, 4, 5), torch.zeros(1, 4, 6, 2))


class TestResizeBlurPyramid:
    def test_resize_matches_opencv_inter_linear(self):
        img = textured_image(40, 52, np.random.default_rng(1))
        ref = cv2.resize(img, (41, 32), interpolation=cv2.INTER_LINEAR)
        out = resize(torch.from_numpy(img)[None, None], (32, 41))[0, 0].numpy()
        assert np.abs(out - ref).max() < 1e-3

    def test_gaussian_blur_matches_scipy(self):
        img = _rand(2, 1, 15, 19)
        for sigma in (0.45, 1.0):
            radius = int(np.ceil(3 * sigma))
            ref = ndi.gaussian_filter(img.numpy(), (0, 0, sigma, sigma), mode="mirror", truncate=radius / sigma)
            assert np.allclose(gaussian_blur(img, sigma).numpy(), ref, atol=1e-10)

    def test_gaussian_blur_no_op_and_tiny_images(self):
        img = _rand(1, 1, 3, 2)
        assert gaussian_blur(img, 0.0) is img
        assert torch.allclose(gaussian_blur(torch.full((1, 1, 2, 2), 7.0), 2.0), torch.full((1, 1, 2, 2), 7.0))

    @pytest.mark.parametrize(
        "size, expected",
        [
            ((224, 224), [(224, 224), (179, 179), (143, 143), (114, 114), (91, 91)]),
            ((97, 131), [(97, 131), (78, 105), (62, 84), (50, 67), (40, 54)]),
            ((20, 40), [(20, 40), (16, 32)]),  # OpenCV stops before a side < 16
            ((10, 10), [(10, 10)]),
        ],
    )
    def test_pyramid_sizes(self, size, expected):
        assert pyramid_sizes(*size, nscales=5, scale_step=0.8) == expected


class TestMedianFilter:
    @pytest.mark.parametrize("ksize", [3, 5, 7])
    @pytest.mark.parametrize("shape", [(2, 3, 17, 23), (1, 1, 2, 5), (4, 9)])
    def test_matches_scipy(self, ksize, shape):
        x = _rand(*shape, seed=ksize, dtype=torch.float32)
        ref = ndi.median_filter(x.numpy(), size=(1,) * (x.ndim - 2) + (ksize, ksize), mode="nearest")
        assert np.array_equal(median_filter(x, ksize).numpy(), ref)

    @pytest.mark.parametrize("ksize", [3, 5])
    def test_matches_opencv_median_blur(self, ksize):
        x = _rand(1, 1, 31, 26, seed=9, dtype=torch.float32) * 20
        ref = cv2.medianBlur(x[0, 0].numpy(), ksize)
        assert np.array_equal(median_filter(x, ksize)[0, 0].numpy(), ref)

    def test_ties_and_non_contiguous_input(self):
        x = torch.randint(0, 3, (2, 12, 15)).float().transpose(1, 2)  # (2, 15, 12), non-contiguous
        ref = ndi.median_filter(x.numpy(), size=(1, 5, 5), mode="nearest")
        assert np.array_equal(median_filter(x, 5).numpy(), ref)

    def test_size_one_is_identity_and_even_size_raises(self):
        x = _rand(1, 1, 4, 4)
        assert median_filter(x, 1) is x
        with pytest.raises(ValueError, match="odd"):
            median_filter(x, 4)
