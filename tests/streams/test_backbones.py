"""Backbone construction, weight loading and input normalisation (forward shapes live in test_model)."""

from __future__ import annotations

import shutil

import pytest
import torch

from streams.backbones import (
    BACKBONE_DIMS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    adapt_state_dict,
    build_backbone,
    cross_modality_weight,
    normalize_flow,
    normalize_rgb,
    pretrained_path,
)

# The cheapest torchvision backbone stands in for all four where weight loading is exercised.
SMALL = "efficientnet_b4"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory):
    """A fake 'ImageNet' checkpoint: a random 3-channel backbone saved with torchvision's key names."""
    torch.manual_seed(0)
    net = build_backbone(SMALL).net
    path = tmp_path_factory.mktemp("weights") / "fake.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache, so the test never sees (or needs) real downloaded weights."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


class TestWeights:
    def test_cross_modality_init_averages_rgb_filters(self, rgb_weights):
        path, rgb_state = rgb_weights
        flow = build_backbone(SMALL, in_channels=10, weights_path=path)
        w_rgb = rgb_state["features.0.0.weight"]  # (48, 3, 3, 3)
        w_flow = flow.net.features[0][0].weight.detach()
        assert w_flow.shape == (48, 10, 3, 3)
        expected = w_rgb.mean(dim=1, keepdim=True).expand(-1, 10, -1, -1)
        torch.testing.assert_close(w_flow, expected)
        # Every other tensor loads unchanged.
        own = flow.net.state_dict()
        torch.testing.assert_close(own["features.1.0.block.0.0.weight"], rgb_state["features.1.0.block.0.0.weight"])

    def test_pretrained_reads_the_hub_cache_exactly(self, rgb_weights, hub_dir):
        path, rgb_state = rgb_weights
        target = pretrained_path(SMALL)
        assert target.parent == hub_dir / "checkpoints"
        assert target.name == "efficientnet_b4_rwightman-23ab8bcd.pth"
        target.parent.mkdir(parents=True)
        shutil.copy(path, target)
        net = build_backbone(SMALL, pretrained=True).net
        own = net.state_dict()
        assert own.keys() == rgb_state.keys()
        assert all(torch.equal(own[k], rgb_state[k]) for k in own)
        assert all(p.requires_grad for p in net.parameters())

    @pytest.mark.parametrize("name", ["vgg19", "resnet50", "efficientnet_b4", "vit_b_16"])
    def test_pretrained_without_file_is_one_line_error(self, name, hub_dir):
        with pytest.raises(ValueError) as err:
            build_backbone(name, pretrained=True)
        message = str(err.value)
        assert "\n" not in message
        assert pretrained_path(name).name in message
        assert str(hub_dir / "checkpoints") in message
        assert "--weights" in message

    def test_missing_weights_path(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="nope.pth"):
            build_backbone(SMALL, weights_path=tmp_path / "nope.pth")

    def test_wrong_weights_are_a_one_line_error(self, tmp_path):
        path = tmp_path / "other.pth"
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
        with pytest.raises(ValueError, match="not efficientnet_b4 weights") as err:
            build_backbone(SMALL, weights_path=path)
        assert "\n" not in str(err.value)

    def test_garbage_file_is_value_error(self, tmp_path):
        path = tmp_path / "garbage.pth"
        path.write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match="cannot read weights"):
            build_backbone(SMALL, weights_path=path)

    def test_run_config_with_weights_is_checked_before_any_work(self, rgb_weights, hub_dir, tmp_path):
        from streams.config import ModelConfig
        from streams.rundir import RunConfig

        cfg = RunConfig(model=ModelConfig(backbone=SMALL))
        assert cfg.with_weights() is cfg
        path, _ = rgb_weights
        chosen = cfg.with_weights(weights_path=path)
        assert chosen.model.weights_path == str(path) and not chosen.model.pretrained
        with pytest.raises(FileNotFoundError, match="nope.pth"):
            cfg.with_weights(weights_path=tmp_path / "nope.pth")
        with pytest.raises(ValueError, match="weights not found"):  # empty hub cache
            cfg.with_weights(pretrained=True)
        pretrained_path(SMALL).parent.mkdir(parents=True)
        shutil.copy(path, pretrained_path(SMALL))
        assert cfg.with_weights(pretrained=True).model.pretrained
        with pytest.raises(ValueError, match="hoghof backbone has no weights to load; pretrained weights need a CNN"):
            RunConfig(model=ModelConfig(backbone="hoghof")).with_weights(pretrained=True)

    def test_unknown_backbone(self):
        with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
            build_backbone("vgg16")


