"""Running training: one stream in this process (alone or as one DDP rank), or both streams as two processes.

`train_stream` is what `twostream train --stream rgb|flow` runs: split the store, cache stage-1
features when they are missing, train stage 1 and/or stage 2 (streams.train), then write the
val/test predictions of best.pt. Under `torchrun` it joins the process group (NCCL on GPUs, gloo
on CPU), takes its device from LOCAL_RANK and trains with DistributedDataParallel; rank 0 alone
writes files. `train_both` starts one spawned process per stream on its own device, each logging
to RUN/<stream>/train.log and reporting progress through a queue; one failing keeps the other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import queue as queue_mod
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flow.devices import cpu_count, resolve_device
from streams.rundir import RUNTIME_KEYS, RunConfig, RunDir, build_model, config_differences
from streams.train import (
    EpochSampler,
    FeatureBank,
    fit_stage,
    parse_fold,
    predict,
    resolve_precision,
    use_fused_lstm,
)

log = logging.getLogger(__name__)

STREAMS = ("rgb", "flow")
Event = Callable[[dict], None]


# --- distributed --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a (possibly one-process) training job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> tuple[DistInfo, bool]:
    """Join the torchrun process group when WORLD_SIZE > 1; returns (info, whether this call created it).

    Each rank's device: `device` "cpu" keeps it on the CPU; "auto"/"cuda" take cuda:LOCAL_RANK; a
    comma-separated list takes its LOCAL_RANK-th entry.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device)), False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    names = [d.strip() for d in str(device).split(",") if d.strip()] or ["auto"]
    name = names[local % len(names)]
    if name in ("auto", "cuda") and torch.cuda.is_available():
        name = f"cuda:{local % torch.cuda.device_count()}"
    dev = resolve_device(name)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if not torch.distributed.is_initialized():
        # Long timeout: rank 0 may cache features while the others wait at a barrier.
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(hours=3))
        created = True
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local, dev), created


def barrier(info: DistInfo) -> None:
    if info.world > 1:
        torch.distributed.barrier()


# --- data ---------------------------------------------------------------------------------------


def split_ids(store: str | Path, cfg) -> dict[str, list[str]]:
    """Train/val/test video ids of the store under `TrainConfig` cfg (fold, or the store's or a fresh split)."""
    from data.clips import video_ids_for_split

    fold = parse_fold(cfg.fold)
    if fold is not None or cfg.split == "store":
        return video_ids_for_split(store, fold=fold, seed=cfg.seed)
    from data.manifest import ManifestRow
    from data.splits import assign_splits
    from data.store import Store

    with Store(store) as s:
        rows = [ManifestRow(v, str(a.get("source_path", "")), int(a["label"]), str(a.get("group") or v), "")
                for v, a in ((v, s.attrs(v)) for v in s.video_ids)]
    rows = assign_splits(rows, seed=cfg.seed)
    return {name: [r.video_id for r in rows if r.split == name] for name in ("train", "val", "test")}


def store_labels(store: str | Path, video_ids: Sequence[str]) -> np.ndarray:
    from data.store import Store

    with Store(store) as s:
        return np.array([s.label(v) for v in video_ids], np.int64)


def check_stream_data(store: str | Path, stream: str, video_id: str) -> None:
    """A store extracted without this stream fails here, naming the command that makes it."""
    from data.store import Store

    with Store(store) as s:
        try:
            (s.rgb if stream == "rgb" else s.flow)(video_id, [0])
        except (KeyError, OSError):
            raise ValueError(f"{store} has no {stream} data (video {video_id!r}); extract it with "
                             "`twostream extract`") from None


