"""Per-frame feature extractors from torchvision, and the input normalisation of both streams.

Every backbone maps clips (N, T, C, H, W) to one feature vector per step (N, T, D) (`forward_clips`);
all but hoghof's RGB encoder do it frame by frame, (N, C, H, W) -> (N, D) (`forward`):

    vgg19            fc7 (after the second ReLU/Dropout of the classifier)   D = 4096
    resnet50         global-average-pooled last stage                         D = 2048
    efficientnet_b4  global-average-pooled last stage                         D = 1792
    vit_b_16         class token after the final LayerNorm                    D = 768
    hoghof           training-free change (RGB) / HOF + MBH + motion statistics  D = 11 / 61
                     (flow, on a 4x4 grid) (`streams.hoghof`); no weights; its RGB
                     features describe change over the clip, so it takes clips

The CNNs take any input of at least 32x32. The ViT takes exactly `image_size` x `image_size`
(224 by default, the size its ImageNet weights were trained at; other sizes get the position
embeddings interpolated when pretrained weights are loaded).

Pretrained weights are never downloaded: they are read from the torch hub cache
(`torch.hub.get_dir()/checkpoints/<torchvision file name>`) or from an explicit file. A flow
stream has 2L input channels; its first convolution is initialised TSN cross-modality style
(Wang et al. 2016): the pretrained RGB filters averaged over their input channels, repeated 2L times.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.vision_transformer import interpolate_embeddings

from data.clips import IMAGENET_MEAN, IMAGENET_STD
from streams.hoghof import HogHof

log = logging.getLogger(__name__)


class _Spec:
    """How to build one torchvision backbone and where its parts live in the state dict."""

    def __init__(
        self,
        build: Callable[..., nn.Module],
        weights: tvm.WeightsEnum,
        out_dim: int,
        first_conv: str,
        head_prefixes: tuple[str, ...],
        strip_head: Callable[[nn.Module], None],
    ) -> None:
        self.build = build
        self.weights = weights
        self.out_dim = out_dim
        self.first_conv = first_conv  # attribute path of the input convolution
        self.head_prefixes = head_prefixes  # ImageNet classifier keys a feature extractor drops
        self.strip_head = strip_head

    @property
    def file_name(self) -> str:
        return self.weights.url.rsplit("/", 1)[-1]


def _strip_vgg(net: nn.Module) -> None:
    # Keep Linear-ReLU-Dropout-Linear-ReLU-Dropout: the output is fc7, and the kept layers keep
    # their torchvision indices so ImageNet state dicts load unchanged.
    net.classifier = nn.Sequential(*list(net.classifier)[:6])


def _strip_resnet(net: nn.Module) -> None:
    net.fc = nn.Identity()


def _strip_efficientnet(net: nn.Module) -> None:
    net.classifier = nn.Identity()


def _strip_vit(net: nn.Module) -> None:
    net.heads = nn.Identity()


_SPECS = {
    "vgg19": _Spec(tvm.vgg19, tvm.VGG19_Weights.IMAGENET1K_V1, 4096, "features.0", ("classifier.6.",), _strip_vgg),
    "resnet50": _Spec(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, 2048, "conv1", ("fc.",), _strip_resnet),
    "efficientnet_b4": _Spec(
        tvm.efficientnet_b4, tvm.EfficientNet_B4_Weights.IMAGENET1K_V1, 1792, "features.0.0", ("classifier.",),
        _strip_efficientnet,
    ),
    "vit_b_16": _Spec(tvm.vit_b_16, tvm.ViT_B_16_Weights.IMAGENET1K_V1, 768, "conv_proj", ("heads.",), _strip_vit),
}
BACKBONE_DIMS = {name: spec.out_dim for name, spec in _SPECS.items()}
HOGHOF = "hoghof"  # the hand-crafted encoder; its width depends on the stream, so it is not in BACKBONE_DIMS


class Backbone(nn.Module):
    """A frame encoder: `forward` maps (N, C, H, W) frames to (N, out_dim) features.

    `net` is the torchvision model with its ImageNet classifier removed, so its state-dict keys
    are torchvision's.
    """

    def __init__(self, net: nn.Module, out_dim: int, in_channels: int, name: str = "custom",
                 image_size: int | None = None, min_size: int = 1) -> None:
        super().__init__()
        self.net = net
        self.out_dim = out_dim
        self.in_channels = in_channels
        self.name = name
        self.image_size = image_size  # required input side, or None when any size works
        self.min_size = min_size  # smallest input side the network's downsampling survives

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shape: (N, C, H, W) -> (N, D)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.name} backbone expects frames (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.name} expects {self.image_size}x{self.image_size} frames, got "
                f"{x.shape[-2]}x{x.shape[-1]}; resize the frames or set image_size"
            )
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"{self.name} needs frames of at least {self.min_size}x{self.min_size}, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        return self.net(x)

    def forward_clips(self, x: torch.Tensor) -> torch.Tensor:
        """Features of every step of clips. Shape: (N, T, C, H, W) -> (N, T, D).

        A frame encoder sees all frames as one batch; a temporal one (its net's `temporal` is True:
        hoghof's RGB change descriptors) sees the clips, since a step's features depend on its
        neighbours.
        """
        if x.ndim != 5:
            raise ValueError(f"clips must be (N, T, C, H, W), got {tuple(x.shape)}")
        n, t = x.shape[:2]
        if not getattr(self.net, "temporal", False):
            feats = self(x.flatten(0, 1))  # (N*T, D)
            return feats.view(n, t, feats.shape[-1])  # (N, T, D); also for N = 0
        if x.shape[2] != self.in_channels or min(x.shape[-2:]) < self.min_size:
            raise ValueError(f"{self.name} backbone expects clips (N, T, {self.in_channels}, H, W) of at least "
                             f"{self.min_size}x{self.min_size}, got {tuple(x.shape)}")
        return self.net.forward_clips(x)


def build_backbone(
    name: str,
    in_channels: int = 3,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    image_size: int = 224,
) -> Backbone:
    """Build a torchvision frame encoder, with ImageNet weights when asked (see the module docstring).

    `weights_path` is loaded whenever given; `pretrained` alone reads the torch hub cache. Both
    accept torchvision checkpoints and state dicts saved from a `Backbone` or a model holding one
    as `.backbone`. `image_size` only matters for vit_b_16.
    """
    path = weights_file(name, pretrained, weights_path)
    if name == HOGHOF:
        encoder = HogHof(in_channels)
        return Backbone(encoder, encoder.out_dim, in_channels, name, min_size=encoder.grid)
    spec = _spec(name)
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if name == "vit_b_16" and (image_size < 16 or image_size % 16):
        raise ValueError(f"vit_b_16 needs an image_size that is a multiple of 16, got {image_size}")
    state = load_weights(path) if path is not None else None
    # With weights to load, build on the meta device: random init of VGG19's 120M classifier
    # weights would take seconds and be overwritten anyway.
    with torch.device("meta") if state is not None else contextlib.nullcontext():
        net = spec.build(image_size=image_size) if name == "vit_b_16" else spec.build()
        spec.strip_head(net)
        if in_channels != 3:
            _set_module(net, spec.first_conv, _reshaped_conv(net.get_submodule(spec.first_conv), in_channels, name))
    if state is not None:
        _load_strict(net, adapt_state_dict(state, name, in_channels, image_size), name, path)
        log.info("%s: loaded weights from %s", name, path)
    return Backbone(net, spec.out_dim, in_channels, name, image_size if name == "vit_b_16" else None,
                    32 if name == "vgg19" else 1)


def weights_file(name: str, pretrained: bool = False, weights_path: str | Path | None = None) -> Path | None:
    """The file backbone `name`'s weights come from: `weights_path`, else the hub cache when
    `pretrained`; None: random initialisation. A missing file is a one-line error naming where to
    put it (nothing is ever downloaded)."""
    if name == HOGHOF:
        if pretrained or weights_path is not None:
            raise ValueError("the hoghof backbone has no weights to load; pretrained weights need a CNN backbone "
                             "(vgg19 in the gpu preset, or model.backbone in a --config)")
        return None
    spec = _spec(name)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        return path
    if not pretrained:
        return None
    path = pretrained_path(name)
    if not path.is_file():
        raise ValueError(
            f"pretrained {name} weights not found: put {spec.file_name} (from {spec.weights.url}) "
            f"in {path.parent}/ or pass --weights PATH"
        )
    return path


def pretrained_path(name: str) -> Path:
    """Where the ImageNet weights of backbone `name` are expected: the torch hub checkpoint cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _spec(name).file_name


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from `path`; unwraps {"state_dict": ...} and {"model": ...} checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types; all mean "not a weights file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot read weights ({first})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return obj


def adapt_state_dict(
    state: dict[str, torch.Tensor], name: str, in_channels: int = 3, image_size: int = 224
) -> dict[str, torch.Tensor]:
    """Map a checkpoint's keys and tensors onto a `Backbone.net` of backbone `name`.

    Strips DDP's `module.`, a `backbone.` owner (other top-level modules are dropped) and
    `Backbone`'s `net.`; drops the ImageNet classifier; turns a 3-channel first convolution into
    an `in_channels` one by cross-modality averaging; resizes the ViT's position embeddings to
    `image_size`.
    """
    spec = _spec(name)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = {k.removeprefix("net."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(spec.head_prefixes)}
    conv_key = spec.first_conv + ".weight"
    if conv_key in state and state[conv_key].shape[1] != in_channels:
        state[conv_key] = cross_modality_weight(state[conv_key], in_channels)
    if name == "vit_b_16" and "encoder.pos_embedding" in state:
        expected = (image_size // 16) ** 2 + 1
        if state["encoder.pos_embedding"].shape[1] != expected:
            state = dict(interpolate_embeddings(image_size, 16, state))
    return state


def cross_modality_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """TSN cross-modality init: average filters over input channels, repeat `in_channels` times.

    Shape: (O, C, k, k) -> (O, in_channels, k, k).
    """
    return weight.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)


def normalize_rgb(x: torch.Tensor) -> torch.Tensor:
    """Frames to network input: uint8 (or float in 0..255) (..., H, W, 3) -> float (..., 3, H, W).

    Scaled to [0, 1], then ImageNet mean subtracted and divided by the ImageNet std per channel.
    """
    x = torch.as_tensor(x)
    if x.shape[-1] != 3:
        raise ValueError(f"RGB frames must be (..., H, W, 3), got {tuple(x.shape)}")
    x = x.float() if not x.is_floating_point() else x
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype) * 255.0
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype) * 255.0
    return ((x - mean) / std).movedim(-1, -3)


