"""Stream model and temporal heads: shapes for every backbone x head, gradients, masks, freezing, configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from streams.backbones import Backbone, build_backbone
from streams.config import HEADS, ModelConfig
from streams.fused_lstm import projection_dtype
from streams.heads import attention_pool, build_head, self_attention
from streams.model import StreamModel, build_stream_model

N, T = 2, 3
BACKBONES = {"vgg19": 64, "resnet50": 64, "efficientnet_b4": 64, "vit_b_16": 32}  # name -> test frame size


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbones():
    """Each torchvision backbone built once (they are large); the ViT at 32x32 to stay fast."""
    torch.manual_seed(0)
    return {name: build_backbone(name, image_size=32).eval() for name in BACKBONES}


@pytest.fixture(scope="module")
def heads():
    torch.manual_seed(0)
    return {name: build_head(ModelConfig(head=name), 48).eval() for name in HEADS}


def tiny_backbone(in_channels: int = 3) -> Backbone:
    net = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(net, out_dim=8, in_channels=in_channels)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_with_every_head(backbones, name):
    backbone, size = backbones[name], BACKBONES[name]
    x = torch.randn(N, T, 3, size, size)
    with torch.no_grad():
        features = StreamModel(backbone, nn.Identity()).forward_features(x)
        assert features.shape == (N, T, backbone.out_dim)
        assert torch.isfinite(features).all()
        torch.manual_seed(1)
        for head_name in HEADS:
            model = StreamModel(backbone, build_head(ModelConfig(head=head_name), backbone.out_dim)).eval()
            logits = model.forward_head(features)
            assert logits.shape == (N,)
            assert torch.isfinite(logits).all()
            assert model.embed_features(features).shape == (N, 128)
        # The full forward is features -> head (checked once per backbone; the backbone dominates the cost).
        torch.testing.assert_close(model(x), logits)


def test_backbone_frames_are_independent(backbones):
    # One (N*T) batch through the backbone must give each frame its own feature, in order.
    backbone = backbones["resnet50"]
    x = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        features = StreamModel(backbone, nn.Identity()).forward_features(x)
        torch.testing.assert_close(features[1, 0], backbone(x[1, 0:1])[0], rtol=1e-3, atol=1e-4)


def test_vit_rejects_other_sizes(backbones):
    with pytest.raises(ValueError, match="32x32"):
        backbones["vit_b_16"](torch.randn(1, 3, 64, 64))


def test_vgg_rejects_tiny_frames(backbones):
    with pytest.raises(ValueError, match="at least 32x32"):
        backbones["vgg19"](torch.randn(1, 3, 16, 16))


def test_wrong_channel_count_is_value_error(backbones):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        backbones["resnet50"](torch.randn(1, 10, 32, 32))


@pytest.mark.parametrize("head_name", HEADS)
def test_every_head_parameter_gets_a_gradient(head_name):
    torch.manual_seed(0)
    head = build_head(ModelConfig(head=head_name), 16).train()
    head(torch.randn(4, 5, 16)).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_flow_model_every_parameter_gets_a_gradient():
    cfg = ModelConfig(backbone="resnet50", flow_stack=2, lstm_layers=1, lstm_hidden=16, attention_heads=4)
    torch.manual_seed(0)
    model = build_stream_model(cfg, "flow").train()
    assert model.backbone.net.conv1.in_channels == 4
    model(torch.randn(2, 2, 4, 32, 32)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("head_name", HEADS)
def test_padding_does_not_change_the_result(heads, head_name):
    head = heads[head_name]
    torch.manual_seed(0)
    x = torch.randn(3, 6, 48)
    lengths = [6, 4, 2]
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    x_garbage = x.masked_fill(~mask[..., None], 1e3)  # padding content must not matter
    with torch.no_grad():
        padded = head(x_garbage, mask)
        alone = torch.stack([head(x[i : i + 1, :n])[0] for i, n in enumerate(lengths)])
        unmasked = head(x_garbage)
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unmasked[1:], alone[1:], atol=1e-3)  # the mask is what makes the difference


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.tensor([[True, False, True]]), "prefix"),
        (torch.tensor([[False, False, False]]), "no valid step"),
        (torch.tensor([[1, 1, 0]]), "bool"),
        (torch.ones(1, 4, dtype=torch.bool), "shape"),
    ],
)
def test_bad_masks_are_value_errors(heads, mask, message):
    with pytest.raises(ValueError, match=message):
        heads["bilstm_attention"](torch.randn(1, 3, 48), mask)


def test_forward_is_the_output_layer_on_the_embedding(heads):
    head = heads["transformer"]
    x = torch.randn(2, 4, 48)
    with torch.no_grad():
        torch.testing.assert_close(head(x), head.out(head.embed(x)).squeeze(-1))


class TestSelfAttention:
    """`self_attention` is nn.MultiheadAttention(h, h, h) written out; projections may run in bfloat16."""

    @staticmethod
    def _case(masked: bool):
        torch.manual_seed(0)
        attn = nn.MultiheadAttention(16, 4, batch_first=True)
        h = torch.randn(3, 5, 16)
        mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4]) if masked else None
        return attn, h, mask

    @pytest.mark.parametrize("masked", [False, True])
    def test_equals_the_module_with_gradients(self, masked):
        attn, h, mask = self._case(masked)
        ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
        ref = attn(ha, ha, ha, key_padding_mask=None if mask is None else ~mask, need_weights=False)[0]
        ref.square().sum().backward()
        grads = [p.grad.clone() for p in attn.parameters()]
        attn.zero_grad()
        out = self_attention(hb, attn, mask)
        out.square().sum().backward()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hb.grad, ha.grad, atol=1e-5, rtol=1e-4)
        for p, g in zip(attn.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)

    def test_projections_in_bf16_to_its_accuracy(self):
        attn, h, mask = self._case(True)
        ref = self_attention(h, attn, mask)
        with projection_dtype(torch.bfloat16):
            out = self_attention(h, attn, mask)
        assert out.dtype == torch.float32 and not torch.equal(out, ref)
        torch.testing.assert_close(out, ref, atol=3e-2, rtol=0)

    def test_dropout_only_in_training(self):
        attn, h, _ = self._case(False)
        attn.dropout = 0.5
        attn.eval()
        torch.testing.assert_close(self_attention(h, attn), attn(h, h, h, need_weights=False)[0], atol=1e-5, rtol=1e-5)
        attn.train()
        assert not torch.allclose(self_attention(h, attn), self_attention(h, attn))


def test_attention_pool_weights_valid_steps_only():
    h = torch.tensor([[[1.0], [3.0], [100.0]]])  # (1, 3, 1)
    scores = torch.tensor([[0.0, 0.0, 50.0]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(attention_pool(h, scores, mask), torch.tensor([[2.0]]))


class TestFreezing:
    def test_frozen_backbone_stays_in_eval_and_untrained(self):
        model = StreamModel(tiny_backbone(), build_head(ModelConfig(lstm_layers=1), 8))
        model.freeze_backbone()
        model.train()
        assert model.head.training and not model.backbone.training
        assert not any(p.requires_grad for p in model.backbone.parameters())
        running = model.backbone.net[1].running_mean.clone()
        features = model.forward_features(torch.randn(2, 3, 3, 16, 16) + 5.0)
        assert not features.requires_grad  # no graph through a frozen backbone
        torch.testing.assert_close(model.backbone.net[1].running_mean, running)  # BN statistics untouched
        model.freeze_backbone(False)
        assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())

    def test_param_groups(self):
        model = StreamModel(tiny_backbone(), build_head(ModelConfig(lstm_layers=1), 8))
        model.freeze_backbone()
        assert {g["name"] for g in model.param_groups(1e-3)} == {"head", "head_no_decay"}
        model.freeze_backbone(False)
        groups = model.param_groups(1e-4, weight_decay=0.01, backbone_lr_factor=0.1)
        by_name = {g["name"]: g for g in groups}
        assert by_name["backbone"]["lr"] == pytest.approx(1e-5)
        assert by_name["backbone"]["lr_scale"] == pytest.approx(0.1)
        assert by_name["head"]["lr"] == pytest.approx(1e-4) and by_name["head"]["weight_decay"] == 0.01
        assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
        assert all(p.ndim < 2 for p in by_name["head_no_decay"]["params"])
        ids = [id(p) for g in groups for p in g["params"]]
        assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
        torch.optim.AdamW(groups)  # the groups are valid optimiser input


class TestModelConfig:
    def test_defaults_follow_the_report(self):
        cfg = ModelConfig()
        assert (cfg.backbone, cfg.head, cfg.lstm_layers, cfg.lstm_hidden, cfg.lstm_dropout) == (
            "vgg19", "bilstm_attention", 3, 128, 0.3)
        assert (cfg.attention_heads, cfg.dense_units, cfg.dropout, cfg.flow_stack) == (8, (256, 128), 0.5, 5)
        assert cfg.pretrained is False and cfg.weights_path is None
        assert cfg.in_channels("rgb") == 3 and cfg.in_channels("flow") == 10

    def test_round_trip_through_plain_dict(self):
        cfg = ModelConfig(backbone="resnet50", dense_units=(64, 32), weights_path="w.pth")
        d = cfg.to_dict()
        assert d["dense_units"] == [64, 32]
        assert ModelConfig.from_dict(d) == cfg
        assert "weights_path" not in ModelConfig().to_dict()  # TOML has no null
        assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()

    @pytest.mark.parametrize(
        "d, message",
        [
            ({"backbon": "vgg19", "lstm_units": 3}, "backbon, lstm_units"),
            ({"backbone": "vgg16"}, "vgg19, resnet50"),
            ({"lstm_layers": "3"}, "lstm_layers must be int"),
            ({"pretrained": 1}, "pretrained must be bool"),
            ({"dense_units": 256}, "dense_units must be a list"),
            ({"attention_heads": 7}, "must divide"),
        ],
    )
    def test_bad_dicts_are_value_errors(self, d, message):
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_dict(d)

    def test_ints_stand_for_floats(self):
        assert ModelConfig.from_dict({"flow_bound": 20}).flow_bound == 20.0

    def test_unknown_stream(self):
        with pytest.raises(ValueError, match="'rgb' or 'flow'"):
            ModelConfig().in_channels("depth")
