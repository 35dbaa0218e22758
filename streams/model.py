"""The stream model: a per-frame backbone followed by a temporal head (VGG19 + Bi-LSTM + attention by default).

The same class serves both streams: RGB clips (N, T, 3, H, W) and flow clips (N, T, 2L, H, W),
where each time step of a flow clip is a stack of L flow fields (`normalize_flow`).

Training runs in two stages: stage 1 freezes the backbone and trains the head (usually on cached
features through `forward_head`); stage 2 trains end to end with the backbone at a smaller
learning rate (`param_groups`).
"""

from __future__ import annotations

import torch
from torch import nn

from streams.backbones import Backbone, build_backbone
from streams.config import ModelConfig
from streams.heads import TemporalHead, build_head


class StreamModel(nn.Module):
    """Backbone + temporal head: clips (N, T, C, H, W) -> violence logits (N,)."""

    def __init__(self, backbone: Backbone, head: TemporalHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_frozen = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-step features, all frames through the backbone as one batch. Shape: (N, T, C, H, W) -> (N, T, D)."""
        if x.ndim != 5:
            raise ValueError(f"clips must be (N, T, C, H, W), got {tuple(x.shape)}")
        # A frozen backbone needs no activation graph; dropping it saves most of the memory.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            return self.backbone.forward_clips(x)  # (N, T, D)

    def forward_head(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Shape: (N, T, D), mask (N, T) -> logits (N,)."""
        return self.head(features, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Shape: (N, T, C, H, W), mask (N, T) -> logits (N,)."""
        return self.head(self.forward_features(x), mask)

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Penultimate clip embedding. Shape: (N, T, C, H, W) -> (N, E), E = dense_units[-1]."""
        return self.head.embed(self.forward_features(x), mask)

    def embed_features(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Penultimate clip embedding from cached features. Shape: (N, T, D) -> (N, E)."""
        return self.head.embed(features, mask)

    def freeze_backbone(self, frozen: bool = True) -> StreamModel:
        """Stop (or resume) training the backbone; a frozen backbone also stays in eval mode."""
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.backbone.train(self.training and not frozen)
        return self

    def train(self, mode: bool = True) -> StreamModel:
        super().train(mode)
        # Batch-norm statistics and dropout of a frozen backbone must not change with the head's mode.
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def param_groups(self, lr: float, weight_decay: float = 0.0, backbone_lr_factor: float = 0.1) -> list[dict]:
        """Optimiser parameter groups: head at `lr`, backbone at `lr * backbone_lr_factor`.

        Only trainable parameters are included. Biases and norm weights (ndim < 2) get no weight
        decay. Each group records `lr_scale` (its lr relative to `lr`) so a schedule can move all
        groups together (`streams.schedule.set_lr`).
        """
        groups = []
        for name, module, scale in (("head", self.head, 1.0), ("backbone", self.backbone, backbone_lr_factor)):
            params = [p for p in module.parameters() if p.requires_grad]
            for suffix, wd, chosen in (("", weight_decay, [p for p in params if p.ndim >= 2]),
                                       ("_no_decay", 0.0, [p for p in params if p.ndim < 2])):
                if chosen:
                    groups.append({"params": chosen, "lr": lr * scale, "lr_scale": scale,
                                   "weight_decay": wd, "name": name + suffix})
        return groups


def build_stream_model(cfg: ModelConfig, stream: str = "rgb") -> StreamModel:
    """The model of `cfg` for the "rgb" stream (3 channels) or the "flow" stream (2L channels)."""
    backbone = build_backbone(cfg.backbone, cfg.in_channels(stream), cfg.pretrained, cfg.weights_path,
                              cfg.image_size)
    return StreamModel(backbone, build_head(cfg, backbone.out_dim))