def check_training_split(ids: dict[str, list[str]], labels: dict[str, np.ndarray], metric: str) -> None:
    """User mistakes in the split, raised before anything trains."""
    if not ids["train"]:
        raise ValueError("the training split is empty; check the store's split attrs or the --fold")
    if not ids["val"]:
        raise ValueError("the validation split is empty: best.pt and early stopping need val videos")
    counts = np.bincount(labels["train"], minlength=2)
    if (counts == 0).any():
        only = int(np.argmax(counts))
        raise ValueError(f"the training split holds only label {only} ({'violent' if only else 'non-violent'}) "
                         f"videos ({counts[only]}); training needs both classes: fix the labels or the split")
    if metric == "auc" and len(np.unique(labels["val"])) < 2:
        raise ValueError("metric auc needs both classes in the validation split; choose --metric accuracy")


def clip_config(cfg: RunConfig):
    """The ClipConfig a run's clips are cut with (evaluation form; `replace(..., train=True)` for training)."""
    from data.clips import ClipConfig

    return ClipConfig(steps=cfg.train.steps, flow_stack=cfg.model.flow_stack, size=cfg.train.size)


def ensure_features(store: Path, stream: str, cfg: RunConfig, device: torch.device,
                    on_event: Event | None = None) -> tuple[Path, RunConfig]:
    """The features file for stage 1, cached now when missing or made with other clip/backbone settings.

    An existing file with the same clips and backbone weights, made from this very store (not one
    deleted and extracted again at its path: stage 1 takes its labels from the features file), is
    used as it is; its views replace the config's so the saved config says what trained.
    """
    from data.store import Store, store_identity
    from streams.features import (
        cache_features,
        encoder_version,
        features_attrs,
        features_path,
        labels_agree,
        store_flow_signature,
    )

    path = features_path(store, stream, cfg.model.backbone)
    clip = clip_config(cfg)
    with Store(store) as s:
        labels = {v: s.label(v) for v in s.video_ids}
        flow_settings = store_flow_signature(s.root_attrs)
        identity = store_identity(s.root_attrs)
    attrs = features_attrs(path)
    wanted = {"stream": stream, "backbone": cfg.model.backbone, "clip": json.dumps(clip.to_dict(), sort_keys=True),
              "pretrained": cfg.model.pretrained, "weights_path": str(cfg.model.weights_path or ""),
              "store_id": identity}
    if attrs is not None and "store_id" not in attrs and attrs.get("store") == str(store.resolve()):
        # Made before features recorded their store's id: this path, these settings and the labels checked
        # below vouch for it (a store extracted again with the same settings holds the same frames).
        del wanted["store_id"]
    version = encoder_version(cfg.model.backbone)
    if version:  # hoghof: features of another descriptor version are stale
        wanted["encoder_version"] = version
    elif not cfg.model.pretrained and not cfg.model.weights_path:
        # A randomly initialised CNN is whatever the seed draws, and stage 2, TTA and predict rebuild it from
        # the run's seed: features of another seed came from another network.
        wanted["seed"] = cfg.train.seed
    if attrs is not None and max(int(attrs.get("views", 1)), int(attrs.get("minority_views", 1))) > 1:
        wanted["augment"] = json.dumps(cfg.augment.to_dict(), sort_keys=True)  # views 1.. are augmented draws
    if attrs is not None and attrs.get("store_flow", "{}") != "{}":  # a store re-extracted with other settings
        wanted["store_flow"] = flow_settings
    if attrs is not None and all(attrs.get(k) == v for k, v in wanted.items()) and labels_agree(path, labels):
        log.info("using cached features %s", path)
    else:
        log.info("caching %s features in %s", stream, path)

        def progress(done: int, total: int) -> None:
            if on_event is not None:
                on_event({"event": "features", "done": done, "total": total})

        path = cache_features(store, stream, cfg.model.backbone, cfg.train.views, cfg.train.minority_views, clip,
                              device, cfg.train.feature_batch_size, cfg.model.pretrained, cfg.model.weights_path,
                              cfg.train.num_workers, augment=cfg.augment, seed=cfg.train.seed, on_progress=progress)
        attrs = features_attrs(path)
    train = replace(cfg.train, views=int(attrs["views"]), minority_views=int(attrs["minority_views"]))
    return path, replace(cfg, train=train)


