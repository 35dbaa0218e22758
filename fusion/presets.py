"""Hardware presets of the whole job (`twostream run`, `twostream cv`): data, flow, training and TTA settings.

`cpu` is sized to finish the embedded synthetic dataset in minutes on a 2-core laptop and to learn
from a few dozen real clips without pretrained weights: 128 px frames (at 64 px the mean motion of
the SCFD clips, 0.16 px per frame, is below the store's 0.25 px flow step), Farneback flow
(~800 pairs/s there on two cores; TV-L1 ~5), 16 steps of 2-field flow stacks cut at 64 px, and
the training-free `hoghof` encoder (`streams.hoghof`: HOF and motion statistics for flow; for RGB,
how each step's brightness change splits over temporal frequencies plus statistics of the change
from the step before, TSN's RGB-difference modality, since single frames' appearance tells the
scenes apart, not fight from no fight): a randomly initialised CNN's
features carry next to nothing, and there is nothing to train it on. The head is the
closed-form `logistic` one (`streams.logistic`): L2 logistic regression (C = 0.1) on each clip's
pooled statistics of those descriptors, fitted to its optimum on the plain view, so one cached
view per video is enough and no epoch is picked on a validation part of 5-8 videos. On the 60
SCFD clips (6 seeds of 5-fold cross-validation, descriptors of version 2) it raised flow from
0.661 to 0.744 and fused from 0.656 to 0.701 over the 1-layer 32-unit Bi-LSTM trained for 100
epochs with best.pt by validation loss; that head's sizes stay in the fields below for configs
that switch back to head = "bilstm_attention" (which wants views = 4). No test-time augmentation. It generates 480 clips from
60 recordings: with fewer, the 15 % validation part is too small to place the operating threshold
well (160 clips gave 0.83-0.92 test accuracy from run to run, 480 give 0.92-0.99). `gpu` follows
the research report: 224 px frames, TV-L1 flow, 16 steps, VGG19 + 3-layer Bi-LSTM + attention, 30
head epochs then 70 fine-tuning epochs, 5 TTA views.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

PRESETS = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class Preset:
    """Everything `run` and `cv` choose for the user, one field per decision."""

    name: str  # "cpu" or "gpu"
    synthetic_videos: int  # clips generated when no dataset is given
    synthetic_recordings: int  # source recordings (groups) they come from
    size: int  # square side of the stored frames
    fps: float | None  # sampling rate of the stored frames; None keeps every frame
    flow_method: str  # "farneback" or "tvl1"
    flow_backend: str  # "auto", "torch" or "opencv"
    extract_workers: int  # decoding processes; 0 = one per core
    backbone: str  # frame encoder (streams.config.BACKBONES)
    head: str  # temporal head (streams.config.HEADS)
    stage: str  # "head", "finetune" or "both"
    epochs: int  # stage-1 epochs
    finetune_epochs: int  # stage-2 epochs
    steps: int  # T time steps per clip
    clip_size: int | None  # side fed to the backbone; None = the stored side
    flow_stack: int  # L flow fields per step
    views: int  # cached feature views per video (stage 1)
    minority_views: int  # cached views per video of the rarer class
    batch_size: int  # stage-1 clips per step
    finetune_batch_size: int  # stage-2 clips per step
    lstm_layers: int  # recurrent layers of the head
    lstm_hidden: int  # recurrent units per direction
    attention_heads: int  # self-attention heads of the head
    dense_units: tuple[int, ...]  # classifier widths of the head
    lr: float  # stage-1 peak learning rate
    patience: int  # early-stopping patience in epochs; 0 = never stop early
    metric: str  # val metric picking best.pt: "accuracy", "f1", "auc" or "loss"
    weight_decay: float  # AdamW decoupled weight decay of the head
    tta: int  # test-time views per video and stream at evaluation
    inner_folds: int  # cv: inner group folds whose out-of-fold predictions fit fusion and thresholds; 0 = the val part

    def run_config(self, epochs: int | None = None, seed: int = 0):
        """The training config of this preset (`epochs` overrides the stage-1 epochs)."""
        from streams.rundir import resolve_run_config

        overrides = {
            "train": {
                "stage": self.stage,
                "epochs": epochs if epochs is not None else self.epochs,
                "finetune_epochs": self.finetune_epochs,
                "steps": self.steps,
                "size": self.clip_size,
                "views": self.views,
                "minority_views": self.minority_views,
                "batch_size": self.batch_size,
                "finetune_batch_size": self.finetune_batch_size,
                "feature_batch_size": 16 if self.name == "cpu" else 64,
                "num_workers": 0 if self.name == "cpu" else 4,
                "patience": self.patience,
                "metric": self.metric,
                "seed": seed,
            },
            "model": {
                "backbone": self.backbone,
                "head": self.head,
                "flow_stack": self.flow_stack,
                "lstm_layers": self.lstm_layers,
                "lstm_hidden": self.lstm_hidden,
                "attention_heads": self.attention_heads,
                "dense_units": list(self.dense_units),
            },
            "optim": {"lr": self.lr, "weight_decay": self.weight_decay},
        }
        return resolve_run_config(None, overrides)

    def extract_config(self, device: str = "auto"):
        """The flow-extraction config of this preset."""
        from data.sampling import Sampling
        from flow.extract import ExtractConfig

        return ExtractConfig(
            method=self.flow_method,
            backend=self.flow_backend,
            device=device,
            sampling=Sampling(fps=self.fps, size=self.size),
            workers=self.extract_workers,
        )

    def synthetic_spec(self):
        """The synthetic dataset generated when no dataset is given."""
        from data.synthetic import SyntheticSpec

        return SyntheticSpec(videos=self.synthetic_videos, recordings=self.synthetic_recordings)


CPU = Preset(
    name="cpu",
    synthetic_videos=480,
    synthetic_recordings=60,
    size=128,
    fps=None,
    flow_method="farneback",
    flow_backend="auto",
    extract_workers=1,
    backbone="hoghof",
    head="logistic",
    stage="head",
    epochs=100,
    finetune_epochs=1,
    steps=16,
    clip_size=64,
    flow_stack=2,
    views=1,
    minority_views=1,
    batch_size=16,
    finetune_batch_size=4,
    lstm_layers=1,
    lstm_hidden=32,
    attention_heads=4,
    dense_units=(32, 16),
    lr=1e-3,
    patience=0,
    metric="loss",
    weight_decay=0.01,
    tta=1,
    inner_folds=4,
)

GPU = Preset(
    name="gpu",
    synthetic_videos=160,
    synthetic_recordings=20,
    size=224,
    fps=None,
    flow_method="tvl1",
    flow_backend="auto",
    extract_workers=0,
    backbone="vgg19",
    head="bilstm_attention",
    stage="both",
    epochs=30,
    finetune_epochs=70,
    steps=16,
    clip_size=None,
    flow_stack=5,
    views=2,
    minority_views=10,
    batch_size=64,
    finetune_batch_size=8,
    lstm_layers=3,
    lstm_hidden=128,
    attention_heads=8,
    dense_units=(256, 128),
    lr=1e-3,
    patience=20,
    metric="accuracy",
    weight_decay=1e-4,
    tta=5,
    inner_folds=0,
)


def choose_preset(name: str | Preset = "auto") -> Preset:
    """The named preset; "auto" takes `gpu` when torch sees a CUDA device, else `cpu`. A `Preset`
    is returned as it is."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu"
    return CPU if name == "cpu" else GPU


def train_devices(preset: Preset) -> tuple[str, str]:
    """Devices of the two streams: two GPUs when there are, else both on one device."""
    if preset.name == "gpu" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        return ("cuda:0", "cuda:1") if count > 1 else ("cuda:0", "cuda:0")
    return ("cpu", "cpu")


def with_changes(preset: Preset, **changes) -> Preset:
    """`preset` with some fields replaced (None values are ignored)."""
    return replace(preset, **{k: v for k, v in changes.items() if v is not None})
