"""`features`: cache frozen-backbone features of every video's clip views beside the store (training stage 1)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli.choices import PRETRAINED_HELP, WEIGHTS_HELP, Backbone
from cli.console import err, out, table
from cli.errors import non_negative, user_errors


class Stream(str, Enum):
    rgb = "rgb"
    flow = "flow"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("features")(features)


@user_errors
def features(
    store: Annotated[Path, typer.Argument(help="Store file from `twostream extract`.")],
    stream: Annotated[Stream, typer.Option(help="Which stream's clips go through the backbone.")],
    backbone: Annotated[Backbone, typer.Option(help="Frame encoder (vgg19: fc7, 4096-d).")] = Backbone.vgg19,
    views: Annotated[int, typer.Option(help="Views per video: view 0 is the plain clip, the rest augmented draws.")] = 1,
    minority_views: Annotated[
        int | None, typer.Option(help="Views per video of the less frequent class (default: --views).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Time steps T per clip.")] = 16,
    flow_stack: Annotated[int, typer.Option(help="Flow fields L stacked per step (flow stream: 2L channels).")] = 5,
    size: Annotated[int | None, typer.Option(help="Square frame side fed to the backbone (default: the store's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Clips per backbone call (each of T frames).")] = 32,
    pretrained: Annotated[bool, typer.Option(help=PRETRAINED_HELP)] = False,
    weights: Annotated[Path | None, typer.Option(help=WEIGHTS_HELP)] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes reading clips.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the augmented views.")] = 0,
) -> None:
    """Run the frozen backbone once over every video's views and cache per-step features (float16)."""
    from data.clips import ClipConfig
    from streams.features import FeatureDataset, cache_features

    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    non_negative("--seed", seed)
    cfg = ClipConfig(steps=steps, flow_stack=flow_stack, size=size)
    bar = Progress(
        TextColumn(f"[bold]features {stream.value}/{backbone.value}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    )
    task = None

    def on_progress(done: int, total: int) -> None:
        # The bar appears once the store checked out and the model is built, so a user mistake
        # prints its one line alone.
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("videos", total=total)
        bar.update(task, completed=done, total=total)

    try:
        path = cache_features(
            store, stream.value, backbone.value, views=views, minority_views=minority_views, clip_cfg=cfg,
            device=device, batch_size=batch_size, pretrained=pretrained, weights_path=weights,
            num_workers=workers, seed=seed, on_progress=on_progress,
        )
    finally:
        bar.stop()
    ds = FeatureDataset(path)
    body = [
        ["file", path],
        ["videos", len(ds)],
        ["views cached", f"{int(ds.views.sum())} ({views} per video, {ds.attrs['minority_views']} for label {ds.attrs['minority_label']})"],
        ["features per view", f"{ds.steps} x {ds.feature_dim} float16"],
    ]
    out.print(table("features", ["", ""], body))