def normalize_flow(x: torch.Tensor, bound: float = 20.0) -> torch.Tensor:
    """A stack of L flow fields to network input: (..., L, H, W, 2) -> (..., 2L, H, W) in [-1, 1].

    Float input is in pixels and divided by `bound`. uint8 input is TSN-quantised flow
    (q = round((f + bound) * 255 / (2 bound)), the store's "uint8" codec) and maps to
    (q - 127.5) / 127.5, the same as dequantising and dividing by the bound. Both are clipped to
    [-1, 1]. Channels interleave as dx_1, dy_1, dx_2, dy_2, ...
    """
    x = torch.as_tensor(x)
    if x.ndim < 4 or x.shape[-1] != 2:
        raise ValueError(f"flow stacks must be (..., L, H, W, 2), got {tuple(x.shape)}")
    if bound <= 0:
        raise ValueError(f"flow bound must be > 0, got {bound}")
    x = (x.float() - 127.5) / 127.5 if x.dtype == torch.uint8 else x.float() / bound
    x = x.clamp(-1.0, 1.0).movedim(-1, -3)  # (..., L, 2, H, W)
    return x.flatten(-4, -3)  # (..., 2L, H, W)


def _spec(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join([*_SPECS, HOGHOF])}")
    return _SPECS[name]


def _reshaped_conv(conv: nn.Conv2d, in_channels: int, name: str) -> nn.Conv2d:
    """A fresh copy of `conv` taking `in_channels` inputs, initialised as torchvision does."""
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, conv.bias is not None,
    )
    if name == "vit_b_16":
        fan_in = in_channels * new.kernel_size[0] * new.kernel_size[1]
        nn.init.trunc_normal_(new.weight, std=math.sqrt(1.0 / fan_in))
    else:
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if v]
        raise ValueError(f"{path}: not {name} weights: {'; '.join(parts)}")
    # Assigning the loaded tensors instead of copying them halves peak memory (VGG19: 550 MB).
    net.load_state_dict({k: v.to(own[k].dtype).contiguous() for k, v in state.items()}, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:  # a tensor outside the state dict would stay uninitialised: a bug here, not a user mistake
        raise RuntimeError(f"{name}: tensors not covered by the state dict: {left[:3]}")


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