class TestAdaptStateDict:
    @pytest.mark.parametrize(
        "name, key, shape",
        [
            ("vgg19", "features.0.weight", (64, 3, 3, 3)),
            ("resnet50", "conv1.weight", (64, 3, 7, 7)),
            ("efficientnet_b4", "features.0.0.weight", (48, 3, 3, 3)),
            ("vit_b_16", "conv_proj.weight", (768, 3, 16, 16)),
        ],
    )
    def test_first_conv_of_every_backbone(self, name, key, shape):
        w = torch.randn(shape)
        out = adapt_state_dict({key: w, key.replace("weight", "bias"): torch.ones(shape[0])}, name, in_channels=4)
        assert out[key].shape == (shape[0], 4, *shape[2:])
        torch.testing.assert_close(out[key][:, 2], w.mean(dim=1))
        torch.testing.assert_close(out[key.replace("weight", "bias")], torch.ones(shape[0]))  # bias unchanged

    def test_strips_wrappers_and_drops_classifier(self):
        w = torch.randn(2, 2)
        state = {
            "module.backbone.net.classifier.0.weight": w,
            "module.backbone.net.classifier.6.weight": torch.randn(1000, 4096),
            "module.head.out.weight": torch.randn(1, 128),
        }
        assert list(adapt_state_dict(state, "vgg19")) == ["classifier.0.weight"]

    def test_vit_position_embeddings_follow_image_size(self):
        state = {"encoder.pos_embedding": torch.randn(1, 1 + 4, 8)}  # saved at 32x32
        out = adapt_state_dict(state, "vit_b_16", image_size=48)
        assert out["encoder.pos_embedding"].shape == (1, 1 + 9, 8)
        torch.testing.assert_close(out["encoder.pos_embedding"][:, 0], state["encoder.pos_embedding"][:, 0])

    def test_cross_modality_weight_repeats_the_mean(self):
        w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).view(2, 3, 1, 1)  # means 1 and 4
        out = cross_modality_weight(w, 5)
        assert out.shape == (2, 5, 1, 1)
        assert out[0].flatten().tolist() == [1.0] * 5
        assert out[1].flatten().tolist() == [4.0] * 5


def test_flow_backbone_without_weights_has_fresh_first_conv():
    net = build_backbone("resnet50", in_channels=6).net
    assert net.conv1.weight.shape == (64, 6, 7, 7)
    assert net.conv1.weight.std() > 0


@pytest.mark.parametrize("name, size", [("vgg19", 64), ("resnet50", 64), ("efficientnet_b4", 64), ("vit_b_16", 224)])
def test_flow_stacks_through_every_backbone(name, size):
    # On the meta device only shapes are computed: the full 2L-channel path of each backbone, for free.
    with torch.device("meta"):
        backbone = build_backbone(name, in_channels=10)
        out = backbone(torch.empty(2 * 3, 10, size, size))
    assert out.shape == (6, BACKBONE_DIMS[name]) and backbone.out_dim == BACKBONE_DIMS[name]


def test_backbone_dims_table():
    assert BACKBONE_DIMS == {"vgg19": 4096, "resnet50": 2048, "efficientnet_b4": 1792, "vit_b_16": 768}


class TestNormalize:
    def test_rgb_values_and_layout(self):
        x = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
        x[..., 0] = 255  # pure red
        out = normalize_rgb(x)
        assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32
        expected = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                    -IMAGENET_MEAN[2] / IMAGENET_STD[2]]
        torch.testing.assert_close(out[0, :, 1, 2], torch.tensor(expected))

    def test_rgb_accepts_float_0_255(self):
        x = torch.randint(0, 256, (3, 4, 3), dtype=torch.uint8)
        torch.testing.assert_close(normalize_rgb(x.float()), normalize_rgb(x))

    def test_rgb_rejects_channels_first(self):
        with pytest.raises(ValueError, match=r"\(\.\.\., H, W, 3\)"):
            normalize_rgb(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))

    def test_flow_layout_scale_and_clip(self):
        x = torch.zeros(2, 3, 4, 5, 2)  # (N, L, H, W, 2)
        x[:, 1, ..., 0] = 10.0  # dx of the second field
        x[:, 2, ..., 1] = -50.0  # dy of the third, beyond the bound
        out = normalize_flow(x, bound=20.0)
        assert out.shape == (2, 6, 4, 5)
        assert out[:, 2].unique().tolist() == [0.5]  # channel 2 = dx of field 2
        assert out[:, 5].unique().tolist() == [-1.0]  # clipped
        assert out[:, [0, 1, 3, 4]].abs().max() == 0

    def test_flow_uint8_is_tsn_quantised(self):
        bound = 20.0
        px = torch.tensor([-20.0, -5.0, 0.0, 12.0])
        q = torch.round((px + bound) * 255 / (2 * bound)).to(torch.uint8)  # TSN quantisation
        q = q.view(1, 1, 2, 2, 1).repeat(1, 1, 1, 1, 2)  # (N, L, H, W, 2)
        out = normalize_flow(q, bound)  # (1, 2, 2, 2)
        dequantised = q[0, 0, ..., 0].float() * (2 * bound / 255) - bound
        torch.testing.assert_close(out[0, 0], dequantised / bound)
        torch.testing.assert_close(out[0, 0].flatten(), px / bound, atol=1 / 127.5, rtol=0)

    def test_flow_rejects_bad_shape(self):
        with pytest.raises(ValueError, match="flow stacks"):
            normalize_flow(torch.zeros(4, 5, 2))
