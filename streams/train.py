"""Training one stream: the config, epoch order, mixed precision, `train_one_epoch`, `evaluate` and the stage loop.

Stage 1 fits the temporal head on cached backbone features, stage 2 fine-tunes the whole model on
clips (DESIGN.md "Two-stage training"). Both run through the same free functions; a batch is a
dict holding "features" (N, T, D) or "clip" (N, T, C, H, W), "label" (N,) and "video_id".

Stage 1 is cheap per clip, so the input pipeline decides its speed: `FeatureBank` holds every
cached view in memory (float16) and cuts whole batches with one `index_select`, with no per-item
Dataset call or collation. On CPU the head's LSTMs run through `use_fused_lstm` (streams/fused_lstm.py):
the input projection of all time steps and both directions is one matrix product, in bfloat16
where the CPU has it natively (`resolve_precision`), and the recurrence is one hand-written
autograd function.

Epoch order is a pure function of (seed, epoch), the same in every DDP process, so a resumed run
sees the batches an uninterrupted one would, and under DDP each process takes its
DistributedSampler slice of that global order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler, Sampler, WeightedRandomSampler

from streams.checkpoint import rng_state, set_rng_state
from streams.config import OptimConfig, from_dict, to_dict
from streams.fused_lstm import projection_dtype, use_fused_lstm  # noqa: F401 - use_fused_lstm re-exported
from streams.schedule import WarmupCosine

if TYPE_CHECKING:
    from streams.rundir import RunDir

log = logging.getLogger(__name__)

STAGES = ("head", "finetune", "both")
METRICS = ("accuracy", "f1", "auc", "loss")
SAMPLERS = ("weighted", "shuffle")
AMP_MODES = ("auto", "bf16", "fp16", "off")
SPLITS = ("store", "auto")
STAGE_NAMES = {1: "head", 2: "finetune"}


@dataclass(frozen=True)
class TrainConfig:
    """How a stream is trained; defaults from the research report where it gives one."""

    stage: str = "both"  # "head": stage 1 only, "finetune": end to end only, "both": stage 1 then stage 2
    epochs: int = 30  # stage 1 epochs (report: 30 with the backbone frozen)
    finetune_epochs: int = 70  # stage 2 epochs (report: 70)
    batch_size: int = 64  # stage 1 clips per optimiser step, summed over DDP processes
    finetune_batch_size: int = 8  # stage 2 clips per step, summed over processes; each is T backbone frames
    patience: int = 20  # epochs without a better val metric before a stage stops (report: 20); 0 = never
    metric: str = "accuracy"  # val metric for early stopping and best.pt: accuracy, f1 (macro), auc or loss
    sampler: str = "weighted"  # "weighted": oversample the minority class to minority_share; "shuffle": plain
    minority_share: float = 0.4  # weighted: the minority class's share of each epoch's draws (0.5 = balanced)
    amp: str = "auto"  # auto: CUDA bf16 if supported, else fp16 + loss scaling; CPU: bf16 head projections if native
    seed: int = 0  # seeds weights, epoch order, augmentation and view draws
    num_workers: int = 2  # DataLoader processes reading clips in stage 2 (stage 1 reads from memory)
    threads: int = 0  # torch CPU threads per process; 0 = torch's default
    split: str = "store"  # "store": the store's split attrs (unsplit videos placed by group); "auto": re-split all
    fold: str | None = None  # "k/K": cross-validation round k (0-based) of K instead of `split`
    views: int = 2  # cached feature views per video for stage 1 (report: 2x augmentation)
    minority_views: int = 10  # cached views per video of the less frequent class (report: 10x)
    steps: int = 16  # T time steps per clip
    size: int | None = None  # square frame side fed to the backbone; None = the store's size
    feature_batch_size: int = 32  # clips per backbone call while caching features
    feature_memory_gb: float = 16.0  # stage 1 holds all cached features in RAM when they need less than this

    def __post_init__(self) -> None:
        for name, choices in (("stage", STAGES), ("metric", METRICS), ("sampler", SAMPLERS), ("amp", AMP_MODES),
                              ("split", SPLITS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"TrainConfig.{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        for name in ("epochs", "finetune_epochs", "batch_size", "finetune_batch_size", "steps", "views",
                     "minority_views", "feature_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0 or self.num_workers < 0 or self.threads < 0:
            raise ValueError("TrainConfig: patience, num_workers and threads must be >= 0")
        if not 0.0 < self.minority_share < 1.0:
            raise ValueError(f"TrainConfig.minority_share must be in (0, 1), got {self.minority_share}")
        if self.size is not None and self.size < 16:
            raise ValueError(f"TrainConfig.size must be at least 16 (or unset), got {self.size}")
        if self.feature_memory_gb < 0:
            raise ValueError(f"TrainConfig.feature_memory_gb must be >= 0, got {self.feature_memory_gb}")
        parse_fold(self.fold)

    @property
    def stages(self) -> tuple[int, ...]:
        """The stage numbers this config runs, in order."""
        return {"head": (1,), "finetune": (2,), "both": (1, 2)}[self.stage]

    def stage_epochs(self, stage: int) -> int:
        return self.epochs if stage == 1 else self.finetune_epochs

    def stage_batch_size(self, stage: int) -> int:
        return self.batch_size if stage == 1 else self.finetune_batch_size

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return from_dict(cls, d)


def parse_fold(text: str | None) -> tuple[int, int] | None:
    """ "k/K" -> (k, K) with 0 <= k < K and K >= 2; None stays None."""
    if text is None:
        return None
    try:
        k, total = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"fold must look like k/K (e.g. 0/5), got {text!r}") from None
    if total < 2 or not 0 <= k < total:
        raise ValueError(f"fold {text}: need K >= 2 and 0 <= k < K (k counts from 0)")
    return k, total


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; names the batch so it can be found."""

    def __init__(self, stage: int, epoch: int, step: int, video_ids: Sequence[str], checkpoint: str | None = None):
        self.stage, self.epoch, self.step, self.video_ids = stage, epoch, step, list(video_ids)
        shown = ", ".join(self.video_ids[:8]) + (" ..." if len(self.video_ids) > 8 else "")
        where = f"; the last good checkpoint is {checkpoint}" if checkpoint else ""
        super().__init__(f"non-finite loss in stage {stage} ({STAGE_NAMES[stage]}) at epoch {epoch}, step {step}, "
                         f"batch of videos [{shown}]; training stopped{where}")


