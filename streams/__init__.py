"""Backbones, the stream model (VGG19 + Bi-LSTM + attention), losses, schedules and training."""

from __future__ import annotations

from data.lazy_exports import lazy_exports

# Public names and the module that defines each, imported on first use (data.lazy_exports).
_EXPORTS = {
    "ModelConfig": "streams.config",
    "LossConfig": "streams.config",
    "OptimConfig": "streams.config",
    "build_backbone": "streams.backbones",
    "Backbone": "streams.backbones",
    "normalize_rgb": "streams.backbones",
    "normalize_flow": "streams.backbones",
    "build_head": "streams.heads",
    "StreamModel": "streams.model",
    "build_stream_model": "streams.model",
    "focal_loss": "streams.losses",
    "FocalLoss": "streams.losses",
    "build_loss": "streams.losses",
    "lr_at": "streams.schedule",
    "TrainConfig": "streams.train",
    "train_one_epoch": "streams.train",
    "evaluate": "streams.train",
    "fit_stage": "streams.train",
    "save_checkpoint": "streams.checkpoint",
    "load_checkpoint": "streams.checkpoint",
    "RunConfig": "streams.rundir",
    "load_stream_model": "streams.rundir",
    "train_stream": "streams.launch",
    "train_both": "streams.launch",
    "cache_features": "streams.features",
    "FeatureDataset": "streams.features",
    "features_path": "streams.features",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
