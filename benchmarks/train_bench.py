"""Training throughput: stage-1 head clips/s on cached features, stage-2 frames/s end to end, peak RSS.

Stage 1 compares, in one run and on the same synthetic features file (T=16, D=4096, float16 as
cached), the plain pipeline (a DataLoader over FeatureDataset items with default collation, torch's
nn.LSTM, per-tensor AdamW, float32) with what the trainer uses, adding one lever per row: FeatureBank
batches cut from memory, the fused CPU LSTM (streams/fused_lstm.py), fused AdamW, and the precision
("bf16": the whole forward under autocast, as amp="bf16" gives; "bf16 proj": only the LSTM input
and attention projections in bfloat16, what amp="auto" picks on CPUs with native bfloat16). The
row marked * is the trainer's default path on this machine. Every row trains the default
bilstm_attention head with the focal loss through `train_one_epoch`. The host may be shared:
each row shows the median and the best of --repeats timed runs, and the median CPU milliseconds
per clip.

    python benchmarks/train_bench.py                      # CPU rows
    python benchmarks/train_bench.py --stages 1 --threads 2
    python benchmarks/train_bench.py --device cuda:0      # GPU rows (fused LSTM off: cuDNN is faster)
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flow.devices import resolve_device  # noqa: E402
from streams.config import LossConfig, ModelConfig, OptimConfig  # noqa: E402
from streams.features import FeatureDataset  # noqa: E402
from streams.fused_lstm import use_fused_lstm  # noqa: E402
from streams.heads import build_head  # noqa: E402
from streams.launch import head_param_groups, make_optimizer  # noqa: E402
from streams.losses import build_loss  # noqa: E402
from streams.model import build_stream_model  # noqa: E402
from streams.schedule import WarmupCosine  # noqa: E402
from streams.train import (  # noqa: E402
    FeatureBank,
    Precision,
    epoch_order,
    resolve_precision,
    train_one_epoch,
)


def write_features(path: Path, videos: int, steps: int, dim: int, seed: int = 0) -> Path:
    """A features file in the cached layout: one view per video, random float16 features."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        f.attrs.update({"stream": "rgb", "backbone": "vgg19", "feature_dim": dim, "views": 1, "minority_views": 1})
        group = f.create_group("videos")
        for i in range(videos):
            g = group.create_group(f"v{i:04d}")
            g.create_dataset("features", data=rng.standard_normal((1, steps, dim), dtype=np.float32).astype(np.float16))
            g.attrs["label"] = int(i % 5 != 0)  # 20% minority, as in CCTV data
            g.attrs["views"] = 1
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def precision_name(precision: Precision) -> str:
    """Short label of a precision for the table."""
    if precision.dtype is None:
        return "fp32"
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[precision.dtype]
    return f"{name} proj" if precision.projections_only else name