# --- precision ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """Reduced-precision dtype (None = full float32), whether fp16 loss scaling is on, and how far it reaches.

    `projections_only`: only the large projections of the recurrent heads run in `dtype` (the
    fused LSTMs' input products and the attention's input/output products, see
    `streams.fused_lstm.projection_dtype`), everything else in float32. On a CPU those products are
    most of a head's work and take about half the time in bfloat16, while the small ops around them
    (recurrence, attention weights, norms) gain nothing and the casts between them cost time.
    """

    dtype: torch.dtype | None = None
    scale_loss: bool = False
    projections_only: bool = False

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        if self.projections_only:
            return projection_dtype(self.dtype)
        return torch.autocast(device.type, dtype=self.dtype)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), where its products beat float32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and bool(check()) for check in checks)


def resolve_precision(mode: str, device: torch.device) -> Precision:
    """`TrainConfig.amp` on `device`.

    "auto": bf16 on CUDA when supported, else fp16 with loss scaling; on a CPU with native bfloat16,
    bf16 for the recurrent heads' large projections only (`Precision.projections_only`); float32 on
    other CPUs. "bf16"/"fp16" autocast
    the whole forward anywhere (fp16 scales the loss on CUDA only); "off" is float32.
    """
    if mode not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    cuda = device.type == "cuda"
    if mode == "off":
        return Precision()
    if mode == "auto" and not cuda:
        if device.type == "cpu" and cpu_has_native_bf16():
            return Precision(torch.bfloat16, projections_only=True)
        return Precision()
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "bf16":
        return Precision(torch.bfloat16)
    return Precision(torch.float16, scale_loss=cuda)


# --- epoch order --------------------------------------------------------------------------------


def epoch_order(labels: Sequence[int] | np.ndarray, epoch: int, seed: int = 0, sampler: str = "weighted",
                minority_share: float = 0.4) -> np.ndarray:
    """Dataset indices of one epoch, in order; a pure function of its arguments. Shape: (N,) -> (N,) int64.

    "shuffle" is a permutation. "weighted" draws N indices with replacement (WeightedRandomSampler)
    so the minority class makes up `minority_share` of the draws in expectation; a minority class
    that already holds more than that is drawn at its own share (the sampler only oversamples).
    """
    labels = np.asarray(labels, np.int64).reshape(-1)
    n = len(labels)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    if sampler == "shuffle":
        return torch.randperm(n, generator=gen).numpy().astype(np.int64)
    if sampler != "weighted":
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    counts = np.bincount(labels, minlength=2)
    minority = int(np.argmin(counts))
    share = max(minority_share, counts[minority] / n)
    per_class = np.array([share, 1.0 - share]) if minority == 0 else np.array([1.0 - share, share])
    weights = torch.as_tensor(per_class[labels] / counts[labels], dtype=torch.float64)
    return np.fromiter(WeightedRandomSampler(weights, n, replacement=True, generator=gen), np.int64, n)


class EpochSampler(Sampler[int]):
    """`epoch_order` for a DataLoader, sliced per DDP process as DistributedSampler slices (padding included)."""

    def __init__(self, labels: Sequence[int], seed: int = 0, sampler: str = "weighted", minority_share: float = 0.4,
                 rank: int = 0, world: int = 1) -> None:
        self.labels = np.asarray(labels, np.int64)
        self.seed, self.sampler, self.minority_share = seed, sampler, minority_share
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        """This process's indices of the current epoch. Shape: (ceil(N / world),)."""
        order = epoch_order(self.labels, self.epoch, self.seed, self.sampler, self.minority_share)
        if self.world == 1:
            return order
        part = DistributedSampler(range(len(order)), num_replicas=self.world, rank=self.rank, shuffle=False)
        return order[np.fromiter(part, np.int64)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.world)


