"""Frozen configs of the stream model, its loss and its optimiser, with the research report's defaults.

Each config round-trips through a plain dict (`to_dict` / `from_dict`) so it can live in TOML, JSON
or HDF5 attrs. `to_dict` leaves out fields whose value is None (TOML has no null); every field that
may be None defaults to None, so `from_dict` restores them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

BACKBONES = ("vgg19", "resnet50", "efficientnet_b4", "vit_b_16", "hoghof")
HEADS = ("bilstm_attention", "gru_attention", "conv1d_lstm", "transformer", "stats_pool", "logistic")
CLOSED_FORM_HEADS = ("logistic",)  # heads whose stage 1 is a closed-form fit (streams.logistic), not SGD epochs
LOSSES = ("focal", "bce")
OPTIMIZERS = ("adamw", "adam")

C = TypeVar("C")


@dataclass(frozen=True)
class ModelConfig:
    """One stream: per-frame backbone, then a temporal head that outputs one violence logit."""

    backbone: str = "vgg19"  # frame encoder, one of BACKBONES; vgg19 gives fc7 (4096-d) features
    head: str = "bilstm_attention"  # temporal head, one of HEADS
    pretrained: bool = False  # start from ImageNet weights found in the torch hub cache (never downloaded)
    weights_path: str | None = None  # explicit backbone weights file; loaded even when pretrained is False
    image_size: int = 224  # input side the ViT's position embeddings are built for; CNNs take any size
    flow_stack: int = 5  # L consecutive flow fields per time step; the flow stream sees 2L channels
    flow_bound: float = 20.0  # px mapped to +-1 when flow is normalised (TSN's bound)
    lstm_layers: int = 3  # stacked recurrent layers in the recurrent heads
    lstm_hidden: int = 128  # recurrent units per direction
    lstm_dropout: float = 0.3  # dropout between recurrent layers
    attention_heads: int = 8  # heads of the self-attention after the recurrent layers
    dense_units: tuple[int, ...] = (256, 128)  # classifier widths; the last is the embedding size
    dropout: float = 0.5  # dropout after each hidden dense layer (Keras-style Dense, Dropout pairs)
    conv_channels: int = 256  # width of the temporal convolutions in conv1d_lstm
    conv_kernel: int = 3  # temporal kernel (odd, so the sequence keeps its length)
    transformer_layers: int = 2  # encoder layers of the transformer head
    transformer_dim: int = 256  # d_model of the transformer head
    transformer_ff: int = 512  # feed-forward width of the transformer head
    transformer_dropout: float = 0.1  # dropout inside the transformer encoder
    logistic_c: float = 0.1  # inverse L2 strength of the closed-form logistic head (scikit-learn's C)

    def __post_init__(self) -> None:
        _check_choice(self, "backbone", BACKBONES)
        _check_choice(self, "head", HEADS)
        _check_positive(self, "image_size", "flow_stack", "flow_bound", "lstm_layers", "lstm_hidden")
        _check_positive(self, "logistic_c")
        _check_positive(self, "attention_heads", "conv_channels", "conv_kernel", "transformer_layers")
        _check_positive(self, "transformer_dim", "transformer_ff")
        _check_fraction(self, "lstm_dropout", "dropout", "transformer_dropout")
        if not self.dense_units or any(u <= 0 for u in self.dense_units):
            raise ValueError(f"ModelConfig.dense_units must be positive widths, got {list(self.dense_units)}")
        if (2 * self.lstm_hidden) % self.attention_heads:
            raise ValueError(
                f"ModelConfig: attention_heads ({self.attention_heads}) must divide 2 * lstm_hidden ({2 * self.lstm_hidden})"
            )
        if self.transformer_dim % self.attention_heads:
            raise ValueError(
                f"ModelConfig: attention_heads ({self.attention_heads}) must divide transformer_dim ({self.transformer_dim})"
            )
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"ModelConfig.conv_kernel must be odd, got {self.conv_kernel}")

    @property
    def embed_dim(self) -> int:
        """Size of the penultimate embedding (`StreamModel.embed`)."""
        return self.dense_units[-1]

    def in_channels(self, stream: str) -> int:
        """Input channels of a stream: 3 for "rgb", 2L for "flow"."""
        if stream == "rgb":
            return 3
        if stream == "flow":
            return 2 * self.flow_stack
        raise ValueError(f"unknown stream {stream!r}; expected 'rgb' or 'flow'")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, d)


@dataclass(frozen=True)
class LossConfig:
    """Binary loss on the violence logit; label 1 = violent, 0 = non-violent."""

    kind: str = "focal"  # "focal" (Lin et al. 2017) or "bce"
    alpha: float = 0.7  # focal weight of the minority class; the other class gets 1 - alpha
    gamma: float = 2.0  # focal focusing exponent; 0 turns focal into alpha-weighted BCE
    label_smoothing: float = 0.1  # targets become y(1 - e) + e/2
    class_weights: str = "balanced"  # "balanced": N / (2 n_c) from the training labels; "none": off
    minority_label: int = 0  # the class alpha weights; non-violent is the minority in CCTV data (22%)

    def __post_init__(self) -> None:
        _check_choice(self, "kind", LOSSES)
        _check_choice(self, "class_weights", ("balanced", "none"))
        _check_choice(self, "minority_label", (0, 1))
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"LossConfig.alpha must be in [0, 1], got {self.alpha}")
        if self.gamma < 0:
            raise ValueError(f"LossConfig.gamma must be >= 0, got {self.gamma}")
        _check_fraction(self, "label_smoothing")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LossConfig:
        # TOML has no null, JSON does: both spellings of "off" are accepted.
        if d.get("class_weights", "") is None:
            d = {**d, "class_weights": "none"}
        return from_dict(cls, d)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, for both training stages.

    Stage 1 trains the head at `lr`; stage 2 fine-tunes end to end with the head at
    `lr * stage2_lr_factor` and the backbone a further `backbone_lr_factor` lower (1e-5 with the
    defaults, the report's fine-tuning rate).
    """

    optimizer: str = "adamw"  # "adamw" (decoupled weight decay) or "adam"
    lr: float = 1e-3  # peak learning rate of stage 1, reached after warm-up
    stage2_lr_factor: float = 0.1  # stage 2 peak lr = lr * this (10x smaller)
    backbone_lr_factor: float = 0.1  # backbone lr relative to the head's when it is trained
    weight_decay: float = 1e-4  # the report's L2 1e-4; not applied to biases and norm weights
    betas: tuple[float, float] = (0.9, 0.999)  # Adam moment decay rates
    warmup_fraction: float = 0.1  # share of each stage's steps spent warming up (report: 10 of 100 epochs)
    min_lr: float = 1e-6  # floor the cosine decays to
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    restarts: int = 0  # SGDR warm restarts within a stage; 0 = one cosine cycle

    def __post_init__(self) -> None:
        _check_choice(self, "optimizer", OPTIMIZERS)
        _check_positive(self, "lr", "stage2_lr_factor", "backbone_lr_factor")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.min_lr < 0 or self.restarts < 0:
            raise ValueError("OptimConfig: weight_decay, grad_clip, min_lr and restarts must be >= 0")
        if self.min_lr > self.lr:
            raise ValueError(f"OptimConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"OptimConfig.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be two numbers in [0, 1), got {list(self.betas)}")

    def stage_lr(self, stage: int) -> float:
        """Peak learning rate of the head in training stage 1 or 2."""
        if stage not in (1, 2):
            raise ValueError(f"training stage must be 1 or 2, got {stage}")
        return self.lr if stage == 1 else self.lr * self.stage2_lr_factor

    def warmup_steps(self, total_steps: int) -> int:
        """Warm-up length for a stage of `total_steps` optimiser steps."""
        return min(int(round(self.warmup_fraction * total_steps)), max(total_steps - 1, 0))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimConfig:
        return from_dict(cls, d)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as a plain dict: tuples become lists, None fields are left out."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def from_dict(cls: type[C], d: dict[str, Any]) -> C:
    """Build config `cls` from a plain dict; unknown keys or wrongly typed values raise ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a table of settings, got {type(d).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{cls.__name__}.{k}") for k, v in d.items()})


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check `value` against a field's type hint; lists become tuples, ints may stand for floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        return _coerce(value, hint, name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        item_hints = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_hints) != len(value):
            raise ValueError(f"{name} must have {len(item_hints)} items, got {list(value)}")
        return tuple(_coerce(v, h, name) for v, h in zip(value, item_hints, strict=True))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ValueError(f"{name} must be {hint.__name__}, got {value!r}")
    return value


def _check_choice(cfg: Any, name: str, choices: tuple) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(
            f"{type(cfg).__name__}.{name} must be one of {', '.join(map(str, choices))}; got {value!r}"
        )


def _check_positive(cfg: Any, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be > 0, got {getattr(cfg, name)}")


def _check_fraction(cfg: Any, *names: str) -> None:
    for name in names:
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be in [0, 1), got {getattr(cfg, name)}")
