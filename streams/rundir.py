"""A stream's run directory, `RUN/<stream>/`, and the resolved config it records.

    config.toml            the resolved config: [run] (stream, store, features, ...), [train], [model],
                           [loss], [optim], [augment]; `--config` accepts it back
    environment.json       python/torch/CUDA versions, device name, git commit, hostname, argv
    metrics.jsonl          one JSON object per epoch (stage, epoch, lr, train loss, val metrics, clips/s)
    train.log              the run's log
    best.pt, last.pt       checkpoints (streams.checkpoint): the best val metric so far, the last epoch
    predictions_<split>.csv, embeddings_<split>.npy
                           per-video logits of best.pt on val and test (fusion.predictions format)

Settings resolve as defaults <- TOML file <- command-line options.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.augment import AugmentConfig
from streams.checkpoint import load_checkpoint, save_checkpoint
from streams.config import CLOSED_FORM_HEADS, LossConfig, ModelConfig, OptimConfig
from streams.train import TrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

log = logging.getLogger(__name__)

SECTIONS = ("train", "model", "loss", "optim", "augment")
_CLASSES = {"train": TrainConfig, "model": ModelConfig, "loss": LossConfig, "optim": OptimConfig,
            "augment": AugmentConfig}
# Settings a resumed run may change: they alter speed, never the result.
RUNTIME_KEYS = {("train", "num_workers"), ("train", "threads"), ("train", "feature_memory_gb"),
                ("train", "feature_batch_size")}


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a stream's training, one table per subsystem."""

    train: TrainConfig = field(default_factory=TrainConfig)  # stages, epochs, batches, sampling, data split
    model: ModelConfig = field(default_factory=ModelConfig)  # backbone and temporal head
    loss: LossConfig = field(default_factory=LossConfig)  # focal / BCE settings
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimiser and lr schedule
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # stage 2 clips and cached feature views

    def __post_init__(self) -> None:
        if self.model.head in CLOSED_FORM_HEADS and self.train.stage == "finetune":
            raise ValueError(f"the {self.model.head} head is fitted in closed form on cached features (stage 1): "
                             "use stage = head or both, not finetune")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    def with_weights(self, pretrained: bool = False, weights_path: str | Path | None = None) -> RunConfig:
        """This config starting its backbones from ImageNet weights (hub cache) or a weights file.

        Checked now (a backbone without weights, a missing file: one-line errors), before any work.
        """
        if not pretrained and weights_path is None:
            return self
        from streams.backbones import weights_file

        weights_file(self.model.backbone, pretrained, weights_path)
        return replace(self, model=replace(
            self.model, pretrained=pretrained or self.model.pretrained,
            weights_path=str(weights_path) if weights_path is not None else self.model.weights_path))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(d) - set(SECTIONS) - {"run"})
        if unknown:
            raise ValueError(f"unknown config table(s) [{'], ['.join(unknown)}]; known: {', '.join(SECTIONS)}")
        return cls(**{name: _CLASSES[name].from_dict(d.get(name, {})) for name in SECTIONS})


def resolve_run_config(config_file: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None,
                       base: RunConfig | None = None) -> RunConfig:
    """`base` (default: the defaults) <- the TOML file's tables <- `overrides` (None values are not given)."""
    merged = (base or RunConfig()).to_dict()
    if config_file is not None:
        for name, table in read_toml(config_file).items():
            if name == "run":
                continue
            if name not in SECTIONS or not isinstance(table, dict):
                raise ValueError(f"{config_file}: unknown table [{name}]; known: {', '.join(SECTIONS)}")
            merged[name].update(table)
    for name, table in (overrides or {}).items():
        if name not in SECTIONS:
            raise ValueError(f"unknown config table {name!r}")
        merged[name].update({k: v for k, v in table.items() if v is not None})
    return RunConfig.from_dict(merged)


