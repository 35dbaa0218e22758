"""`run`: the whole job in one command (index -> extract -> train both streams -> fuse -> evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.choices import PRETRAINED_HELP, WEIGHTS_HELP
from cli.console import err, out, table
from cli.errors import user_errors
from cli.fusion_cmds import TTA_HELP, PresetName, metrics_table, print_paired


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("run")(run)


@user_errors
def run(
    data_dir: Annotated[Path | None, typer.Argument(help="Dataset folder or CSV (any layout `index` knows); none = the embedded synthetic dataset.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run folder (default runs/synthetic, or runs/<dataset name>).")] = None,
    preset: Annotated[PresetName, typer.Option(help="cpu (small and fast), gpu (the report's settings) or auto (gpu when CUDA is there).")] = PresetName.auto,
    epochs: Annotated[int | None, typer.Option(help="Stage-1 epochs (overrides the preset).")] = None,
    tta: Annotated[int | None, typer.Option(help=TTA_HELP + " Default: the preset's.")] = None,
    pretrained: Annotated[bool, typer.Option(help=PRETRAINED_HELP)] = False,
    weights: Annotated[Path | None, typer.Option(help=WEIGHTS_HELP)] = None,
) -> None:
    """Index, extract flow, train both streams at once, fuse and evaluate; rerun to resume."""
    from fusion.pipeline import run_job
    from fusion.presets import choose_preset
    from fusion.tta import check_tta

    if tta is not None:
        check_tta(tta)
    if out_dir is None:
        out_dir = Path("runs") / ("synthetic" if data_dir is None else (data_dir.stem or "run"))
    chosen = choose_preset(preset.value)
    err.print(f"preset [bold]{chosen.name}[/]: {chosen.size}px frames, {chosen.flow_method} flow, {chosen.backbone} "
              f"{chosen.stage} training, {epochs or chosen.epochs} epochs -> {out_dir}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=err, transient=False) as bar:
        tasks: dict[str, int] = {}

        def on_event(event: dict) -> None:
            kind = event.get("event")
            if kind == "job":
                bar.console.print(f"[green]done[/] {event['step']}: {event['status']} ({event['seconds']:.1f} s)")
                return
            stream = event.get("stream")
            if stream is None:
                return
            if stream not in tasks:
                tasks[stream] = bar.add_task(f"train {stream}", total=None, info="")
            if kind == "features":
                bar.update(tasks[stream], completed=event["done"], total=event["total"], info="caching features")
            elif kind == "epoch":
                acc = event.get("val_accuracy")
                info = f"{event['stage']} val acc {acc:.3f}" if isinstance(acc, float) else event.get("stage", "")
                bar.update(tasks[stream], completed=event["epoch"] + 1, total=event["epochs"], info=info)
            elif kind == "done":
                bar.update(tasks[stream], info="done")

        result = run_job(data_dir, out_dir, chosen.name, epochs, tta, on_event, pretrained=pretrained, weights=weights)
    total = sum(s["seconds"] for s in result["steps"].values())
    out.print(table("steps", ["step", "status", "seconds"],
                    [[k, v["status"], f"{v['seconds']:.1f}"] for k, v in result["steps"].items()]))
    views = f"{result['tta']} TTA view{'s' if result['tta'] > 1 else ''}"
    out.print(metrics_table(f"test set ({views}; thresholds chosen on validation)", result["metrics"]))
    if result["fallback_reason"]:
        err.print(f"[yellow]fallback:[/] {result['fallback_reason']}")
    print_paired(result["paired"])
    out.print(f"fused test accuracy {result['metrics']['fused']['accuracy']:.4f} in {total:.0f} s; "
              f"report: {result['report']}")