def _shard(n: int, rank: int, world: int) -> np.ndarray:
    """Evaluation indices of one process: every index once over all processes (plus DistributedSampler padding)."""
    from torch.utils.data import DistributedSampler

    if world == 1:
        return np.arange(n)
    return np.fromiter(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False), np.int64)


def _local_batch(global_batch: int, world: int) -> int:
    if global_batch % world:
        raise ValueError(f"the batch size ({global_batch}) must be a multiple of the number of processes ({world})")
    return global_batch // world


# --- optimiser ----------------------------------------------------------------------------------


def make_optimizer(groups: list[dict], cfg, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW or Adam over parameter groups (each with its own lr and weight decay).

    `fused` (default: when every parameter is on a CPU or CUDA device) updates all parameters in
    one kernel; on a CPU that is ~7x faster than the per-tensor update, which matters in stage 1.
    """
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return cls(groups, lr=groups[0]["lr"], betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
               fused=fused or None)


def head_param_groups(head: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The head's trainable parameters; biases and norm weights (ndim < 2) without weight decay."""
    params = [p for p in head.parameters() if p.requires_grad]
    return [g for g in ({"params": [p for p in params if p.ndim >= 2], "lr": lr, "lr_scale": 1.0,
                         "weight_decay": weight_decay, "name": "head"},
                        {"params": [p for p in params if p.ndim < 2], "lr": lr, "lr_scale": 1.0,
                         "weight_decay": 0.0, "name": "head_no_decay"}) if g["params"]]


# --- one stream ---------------------------------------------------------------------------------


def train_stream(store: str | Path, stream: str, out: str | Path, cfg: RunConfig | None = None,
                 device: str = "auto", resume: bool = False, on_event: Event | None = None) -> Path:
    """Train one stream into `out/<stream>/`; returns that folder.

    With `resume`, the saved config.toml decides (`cfg` may only change RUNTIME_KEYS) and training
    continues from last.pt. Raises ValueError/FileNotFoundError for user mistakes and
    NonFiniteLossError when the loss diverges.
    """
    from data.store import require_store

    store = Path(store)
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; expected 'rgb' or 'flow'")
    require_store(store)
    info, created = init_distributed(device)
    try:
        return _train_stream(store, stream, RunDir(out, stream), cfg or RunConfig(), info, resume, on_event)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _train_stream(store: Path, stream: str, run: RunDir, cfg: RunConfig, info: DistInfo, resume: bool,
                  on_event: Event | None) -> Path:
    if resume:
        if not run.checkpoint_path("last").is_file():
            raise FileNotFoundError(f"nothing to resume: {run.checkpoint_path('last')} does not exist; "
                                    "drop --resume to start this run")
        run.check_current(store)  # a head cut short on other hoghof descriptors or another store must not carry on
        saved, _ = run.read_config()
        ignore = RUNTIME_KEYS | {("train", "views"), ("train", "minority_views")}
        diff = config_differences(saved, cfg, ignore)
        if diff:
            raise ValueError(f"--resume continues {run.path} with its saved config, but these settings differ: "
                             f"{'; '.join(diff)}. Repeat the original options or start a new --out")
        runtime = {k: getattr(cfg.train, k) for (t, k) in RUNTIME_KEYS if t == "train"}
        cfg = replace(saved, train=replace(saved.train, **runtime))
    if info.main:
        run.prepare(resume)
    barrier(info)
    if not info.main and resume and not run.checkpoint_path("last").is_file():
        raise FileNotFoundError(f"{run.checkpoint_path('last')} is not visible from rank {info.rank}; "
                                "DDP resumes need a shared filesystem")
    with _log_to(run.log_path if info.main else None):
        return _run(store, stream, run, cfg, info, resume, on_event)


def _run(store: Path, stream: str, run: RunDir, cfg: RunConfig, info: DistInfo, resume: bool,
         on_event: Event | None) -> Path:
    from data.store import identity_of
    from streams.features import encoder_version

    if cfg.augment.mixup:
        raise ValueError("mixup is not supported by `train`; set augment.mixup = false")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # Dropout draws from the global generators; each process gets its own stream of them.
    torch.manual_seed(cfg.train.seed + info.rank)
    np.random.seed(cfg.train.seed + info.rank)
    random.seed(cfg.train.seed + info.rank)
    _local_batch(cfg.train.batch_size, info.world)
    _local_batch(cfg.train.finetune_batch_size, info.world)
    ids = split_ids(store, cfg.train)
    labels = {k: store_labels(store, v) for k, v in ids.items()}
    check_training_split(ids, labels, cfg.train.metric)
    check_stream_data(store, stream, ids["train"][0])
    log.info("%s: %d train, %d val, %d test videos on %s (%d process%s)", stream, len(ids["train"]),
             len(ids["val"]), len(ids["test"]), info.device, info.world, "es" if info.world > 1 else "")
    features = None
    if 1 in cfg.train.stages:
        if info.main:
            features, cfg = ensure_features(store, stream, cfg, info.device, on_event)
        barrier(info)
        if not info.main:
            features, cfg = ensure_features(store, stream, cfg, info.device)
    run_info = {"stream": stream, "store": str(store.resolve()), "features": str(Path(features).resolve()) if features else "",
                "world_size": info.world, "train_videos": len(ids["train"]), "val_videos": len(ids["val"]),
                "test_videos": len(ids["test"]), "encoder_version": encoder_version(cfg.model.backbone),
                "store_id": identity_of(store)}
    if info.main:
        run.write_config(cfg, run_info)
        run.write_environment(info.device, world_size=info.world)
    last = run.load_checkpoint("last") if resume else None
    if last is not None and info.main:
        run.truncate_metrics(last["stage"], last["epoch"])
    best = last.get("best") if last is not None else None
    precision = resolve_precision(cfg.train.amp, info.device)
    for stage in cfg.train.stages:
        if last is not None and (last["stage"] > stage or (last["stage"] == stage and last["stage_finished"])):
            continue  # this stage finished before the run was stopped
        resume_state = last if last is not None and last["stage"] == stage else None
        trainer = _stage1 if stage == 1 else _stage2
        result = trainer(store, stream, run, cfg, info, ids, labels, features, precision, resume_state, best,
                         on_event)
        best = result["best"]
        barrier(info)
    _write_predictions(store, stream, run, cfg, info, ids, features, precision)
    barrier(info)
    if on_event is not None:
        on_event({"event": "done", "best": best})
    return run.path


def _extra(cfg: RunConfig, module: str, stream: str) -> dict:
    return {"module": module, "stream": stream, "config": cfg.to_dict()}


def _stage1(store, stream, run, cfg, info, ids, labels, features, precision, resume_state, best, on_event) -> dict:
    from streams.config import CLOSED_FORM_HEADS
    from streams.features import FeatureDataset
    from streams.heads import build_head
    from streams.losses import build_loss

    t = cfg.train
    train_ds = FeatureDataset(features, ids["train"], train=True, seed=t.seed)
    val_ds = FeatureDataset(features, ids["val"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        head = build_head(cfg.model, train_ds.feature_dim)
    model = _place(head, info)
    loss_fn = build_loss(cfg.loss, labels["train"]).to(info.device)
    batch = _local_batch(t.batch_size, info.world)
    val_batches = _feature_batches(val_ds, t, batch, info, None)
    if cfg.model.head in CLOSED_FORM_HEADS:
        from streams.logistic import fit_closed_form

        return fit_closed_form(model, train_ds, val_batches, loss_fn, c=cfg.model.logistic_c, device=info.device,
                               precision=precision, metric=t.metric, run=run if info.main else None,
                               extra=_extra(cfg, "head", stream), on_event=on_event)
    optimizer = make_optimizer(head_param_groups(head, cfg.optim.stage_lr(1), cfg.optim.weight_decay), cfg.optim)
    sampler = EpochSampler(labels["train"], t.seed, t.sampler, t.minority_share, info.rank, info.world)
    train_batches = _feature_batches(train_ds, t, batch, info, sampler)
    steps = math.ceil(len(sampler) / batch)
    return fit_stage(model, train_batches, val_batches, loss_fn, optimizer, stage=1, steps_per_epoch=steps, cfg=t,
                     optim=cfg.optim, device=info.device, precision=precision, run=run if info.main else None,
                     resume=resume_state, best=best, extra=_extra(cfg, "head", stream), on_event=on_event)


def _feature_batches(ds, t, batch: int, info: DistInfo, sampler: EpochSampler | None):
    """Epoch -> batches of cached features: from memory when they fit, else through a DataLoader."""
    from torch.utils.data import DataLoader

    fits = FeatureBank.nbytes(ds) <= t.feature_memory_gb * 2**30
    bank = FeatureBank(ds) if fits else None
    if not fits:
        log.info("cached features need %.1f GB > feature_memory_gb; reading them from disk",
                 FeatureBank.nbytes(ds) / 2**30)

    def batches(epoch: int = 0) -> Iterator[dict]:
        if sampler is not None:
            sampler.set_epoch(epoch)
            index = sampler.indices()
        else:
            index = _shard(len(ds), info.rank, info.world)
        if bank is not None:
            return bank.batches(index, batch, epoch)
        ds.set_epoch(epoch)
        return iter(DataLoader(ds, batch_size=batch, sampler=index.tolist(), num_workers=t.num_workers,
                               pin_memory=info.device.type == "cuda"))

    return batches


def _place(module: nn.Module, info: DistInfo) -> nn.Module:
    """Move to the device (fused LSTMs on CPU) and wrap in DDP when there are several processes."""
    if info.device.type == "cpu":
        use_fused_lstm(module)
    module.to(info.device)
    if info.world > 1:
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


def _clip_loader(store, stream, cfg, video_ids, batch, info: DistInfo, labels=None, train=False):
    """Epoch -> batches of clips from the store (training order from an EpochSampler when `labels` given)."""
    from torch.utils.data import DataLoader

    from data.clips import ClipDataset

    clip = replace(clip_config(cfg), train=train)
    ds = ClipDataset(store, video_ids, stream, clip, augment=cfg.augment if train else None, seed=cfg.train.seed)
    sampler = (EpochSampler(labels, cfg.train.seed, cfg.train.sampler, cfg.train.minority_share, info.rank,
                            info.world) if train else None)

    def batches(epoch: int = 0):
        ds.set_epoch(epoch)  # read by the workers, which a non-persistent loader starts anew each epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
            index = sampler.indices()
        else:
            index = _shard(len(ds), info.rank, info.world)
        return DataLoader(ds, batch_size=batch, sampler=index.tolist(), num_workers=cfg.train.num_workers,
                          pin_memory=info.device.type == "cuda")

    return batches, (len(sampler) if sampler is not None else len(ds))


def _stage2(store, stream, run, cfg, info, ids, labels, features, precision, resume_state, best, on_event) -> dict:
    from streams.losses import build_loss

    t = cfg.train
    model = build_model(cfg, stream)
    if resume_state is None and best is not None and run.checkpoint_path("best").is_file():
        start = run.load_checkpoint("best")
        if start.get("module") == "head":
            model.head.load_state_dict(start["model"])
            if not cfg.model.pretrained and cfg.model.weights_path is None:
                log.warning("the backbone has no pretrained weights: stage 2 rebuilds it from seed %d, which "
                            "matches the cached features only when this run cached them", t.seed)
    model.freeze_backbone(False)
    net = _place(model, info)
    groups = model.param_groups(cfg.optim.stage_lr(2), cfg.optim.weight_decay, cfg.optim.backbone_lr_factor)
    optimizer = make_optimizer(groups, cfg.optim)
    loss_fn = build_loss(cfg.loss, labels["train"]).to(info.device)
    batch = _local_batch(t.finetune_batch_size, info.world)
    train_batches, n_local = _clip_loader(store, stream, cfg, ids["train"], batch, info, labels["train"], train=True)
    val_batches, _ = _clip_loader(store, stream, cfg, ids["val"], batch, info)
    return fit_stage(net, train_batches, lambda: val_batches(0), loss_fn, optimizer, stage=2,
                     steps_per_epoch=math.ceil(n_local / batch), cfg=t, optim=cfg.optim, device=info.device,
                     precision=precision, run=run if info.main else None, resume=resume_state, best=best,
                     extra=_extra(cfg, "model", stream), on_event=on_event)


def _write_predictions(store, stream, run: RunDir, cfg: RunConfig, info: DistInfo, ids, features, precision) -> None:
    """Val and test predictions (and embeddings) of best.pt, written by rank 0."""
    from streams.features import FeatureDataset
    from streams.heads import build_head

    best = run.load_checkpoint("best")
    if best.get("module") == "head":
        ds = FeatureDataset(features, ids["train"][:1])
        model = build_head(cfg.model, ds.feature_dim)
    else:
        model = build_model(cfg, stream)
    model.load_state_dict(best["model"])
    model = _place(model, replace(info, world=1))
    batch = _local_batch(cfg.train.stage_batch_size(best["stage"]), info.world)
    for split in ("val", "test"):
        if not ids[split]:
            log.warning("no %s videos: %s not written", split, run.predictions_path(split).name)
            continue
        if best.get("module") == "head":
            loader = _feature_batches(FeatureDataset(features, ids[split]), cfg.train, batch, info, None)()
        else:
            loader = _clip_loader(store, stream, cfg, ids[split], batch, info)[0](0)
        video_ids, labels, logits, emb = predict(model, loader, info.device, precision, embed=True)
        if info.main:
            run.write_predictions(split, video_ids, labels, logits, emb)
            log.info("wrote %s", run.predictions_path(split))


@contextlib.contextmanager
def _log_to(path: Path | None):
    """Copy INFO+ records into `path` for the duration, leaving what the console shows as it was."""
    if path is None:
        yield
        return
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    old_level = root.level
    # Handlers that relied on the root's level keep it explicitly, so INFO goes to the file only.
    quieted = [h for h in root.handlers if h.level == logging.NOTSET]
    for h in quieted:
        h.setLevel(old_level)
    root.addHandler(handler)
    root.setLevel(logging.INFO if old_level in (logging.NOTSET,) or old_level > logging.INFO else old_level)
    try:
        yield
    except BaseException:
        # The traceback goes to the file only; the console gets the caller's one-line message.
        failure = logging.getLogger(__name__ + ".failure")
        failure.propagate = False
        failure.addHandler(handler)
        failure.exception("training failed")
        failure.removeHandler(handler)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
        for h in quieted:
            h.setLevel(logging.NOTSET)


# --- both streams at once -----------------------------------------------------------------------


@dataclass(frozen=True)
class StreamOutcome:
    """How one stream's process ended."""

    stream: str
    ok: bool
    exitcode: int | None
    log_path: Path
    error: str | None = None


def parse_devices(text: str | None, count: int = 2) -> list[str]:
    """ "cuda:0,cuda:1" -> two device names (one name is used for both); each is checked."""
    names = [d.strip() for d in (text or "auto").split(",") if d.strip()]
    if len(names) == 1:
        names = names * count
    if len(names) != count:
        raise ValueError(f"--devices needs {count} comma-separated devices (one per stream), got {text!r}")
    for name in names:
        resolve_device(name)
    return names


def train_both(store: str | Path, out: str | Path, cfg: RunConfig, devices: Sequence[str] = ("auto", "auto"),
               resume: bool = False, on_event: Event | None = None, poll: float = 0.2,
               start_method: str = "spawn") -> dict[str, StreamOutcome]:
    """Train rgb and flow at the same time, one process each on `devices[i]`.

    Two CPU devices split the cores between the processes. Each process logs to
    RUN/<stream>/train.log; `on_event` receives both processes' events (with "stream" added).
    Processes are spawned (CUDA cannot be used in a forked child); "fork" starts faster on CPU.
    """
    from data.store import require_store

    store = require_store(store)
    devices = list(devices)
    if all(resolve_device(d).type == "cpu" for d in devices) and not cfg.train.threads:
        cfg = replace(cfg, train=replace(cfg.train, threads=max(1, cpu_count() // len(STREAMS))))
    ctx = mp.get_context(start_method)
    events = ctx.Queue()
    procs = {}
    for stream, device in zip(STREAMS, devices, strict=True):
        args = (str(store), stream, str(out), cfg.to_dict(), device, resume, events, os.getpid())
        procs[stream] = ctx.Process(target=_child, args=args, name=f"twostream-train-{stream}", daemon=False)
        procs[stream].start()
    errors: dict[str, str] = {}
    try:
        while True:
            alive = any(p.is_alive() for p in procs.values())
            _drain(events, errors, on_event, timeout=poll if alive else 0.0)
            if not alive:
                break
    except BaseException:
        for p in procs.values():  # an interrupted parent takes its children with it
            if p.is_alive():
                p.terminate()
        raise
    for p in procs.values():
        p.join()
    _drain(events, errors, on_event, timeout=0.0)
    outcomes = {}
    for stream, p in procs.items():
        log_path = RunDir(out, stream).log_path
        error = errors.get(stream)
        if p.exitcode != 0 and error is None:
            error = f"process exited with code {p.exitcode}"
        outcomes[stream] = StreamOutcome(stream, p.exitcode == 0, p.exitcode, log_path, error)
    events.close()
    return outcomes


def _drain(events, errors: dict, on_event: Event | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            event = events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue_mod.Empty:
            return
        if event.get("event") == "error":
            errors[event["stream"]] = event["message"]
        if on_event is not None:
            on_event(event)


def _child(store: str, stream: str, out: str, cfg: dict, device: str, resume: bool, events, parent: int) -> None:
    """One stream's process: everything it prints or logs goes to RUN/<stream>/train.log; it stops
    when `parent` (the process that started it) is gone."""
    run = RunDir(out, stream)
    run.path.mkdir(parents=True, exist_ok=True)
    fh = open(run.log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    os.dup2(fh.fileno(), 1)
    os.dup2(fh.fileno(), 2)
    sys.stdout = sys.stderr = fh
    logging.basicConfig(level=logging.WARNING, stream=fh, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _exit_with_parent(parent)
    last = [0.0]

    def send(event: dict) -> None:
        # Step events are thinned out; epoch and terminal events always go through.
        now = time.monotonic()
        if event.get("event") in ("step", "features") and now - last[0] < 0.25:
            return
        last[0] = now
        events.put({**_plain(event), "stream": stream})

    try:
        train_stream(store, stream, out, RunConfig.from_dict(cfg), device, resume, send)
    except BaseException as exc:  # reported to the parent, which decides the exit status
        logging.getLogger(__name__).error("%s stream failed: %s", stream, exc)
        events.put({"event": "error", "stream": stream, "message": str(exc).strip().splitlines()[0]
                    if str(exc).strip() else type(exc).__name__})
        events.close()
        events.join_thread()
        sys.exit(1)
    events.close()
    events.join_thread()


def _exit_with_parent(parent: int, poll: float = 1.0) -> threading.Thread:
    """Stop this process soon after `parent` is gone (killed with -9: no signal reaches us), so no
    orphan goes on writing the run while a rerun trains into it; its last checkpoint stays.

    A direct child watches for being handed to another parent; one started through a server
    process (forkserver) checks that `parent` is still alive."""
    direct = os.getppid() == parent

    def alive() -> bool:
        if direct:
            return os.getppid() == parent
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True

    def watch() -> None:
        while alive():
            time.sleep(poll)
        logging.getLogger(__name__).error("the parent process %d is gone: stopping (rerun to resume)", parent)
        os._exit(1)

    thread = threading.Thread(target=watch, name="twostream-parent-watch", daemon=True)
    thread.start()
    return thread


def _plain(event: dict) -> dict:
    return {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in event.items()}
