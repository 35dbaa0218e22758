"""`index` and `synth`: from a folder of videos (or the embedded generator) to a manifest."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import typer

from cli.console import err, out, table
from cli.errors import non_negative, user_errors

IMBALANCE_WARNING = 3.0  # majority:minority ratio above which the summary warns


def register(app: typer.Typer) -> None:
    app.command("index")(index)
    app.command("synth")(synth)


@user_errors
def index(
    source: Path = typer.Argument(..., help="Dataset folder (any recognised layout) or a CSV with path,label[,group][,split]."),
    output: Path = typer.Option(..., "--output", "-o", help="Manifest CSV to write."),
    groups: Path | None = typer.Option(None, "--groups", help="CSV video,group attaching source-recording groups."),
    val_fraction: float = typer.Option(0.15, help="Share of videos for validation (whole groups) where the layout gives no split."),
    test_fraction: float = typer.Option(0.15, help="Share of videos for test (whole groups) where the layout gives no split."),
    seed: int = typer.Option(0, help="Seed of the group-stratified split."),
) -> None:
    """Write a manifest (video_id,path,label,group,split) for a dataset folder or CSV."""
    from data.layouts import detect_layout, index_dataset
    from data.manifest import write_manifest
    from data.splits import assign_splits

    non_negative("--seed", seed)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if not output.parent.resolve().is_dir():
        raise ValueError(f"output folder {output.parent} does not exist")
    if output.is_dir():
        raise IsADirectoryError(f"--output {output} is a folder; give the manifest's file name, e.g. {output / 'manifest.csv'}")
    for option, given in (("the input CSV", source), ("the --groups file", groups)):
        if given is not None and given.is_file() and _same_file(output, given):
            raise ValueError(f"--output {output} is {option}; writing the manifest there would overwrite it: "
                             "choose another output path")
    rows = index_dataset(source, groups_file=groups)
    rows = assign_splits(rows, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    write_manifest(rows, output)
    layout = detect_layout(source) if source.is_dir() else "csv"
    print_manifest_summary(rows, f"{len(rows)} videos indexed from {source} ({layout}) -> {output}")


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths `a` and `b` name one file (through links or different spellings)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # `a` does not exist yet
        return a.resolve() == b.resolve()


def print_manifest_summary(rows, title: str) -> None:
    counts = Counter((r.split or "-", r.label) for r in rows)
    splits = sorted({s for s, _ in counts})
    body = [[s, counts[(s, 1)], counts[(s, 0)], counts[(s, 1)] + counts[(s, 0)]] for s in splits]
    violent = sum(r.label for r in rows)
    body.append(["all", violent, len(rows) - violent, len(rows)])
    out.print(table(title, ["split", "violent", "non-violent", "videos"], body))
    minority = min(violent, len(rows) - violent)
    if minority == 0:
        err.print("[yellow]warning:[/] only one class present")
    elif max(violent, len(rows) - violent) / minority > IMBALANCE_WARNING:
        err.print(f"[yellow]warning:[/] classes are imbalanced ({violent} violent / {len(rows) - violent} non-violent); "
                  "training oversamples the minority and uses focal loss")


@user_errors
def synth(
    output: Path = typer.Argument(..., help="Folder to create the embedded synthetic dataset in."),
    videos: int = typer.Option(60, help="Number of clips."),
    seed: int = typer.Option(0, help="Generator seed."),
) -> None:
    """Generate the embedded synthetic dataset (real video files, Violence/NonViolence + groups.csv)."""
    from data.synthetic import SyntheticSpec, generate_dataset

    non_negative("--seed", seed)
    if not output.parent.resolve().is_dir():
        raise ValueError(f"output folder {output.parent} does not exist")
    generate_dataset(output, SyntheticSpec(videos=videos, seed=seed))
    out.print(f"{videos} synthetic clips written to {output}")