def head_row(ds: FeatureDataset, bank: FeatureBank | None, fused: bool, fused_adam: bool, precision: Precision,
             args, device: torch.device) -> dict:
    torch.manual_seed(0)
    head = build_head(ModelConfig(), ds.feature_dim)
    if fused:
        use_fused_lstm(head)
    head.to(device)
    optim = OptimConfig()
    opt = make_optimizer(head_param_groups(head, optim.lr, optim.weight_decay), optim, fused=fused_adam)
    loss_fn = build_loss(LossConfig(), ds.labels).to(device)
    total = (args.batches * args.repeats + args.warmup) * 4
    schedule = WarmupCosine(opt, total, optim.lr, 0, optim.min_lr)
    order = epoch_order(ds.labels, 0, sampler="weighted")

    def batches(n: int, epoch: int):
        if bank is not None:
            return itertools.islice(bank.batches(order, args.batch, epoch), n)
        ds.set_epoch(epoch)
        return itertools.islice(DataLoader(ds, batch_size=args.batch, sampler=order.tolist()), n)

    step = train_one_epoch(head, batches(args.warmup, 0), opt, loss_fn, 0, optim, schedule=schedule, device=device,
                           precision=precision)["step"]
    rates, cpu_ms = [], []
    for repeat in range(args.repeats):  # the median of a few timed runs: the host may be busy for a while
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        stats = train_one_epoch(head, batches(args.batches, 1 + repeat), opt, loss_fn, step, optim,
                                schedule=schedule, device=device, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        step = stats["step"]
        rates.append(stats["clips"] / wall)
        cpu_ms.append(1000 * cpu / stats["clips"])
    return {"clips_per_s": float(np.median(rates)), "best_clips_per_s": max(rates),
            "cpu_ms_per_clip": float(np.median(cpu_ms))}


def stage2_row(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_stream_model(ModelConfig(), "rgb").to(device)
    if device.type == "cpu":
        use_fused_lstm(model)
    optim = OptimConfig()
    opt = make_optimizer(model.param_groups(optim.stage_lr(2), optim.weight_decay, optim.backbone_lr_factor), optim)
    loss_fn = build_loss(LossConfig(), [0, 1]).to(device)
    n = args.stage2_batches + 1
    schedule = WarmupCosine(opt, n, optim.stage_lr(2), 0, optim.min_lr)
    precision = resolve_precision("auto", device)
    clips = torch.randn(n, args.stage2_batch, args.stage2_steps, 3, args.stage2_size, args.stage2_size)
    batches = [{"clip": c, "label": torch.arange(args.stage2_batch).float() % 2, "video_id": ["x"] * len(c)}
               for c in clips]
    train_one_epoch(model, batches[:1], opt, loss_fn, 0, optim, schedule=schedule, device=device, precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall0 = time.perf_counter()
    stats = train_one_epoch(model, batches[1:], opt, loss_fn, 1, optim, schedule=schedule, device=device,
                            precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - wall0
    return {"frames_per_s": stats["clips"] * args.stage2_steps / wall, "clips_per_s": stats["clips"] / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--videos", type=int, default=512, help="videos in the synthetic features file")
    p.add_argument("--steps", type=int, default=16, help="T time steps per clip")
    p.add_argument("--dim", type=int, default=4096, help="feature size D (VGG19 fc7: 4096)")
    p.add_argument("--batch", type=int, default=64, help="clips per step")
    p.add_argument("--batches", type=int, default=6, help="timed steps per stage-1 row")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of --batches steps per row; the median is shown")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each row")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts for the CPU rows")
    p.add_argument("--stage2-size", type=int, default=64, help="frame side for stage 2 (VGG19 takes >= 32)")
    p.add_argument("--stage2-steps", type=int, default=4, help="T for stage 2")
    p.add_argument("--stage2-batch", type=int, default=2, help="clips per stage-2 step")
    p.add_argument("--stage2-batches", type=int, default=2, help="timed stage-2 steps")
    p.add_argument("--stages", default="1,2", help="which rows to run: 1 (head), 2 (end to end) or 1,2")
    args = p.parse_args()
    device = resolve_device(args.device)
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]

    stages = {int(v) for v in args.stages.split(",")}
    if 1 in stages:
        with tempfile.TemporaryDirectory() as tmp:
            head_rows(Path(tmp), threads, args, device)
    if 2 in stages:
        torch.set_num_threads(threads[0])
        row = stage2_row(args, device)
        print(f"stage 2: VGG19 + head end to end at {args.stage2_size}x{args.stage2_size}, T={args.stage2_steps}, "
              f"batch {args.stage2_batch}, {torch.get_num_threads()} threads: {row['frames_per_s']:.1f} frames/s "
              f"({row['clips_per_s']:.2f} clips/s); peak RSS {peak_rss_mb():.0f} MiB")


def head_rows(tmp: Path, threads: list[int], args, device: torch.device) -> None:
    """The stage-1 table: plain PyTorch first, then one lever at a time; the last row is the trainer's."""
    path = write_features(tmp / "features.h5", args.videos, args.steps, args.dim)
    ds = FeatureDataset(path, train=True)
    rss0 = peak_rss_mb()
    bank = FeatureBank(ds)
    print(f"stage 1: {args.videos} videos, T={args.steps}, D={args.dim}, batch {args.batch}, device {device}; "
          f"FeatureBank {FeatureBank.nbytes(ds) / 2**20:.0f} MiB (peak RSS {rss0:.0f} -> {peak_rss_mb():.0f} MiB)")
    fp32, default = Precision(), resolve_precision("auto", device)
    # (input, bank, fused LSTM, fused AdamW, precision), one lever added per row.
    variants = [("DataLoader (per item)", None, False, False, fp32), ("FeatureBank (memory)", bank, False, False, fp32),
                ("FeatureBank (memory)", bank, True, False, fp32), ("FeatureBank (memory)", bank, True, True, fp32)]
    if device.type == "cpu":
        variants.append(("FeatureBank (memory)", bank, True, True, resolve_precision("bf16", device)))
        if default != fp32:
            variants.append(("FeatureBank (memory)", bank, True, True, default))
    else:  # cuDNN's LSTM beats a Python time loop on a GPU
        variants = [v for v in variants if not v[2]] + [("FeatureBank (memory)", bank, False, True, fp32),
                                                        ("FeatureBank (memory)", bank, False, True, default)]
    # The trainer's path: the last row at amp "auto"'s precision (on a CPU without native bfloat16 that
    # is the fp32 row before the whole-forward bf16 one).
    trainer = next(v for v in reversed(variants) if v[4] == default)
    print(f"{'threads':>7}  {'input':<22} {'LSTM':<6} {'AdamW':<8} {'precision':<10} {'clips/s':>8} {'best':>7} "
          f"{'CPU ms/clip':>12}")
    for n in threads:
        torch.set_num_threads(n)
        for variant in variants:
            name, b, fused, fused_adam, precision = variant
            row = head_row(ds, b, fused, fused_adam, precision, args, device)
            mark = " *" if variant is trainer else ""
            print(f"{n:>7}  {name:<22} {'fused' if fused else 'torch':<6} {'fused' if fused_adam else 'foreach':<8} "
                  f"{precision_name(precision):<10} {row['clips_per_s']:>8.1f} {row['best_clips_per_s']:>7.1f} "
                  f"{row['cpu_ms_per_clip']:>12.2f}{mark}",
                  flush=True)
    print("* the trainer's default path here (FeatureBank, fused LSTM on CPU, fused AdamW, amp auto)")
    print(f"stage 1 peak RSS: {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
