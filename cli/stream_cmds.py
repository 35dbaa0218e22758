"""`train`: train the RGB stream, the flow stream, or both at once (two processes), with a live display."""

from __future__ import annotations

import os
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from cli.choices import PRETRAINED_HELP, WEIGHTS_HELP, Backbone, Head
from cli.console import err, out, table
from cli.errors import fail, non_negative, user_errors


class StreamChoice(str, Enum):
    rgb = "rgb"
    flow = "flow"
    both = "both"


class StageChoice(str, Enum):
    head = "head"
    finetune = "finetune"
    both = "both"


class MetricChoice(str, Enum):
    accuracy = "accuracy"
    f1 = "f1"
    auc = "auc"
    loss = "loss"


class SplitChoice(str, Enum):
    store = "store"
    auto = "auto"


class AmpChoice(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("train")(train)


def _value(v: Any) -> Any:
    return v.value if isinstance(v, Enum) else v


@user_errors
def train(
    store: Annotated[Path, typer.Argument(help="Store file from `twostream extract`.")],
    stream: Annotated[StreamChoice, typer.Option(help="Which stream to train; both = two processes at once.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder; each stream writes OUT/<stream>/.")],
    devices: Annotated[str | None, typer.Option(
        help="auto, cpu or cuda:N; for --stream both one per stream, e.g. cuda:0,cuda:1 or cpu,cpu.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="TOML with train, model, loss, optim and augment tables; options override it.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a stopped run from OUT/<stream>/last.pt.")] = False,
    stage: Annotated[StageChoice | None, typer.Option(
        help="head: on cached features; finetune: end to end; both: head, then end to end.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of every stage that runs.")] = None,
    finetune_epochs: Annotated[int | None, typer.Option(help="Epochs of the end-to-end stage (overrides --epochs there).")] = None,
    fold: Annotated[str | None, typer.Option(help="k/K: cross-validation round k (from 0) of K, by group.")] = None,
    split: Annotated[SplitChoice | None, typer.Option(
        help="store: the store's train/val/test; auto: a fresh split by group and label.")] = None,
    backbone: Annotated[Backbone | None, typer.Option(help="Frame encoder.")] = None,
    head: Annotated[Head | None, typer.Option(help="Temporal head.")] = None,
    pretrained: Annotated[bool | None, typer.Option(
        "--pretrained/--no-pretrained", help=PRETRAINED_HELP)] = None,
    weights: Annotated[Path | None, typer.Option(help=WEIGHTS_HELP)] = None,
    views: Annotated[int | None, typer.Option(help="Cached feature views per video (stage 1).")] = None,
    minority_views: Annotated[int | None, typer.Option(help="Cached views per video of the rarer class.")] = None,
    steps: Annotated[int | None, typer.Option(help="Time steps T per clip.")] = None,
    size: Annotated[int | None, typer.Option(help="Square frame side for the backbone (default: the store's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Stage-1 clips per step (over all processes).")] = None,
    finetune_batch_size: Annotated[int | None, typer.Option(help="Stage-2 clips per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of stage 1 (stage 2 is 10x smaller).")] = None,
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience in epochs (0: off).")] = None,
    metric: Annotated[MetricChoice | None, typer.Option(help="Validation metric for best.pt and early stopping.")] = None,
    amp: Annotated[AmpChoice | None, typer.Option(help="Mixed precision (auto: bf16/fp16 on CUDA; on CPUs with native bf16 the large matrix products in bf16; else off).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of weights, sampling and augmentation.")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader processes for clips.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads per training process (0: torch's default).")] = None,
) -> None:
    """Train a stream: stage 1 on cached backbone features, stage 2 end to end; predictions for val and test."""
    from streams.launch import parse_devices, train_both, train_stream
    from streams.rundir import RunDir, resolve_run_config
    from streams.train import NonFiniteLossError

    if fold is not None and split is not None:
        raise ValueError("give either --fold or --split, not both")
    non_negative("--seed", seed)
    first_epochs = epochs
    overrides = {
        "train": {"stage": stage, "epochs": first_epochs, "finetune_epochs": finetune_epochs or epochs,
                  "fold": fold, "split": split, "views": views, "minority_views": minority_views, "steps": steps,
                  "size": size, "batch_size": batch_size, "finetune_batch_size": finetune_batch_size,
                  "patience": patience, "metric": metric, "amp": amp, "seed": seed, "num_workers": workers,
                  "threads": threads},
        "model": {"backbone": backbone, "head": head, "pretrained": pretrained,
                  "weights_path": str(weights) if weights is not None else None},
        "optim": {"lr": lr},
    }
    overrides = {t: {k: _value(v) for k, v in d.items()} for t, d in overrides.items()}
    streams = ["rgb", "flow"] if stream == StreamChoice.both else [stream.value]
    base = None
    if resume:
        saved = RunDir(out, streams[0])
        if saved.config_path.is_file():
            base = saved.read_config()[0]
    cfg = resolve_run_config(config, overrides, base)
    show = os.environ.get("RANK", "0") == "0"
    board = _Board(streams, cfg.train.metric)

    if stream != StreamChoice.both:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and devices is not None and "," not in devices:
            parse_devices(devices, 1)
        try:
            with Live(board.render(), console=err, refresh_per_second=4, transient=False) if show else _Null() as live:
                def on_event(event: dict) -> None:
                    board.update({**event, "stream": streams[0]})
                    if show:
                        live.update(board.render())

                try:
                    path = train_stream(store, streams[0], out, cfg, devices or "auto", resume, on_event)
                except NonFiniteLossError as exc:
                    raise fail(str(exc), code=1) from None
        finally:
            if show and not err.is_terminal:
                err.line()  # Live ends its last line only on a terminal; an `error:` line must start a line
        if show:
            _summary([(streams[0], True, path, None)], cfg.train.metric, out)
        return

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("under torchrun train one stream per launch: --stream rgb or --stream flow")
    names = parse_devices(devices, 2)
    _precheck(store, cfg)
    with Live(board.render(), console=err, refresh_per_second=4) as live:
        def on_event(event: dict) -> None:
            board.update(event)
            live.update(board.render())

        outcomes = train_both(store, out, cfg, names, resume, on_event)
    _summary([(s, o.ok, o.log_path.parent, o.error) for s, o in outcomes.items()], cfg.train.metric, out)
    failed = [o for o in outcomes.values() if not o.ok]
    for o in failed:
        typer.echo(f"error: the {o.stream} stream failed: {o.error} (log: {o.log_path})", err=True)
    if failed:
        raise typer.Exit(1)


def _precheck(store: Path, cfg) -> None:
    """Mistakes both streams would hit, reported once before any process starts."""
    from data.store import require_store
    from streams.launch import check_training_split, split_ids, store_labels

    require_store(store)
    ids = split_ids(store, cfg.train)
    check_training_split(ids, {k: store_labels(store, v) for k, v in ids.items()}, cfg.train.metric)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, *args: object) -> None:
        return None


class _Board:
    """The live table: one row per stream, updated from training events."""

    def __init__(self, streams: list[str], metric: str) -> None:
        self.metric = metric
        self.rows = {s: {"status": "starting", "stage": "", "epoch": "", "step": "", "loss": "", "val": "",
                         "best": "", "speed": ""} for s in streams}
        self.started = time.monotonic()

    def update(self, event: dict) -> None:
        row = self.rows.get(event.get("stream"))
        if row is None:
            return
        kind = event.get("event")
        if kind == "features":
            row["status"] = f"caching features {event['done']}/{event['total']}"
        elif kind == "step":
            row["status"] = "training"
            row["stage"] = event["stage"]
            row["epoch"] = f"{event['epoch'] + 1}/{event['epochs']}"
            row["step"] = f"{event['step']}/{event['steps']}"
            row["loss"] = f"{event['loss']:.4f}"
        elif kind == "epoch":
            row["status"] = "training"
            row["stage"] = event["stage"]
            row["epoch"] = f"{event['epoch'] + 1}/{event['epochs']}"
            value = event.get(f"val_{self.metric}")
            row["val"] = "" if value is None else f"{value:.4f}"
            if event.get("best"):
                row["best"] = f"{row['val']} ({event['stage']} {event['epoch'] + 1})"
            row["loss"] = f"{event['train_loss']:.4f}"
            row["speed"] = f"{event['clips_per_s']:.0f} clips/s"
        elif kind == "done":
            row["status"] = "done"
        elif kind == "error":
            row["status"] = "failed"

    def render(self) -> Table:
        elapsed = time.monotonic() - self.started
        t = Table(title=f"training ({elapsed:.0f} s)", title_justify="left")
        for c in ("stream", "status", "stage", "epoch", "step", "train loss", f"val {self.metric}",
                  f"best {self.metric}", "speed"):
            t.add_column(c)
        for s, r in self.rows.items():
            t.add_row(s, r["status"], r["stage"], r["epoch"], r["step"], r["loss"], r["val"], r["best"], r["speed"])
        return t


def _summary(results: list[tuple[str, bool, Path, str | None]], metric: str, run: Path) -> None:
    from streams.rundir import RunDir

    rows = []
    for stream, ok, path, _ in results:
        best = ""
        records = RunDir(run, stream).read_metrics()
        marked = [r for r in records if r.get("best")]
        if marked and marked[-1].get(f"val_{metric}") is not None:
            b = marked[-1]
            best = f"{b[f'val_{metric}']:.4f} ({b['stage']} epoch {b['epoch'] + 1})"
        rows.append([stream, "ok" if ok else "failed", best, str(path)])
    out.print(table("twostream train", ["stream", "status", f"best val {metric}", "folder"], rows))