def config_differences(a: RunConfig, b: RunConfig, ignore: set[tuple[str, str]] = frozenset()) -> list[str]:
    """Settings that differ between two configs, as "table.key (a -> b)" strings."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for name in SECTIONS:
        for key in sorted(set(da[name]) | set(db[name])):
            if (name, key) not in ignore and da[name].get(key) != db[name].get(key):
                out.append(f"{name}.{key} ({da[name].get(key)!r} -> {db[name].get(key)!r})")
    return out


# --- TOML ---------------------------------------------------------------------------------------


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path} is not valid TOML: {exc}") from None


def dumps_toml(data: dict[str, Any]) -> str:
    """TOML for a dict of plain values and (nested) tables; None values are left out (TOML has no null)."""
    lines: list[str] = []
    _table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(data: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        lines += ["", "[" + ".".join(_key(p) for p in path) + "]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in scalars.items()]
    for k, v in tables.items():
        _table(v, [*path, k], lines)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) if not math.isfinite(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Path):
        return json.dumps(str(v))
    raise ValueError(f"cannot write {type(v).__name__} value {v!r} to TOML")


# --- environment --------------------------------------------------------------------------------


def environment_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions, device, git commit, host and command line, for environment.json."""
    device = torch.device(device) if device is not None else None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "numpy": np.__version__,
        "device": str(device) if device is not None else None,
        "device_name": _device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "argv": list(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        if key in os.environ:
            info[key.lower()] = os.environ[key]
    return info


def _device_name(device: torch.device | None) -> str:
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the repository the code runs from (with "+dirty" for local changes), if any."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


# --- the directory ------------------------------------------------------------------------------


class RunDir:
    """`RUN/<stream>/`: paths and the writes a training run makes there."""

    def __init__(self, root: str | Path, stream: str) -> None:
        if stream not in ("rgb", "flow"):
            raise ValueError(f"unknown stream {stream!r}; expected 'rgb' or 'flow'")
        self.root = Path(root)
        self.stream = stream
        self.path = self.root / stream

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def environment_path(self) -> Path:
        return self.path / "environment.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.path / "train.log"

    def checkpoint_path(self, name: str) -> Path:
        if name not in ("best", "last"):
            raise ValueError(f"checkpoint name must be 'best' or 'last', got {name!r}")
        return self.path / f"{name}.pt"

    def predictions_path(self, split: str) -> Path:
        return self.path / f"predictions_{split}.csv"

    def prepare(self, resume: bool) -> None:
        """Create the folder; a new run must not overwrite a finished or killed one, a resume needs last.pt."""
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"--out {self.root} exists and is not a folder")
        last = self.checkpoint_path("last")
        if resume and not last.is_file():
            raise FileNotFoundError(f"nothing to resume: {last} does not exist; drop --resume to start this run")
        if not resume and (last.is_file() or self.checkpoint_path("best").is_file()):
            raise FileExistsError(f"{self.path} already holds a run; pass --resume to continue it or choose "
                                  "another --out")
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: RunConfig, run: dict[str, Any]) -> Path:
        from fusion.predictions import write_atomic

        return write_atomic(self.config_path, dumps_toml({"run": run, **cfg.to_dict()}))

    def read_config(self) -> tuple[RunConfig, dict[str, Any]]:
        """The saved config and its [run] table."""
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.config_path} does not exist; is {self.root} a run folder of `twostream train`?")
        data = read_toml(self.config_path)
        return RunConfig.from_dict(data), data.get("run", {})

    def _saved(self) -> dict | None:
        """config.toml as plain tables, not resolved: a config this version cannot resolve still
        says what the checks below need. None without one (a run of prediction files only)."""
        return read_toml(self.config_path) if self.config_path.is_file() else None

    def check_encoder(self, saved: dict | None = None) -> None:
        """Refuse a trained stream whose encoder has changed since: ValueError naming it.

        A hand-crafted encoder (hoghof) records its descriptor version in config.toml's [run]
        table when the stream trains. Under another version the same config computes other
        features, so the stream's head, predictions and every figure made from them are stale,
        even where the shapes still fit. A run folder without a config.toml has nothing to check.
        `saved`: config.toml already read (`_saved`).
        """
        from streams.features import encoder_version

        saved = saved if saved is not None else self._saved()
        if saved is None:
            return
        backbone = saved.get("model", {}).get("backbone", ModelConfig.backbone)
        current, recorded = encoder_version(backbone), saved.get("run", {}).get("encoder_version")
        if recorded == current or (current == 0 and recorded is None):
            return
        made = f"version {recorded}" if recorded is not None else "an earlier version (unrecorded)"
        raise ValueError(f"{self.root} was trained on {backbone} descriptors of {made}, and this twostream "
                         f"computes version {current}: its predictions are stale; delete the folder to retrain it, "
                         "or choose another --out")

    def check_store(self, store: str | Path | None = None, saved: dict | None = None) -> None:
        """Refuse a trained stream made from another store than `store`, or from a store that was
        extracted again at its path since: ValueError naming both.

        A stream's figures hold only for the store it records in config.toml's [run] table (its
        path and its `store_id`). Reused with another store, a rerun would report the old store's
        results as the new one's; a store extracted again under the same path, or grown since,
        has another id. A store at another path with the recorded id is the same store moved
        (with its run folder). `store` None checks the recorded path. Nothing recorded, or a store
        that is gone or unreadable, passes (others report those).
        """
        from data.store import identity_of, store_exists

        saved = saved if saved is not None else self._saved()
        run = (saved or {}).get("run", {})
        recorded = run.get("store")
        if not recorded:
            return
        here = Path(store) if store is not None else Path(recorded)
        moved = here.resolve() != Path(recorded).resolve()
        current = ""
        if store_exists(here) and not here.is_dir():
            try:
                current = identity_of(here)
            except (OSError, ValueError):  # unreadable: others report it
                pass
        if moved and not (current and current == run.get("store_id")):  # a folder moved with its store is the same
            raise ValueError(f"{self.root} was trained on the store {recorded}, not {here}; choose another --out, "
                             "or delete it to retrain")
        if current and run.get("store_id") and current != run["store_id"]:
            raise ValueError(f"the store {recorded} was extracted again after {self.root} was trained on it, so its "
                             "predictions are of the old store; delete the folder to retrain it, or choose another --out")

    def check_current(self, store: str | Path | None = None) -> None:
        """`check_encoder` and `check_store` on one reading of config.toml: whether this trained
        stream still belongs to this twostream and to `store` (None: the store it records)."""
        saved = self._saved()
        self.check_encoder(saved)
        self.check_store(store, saved)

    def write_environment(self, device: torch.device | str | None = None, **extra: Any) -> Path:
        from fusion.predictions import write_atomic

        info = {**environment_info(device), **extra}
        return write_atomic(self.environment_path, json.dumps(info, indent=2, default=str) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete epoch record (a line cut short by a kill is skipped)."""
        if not self.metrics_path.is_file():
            return []
        out = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def truncate_metrics(self, stage: int, epoch: int) -> None:
        """Drop records after (stage, epoch): the epochs a resumed run will train again."""
        from fusion.predictions import write_atomic

        order = {"head": 1, "finetune": 2}
        keep = [r for r in self.read_metrics() if (order.get(r.get("stage"), 0), r.get("epoch", -1)) <= (stage, epoch)]
        write_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> Path:
        return save_checkpoint(self.checkpoint_path(name), state)

    def load_checkpoint(self, name: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.checkpoint_path(name), map_location)

    def write_predictions(self, split: str, video_ids, labels, logits, embeddings: np.ndarray | None = None) -> Path:
        from fusion.predictions import split_paths, write_embeddings, write_predictions

        csv_path, npy_path = split_paths(self.path, split)
        write_predictions(csv_path, video_ids, labels, logits)
        if embeddings is not None:
            write_embeddings(npy_path, embeddings)
        return csv_path


# --- models back from a run ---------------------------------------------------------------------


def build_model(cfg: RunConfig, stream: str):
    """The stream model of `cfg`, its random initialisation fixed by the run's seed.

    A backbone without pretrained weights is then the same network the stage-1 features were
    cached with (when this run cached them), so a head trained on them fits it.
    """
    from streams.model import build_stream_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_stream_model(cfg.model, stream)


def load_stream_model(stream_dir: str | Path, which: str = "best", device: str | torch.device = "cpu"):
    """A trained StreamModel from `RUN/<stream>/` in eval mode; returns (model, RunConfig, checkpoint info).

    A stage-1 checkpoint holds the head only; the backbone is then rebuilt as the features were
    made (pretrained weights, a weights file, or the run's seeded initialisation).
    """
    stream_dir = Path(stream_dir)
    run = RunDir(stream_dir.parent, stream_dir.name) if stream_dir.name in ("rgb", "flow") else None
    if run is None:
        raise ValueError(f"{stream_dir} is not a stream folder of a run (expected RUN/rgb or RUN/flow)")
    run.check_encoder()
    cfg, info = run.read_config()
    ckpt = run.load_checkpoint(which)
    model = build_model(cfg, run.stream)
    if ckpt.get("module") == "head":
        if not cfg.model.pretrained and cfg.model.weights_path is None and cfg.model.backbone != "hoghof":  # hoghof: no weights
            log.warning("%s: the backbone has no pretrained weights; it matches the cached features only "
                        "when the training run cached them itself", stream_dir)
    try:
        (model.head if ckpt.get("module") == "head" else model).load_state_dict(ckpt["model"])
    except RuntimeError as exc:  # shapes or names differ: the checkpoint is another version's model
        first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else ""
        raise ValueError(
            f"{stream_dir / (which + '.pt')} does not fit the model this version builds from its config.toml "
            f"(its {cfg.model.backbone} features or head changed since it was trained: {first[:120]}); "
            "retrain the stream"
        ) from None
    model.to(device).eval()
    meta = {k: ckpt.get(k) for k in ("stage", "module", "epoch", "step", "best", "metrics")}
    return model, cfg, {**meta, "run": info}