# --- stage 1 input: every cached view in memory -------------------------------------------------


class FeatureBank:
    """All cached views of a FeatureDataset's videos in memory, float16, cut into batches by index.

    View choice per video and epoch is the dataset's own (`view_of`), so a bank and a DataLoader
    over the same dataset serve the same clips.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        views = np.asarray(dataset.views, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(views)[:-1]]).astype(np.int64)  # (N,) first row per video
        self.features = torch.empty(int(views.sum()), dataset.steps, dataset.feature_dim, dtype=torch.float16)
        out = self.features.numpy()
        with h5py.File(dataset.path, "r") as f:
            videos = f["videos"]
            for i, video_id in enumerate(dataset.video_ids):
                ds = videos[video_id]["features"]
                ds.read_direct(out, dest_sel=np.s_[self.offsets[i] : self.offsets[i] + views[i]])
        self.labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.float32)

    @staticmethod
    def nbytes(dataset: Any) -> int:
        """Memory a bank of `dataset` needs."""
        return int(np.sum(dataset.views)) * dataset.steps * dataset.feature_dim * 2

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, indices: Sequence[int] | np.ndarray, batch_size: int, epoch: int = 0) -> Iterator[dict]:
        """Batches of the videos at `indices`, in order: {"features" (B, T, D) float16, "label" (B,), "video_id"}."""
        indices = np.asarray(indices, np.int64)
        self.dataset.set_epoch(epoch)
        rows = self.offsets[indices] + np.array([self.dataset.view_of(int(i)) for i in indices], np.int64)
        ids = self.dataset.video_ids
        for start in range(0, len(indices), batch_size):
            sel = indices[start : start + batch_size]
            yield {
                "features": self.features.index_select(0, torch.from_numpy(rows[start : start + batch_size])),
                "label": self.labels[torch.from_numpy(sel)],
                "video_id": [ids[i] for i in sel],
            }


# --- one epoch, evaluation ----------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _inputs(batch: dict, device: torch.device) -> torch.Tensor:
    """A batch's model input on `device`: its cached features, or its clips normalised there."""
    if "features" in batch:
        return batch["features"].to(device, non_blocking=True).float()  # float16 features travel at half the bytes
    # Clips travel as uint8 (RGB) / float16 (flow) and are normalised on the device.
    from data.clips import clip_inputs

    return clip_inputs(batch, device)


def _dist() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    step: int,
    cfg: OptimConfig,
    *,
    schedule: WarmupCosine,
    device: torch.device,
    precision: Precision = Precision(),
    scaler: torch.amp.GradScaler | None = None,
    stage: int = 1,
    epoch: int = 0,
    on_step: Callable[[dict], None] | None = None,
) -> dict[str, float]:
    """One pass over `loader`; the lr of every step comes from `schedule` (`lr_at`).

    Returns {"loss": mean over steps (all processes), "clips", "seconds", "clips_per_s", "lr", "step"}
    where "step" is the step count after the epoch. A NaN/inf loss raises NonFiniteLossError
    before the weights change.
    """
    model.train()
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    _, world = _dist()
    total, steps, clips, lr = 0.0, 0, 0, float("nan")
    start = time.perf_counter()
    for batch in loader:
        x = _inputs(batch, device)
        y = batch["label"].to(device, non_blocking=True).float()
        lr = schedule.step(step)
        with precision.autocast(device):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        value = loss.detach().clone()
        if world > 1:  # every process sees the same value, so all stop together on NaN
            torch.distributed.all_reduce(value)
            value /= world
        value = float(value)
        if not math.isfinite(value):
            raise NonFiniteLossError(stage, epoch, step, batch["video_id"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        steps += 1
        total += value
        clips += len(y) * world
        if on_step is not None:
            on_step({"step": steps, "loss": total / steps, "lr": lr})
    seconds = time.perf_counter() - start
    return {"loss": total / max(steps, 1), "clips": clips, "seconds": seconds,
            "clips_per_s": clips / seconds if seconds > 0 else 0.0, "lr": lr, "step": step}


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader: Iterable[dict],
    device: torch.device,
    precision: Precision = Precision(),
    embed: bool = False,
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    """Logits (and penultimate embeddings) of every video the loader yields, gathered over DDP processes.

    A video yielded twice (DistributedSampler padding) is kept once. Returns video ids, labels
    (N,) int64, logits (N,) float64 and embeddings (N, E) float32 or None, in first-seen order.
    """
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    head = getattr(net, "head", net)
    ids: list[str] = []
    labels, logits, embs = [], [], []
    for batch in loader:
        x = _inputs(batch, device)
        with precision.autocast(device):
            feats = net.forward_features(x) if head is not net else x  # (N, T, D)
            e = head.embed(feats)  # (N, E)
            z = head.out(head.dropout(e)).squeeze(-1)  # (N,)
        ids += list(batch["video_id"])
        labels.append(batch["label"].cpu())
        logits.append(z.float().cpu())
        if embed:
            embs.append(e.float().cpu())
    net.train(was_training)
    labels_t = torch.cat(labels) if labels else torch.zeros(0)
    logits_t = torch.cat(logits) if logits else torch.zeros(0)
    emb_t = torch.cat(embs) if embs else None
    parts = [(ids, labels_t, logits_t, emb_t)]
    _, world = _dist()
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (ids, labels_t, logits_t, emb_t))
    seen: dict[str, int] = {}
    rows_l, rows_z, rows_e = [], [], []
    for p_ids, p_lab, p_log, p_emb in parts:
        for j, video_id in enumerate(p_ids):
            if video_id in seen:
                continue
            seen[video_id] = len(seen)
            rows_l.append(int(p_lab[j]))
            rows_z.append(float(p_log[j]))
            if embed:
                rows_e.append(p_emb[j].numpy())
    emb_out = np.stack(rows_e).astype(np.float32) if embed and rows_e else None
    return list(seen), np.asarray(rows_l, np.int64), np.asarray(rows_z, np.float64), emb_out


def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    device: torch.device,
    loss_fn: nn.Module | None = None,
    precision: Precision = Precision(),
) -> tuple[dict[str, float], list[str], np.ndarray, np.ndarray]:
    """Metrics of the model on the loader's videos (under inference_mode), with its predictions.

    Metrics: "loss" (loss_fn's, nan without one), "accuracy" and macro "f1" at p >= 0.5, "auc"
    (nan with one class), "n". Returns (metrics, video_ids, labels, logits).
    """
    from fusion.metrics import compute_metrics

    ids, labels, logits, _ = predict(model, loader, device, precision)
    if len(ids) == 0:
        raise ValueError("evaluation got no videos")
    probs = 1.0 / (1.0 + np.exp(-logits))
    m = compute_metrics(labels, probs)
    loss = float("nan")
    if loss_fn is not None:
        with torch.inference_mode():
            loss = float(loss_fn(torch.as_tensor(logits, dtype=torch.float32),
                                 torch.as_tensor(labels, dtype=torch.float32)))
    metrics = {"loss": loss, "accuracy": m["accuracy"], "f1": m["macro_f1"],
               "auc": m["roc_auc"] if m["roc_auc"] is not None else float("nan"), "n": len(ids)}
    return metrics, ids, labels, logits


# --- the stage loop -----------------------------------------------------------------------------


def improved(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` beats `best` (lower is better for "loss"); NaN never does."""
    if not math.isfinite(value):
        return False
    if best is None or not math.isfinite(best):
        return True
    return value < best if metric == "loss" else value > best


def fit_stage(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[dict]],
    val_batches: Callable[[], Iterable[dict]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    stage: int,
    steps_per_epoch: int,
    cfg: TrainConfig,
    optim: OptimConfig,
    device: torch.device,
    precision: Precision = Precision(),
    run: RunDir | None = None,
    resume: dict | None = None,
    best: dict | None = None,
    extra: dict | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> dict:
    """Train one stage with early stopping; checkpoints and metrics go to `run` (None: nowhere).

    `train_batches(epoch)` yields one epoch's batches (`steps_per_epoch` of them); `val_batches()`
    the validation set. `resume` is a last.pt of this stage to continue from (model, optimiser,
    scaler, step and RNG restored, so the run ends where an uninterrupted one would). `best` is the
    run's best so far ({"value", "epoch", "stage"}), which best.pt holds. `extra` goes into every
    checkpoint (config, module kind, ...). Returns the final {"best", "stage_best", "epochs_run",
    "stopped_early", "step"}.
    """
    epochs = cfg.stage_epochs(stage)
    total = epochs * steps_per_epoch
    schedule = WarmupCosine(optimizer, total, optim.stage_lr(stage), optim.warmup_steps(total), optim.min_lr,
                            min(optim.restarts, max(total - optim.warmup_steps(total) - 1, 0)))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scale_loss)
    net = _unwrap(model)
    start_epoch, step, stage_best, bad = 0, 0, None, 0
    if resume is not None:
        net.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        start_epoch, step = resume["epoch"] + 1, resume["step"]
        stage_best, bad, best = resume.get("stage_best"), resume.get("bad_epochs", 0), resume.get("best")
        set_rng_state(resume["rng"])  # last, after everything that may draw random numbers
        log.info("resuming stage %d at epoch %d (step %d)", stage, start_epoch, step)
    name = STAGE_NAMES[stage]
    stopped_early = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, epochs):
        def on_step(info: dict, _epoch: int = epoch) -> None:
            if on_event is not None:
                on_event({"event": "step", "stage": name, "epoch": _epoch, "epochs": epochs,
                          "steps": steps_per_epoch, **info})

        try:
            stats = train_one_epoch(model, train_batches(epoch), optimizer, loss_fn, step, optim, schedule=schedule,
                                    device=device, precision=precision, scaler=scaler, stage=stage, epoch=epoch,
                                    on_step=on_step)
        except NonFiniteLossError as exc:
            last = run.checkpoint_path("last") if run is not None and run.checkpoint_path("last").is_file() else None
            raise NonFiniteLossError(exc.stage, exc.epoch, exc.step, exc.video_ids,
                                     str(last) if last is not None else None) from None
        step = stats["step"]
        metrics, *_ = evaluate(model, val_batches(), device, loss_fn, precision)
        value = metrics[cfg.metric]
        if improved(value, None if stage_best is None else stage_best["value"], cfg.metric):
            stage_best, bad = {"value": value, "epoch": epoch, "stage": stage}, 0
        else:
            bad += 1
        run_best = improved(value, None if best is None else best["value"], cfg.metric)
        if run_best:
            best = {"value": value, "epoch": epoch, "stage": stage}
        stopped_early = bool(cfg.patience) and bad >= cfg.patience and epoch < epochs - 1
        finished = epoch == epochs - 1 or stopped_early
        record = {"stage": name, "epoch": epoch, "lr": stats["lr"], "train_loss": stats["loss"],
                  **{f"val_{k}": v for k, v in metrics.items()}, "clips_per_s": stats["clips_per_s"],
                  "seconds": stats["seconds"], "best": run_best, "step": step, "time": time.time()}
        if run is not None:
            run.append_metrics(record)  # before the checkpoint: a resume drops lines past last.pt
            state = {"stage": stage, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "step": step, "epoch": epoch,
                     "stage_finished": finished, "best": best, "stage_best": stage_best, "bad_epochs": bad,
                     "rng": rng_state(), "metrics": _finite(record), **(extra or {})}
            run.save_checkpoint("last", state)
            if run_best:
                run.save_checkpoint("best", state)
        log.info("%s epoch %d/%d: train loss %.4f, val %s %.4f%s", name, epoch + 1, epochs, stats["loss"],
                 cfg.metric, value, " (best)" if run_best else "")
        if on_event is not None:
            on_event({"event": "epoch", "epochs": epochs, **record})
        if stopped_early:
            log.info("%s: no better val %s for %d epochs; stopping", name, cfg.metric, cfg.patience)
            break
    return {"best": best, "stage_best": stage_best, "epochs_run": epoch + 1, "stopped_early": stopped_early,
            "step": step}


def _finite(record: dict) -> dict:
    """NaN and inf become None so the record stays plain data that JSON and TOML readers accept."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
