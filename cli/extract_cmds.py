"""`extract`, `merge` and `info`: the HDF5 store of sampled RGB frames and optical flow."""

from __future__ import annotations

from collections import Counter
from enum import Enum
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli.console import err, out, table
from cli.errors import fail, user_errors


class Method(str, Enum):
    tvl1 = "tvl1"
    farneback = "farneback"


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    opencv = "opencv"


class FlowDtype(str, Enum):
    uint8 = "uint8"
    float16 = "float16"


class RgbCodec(str, Enum):
    jpeg = "jpeg"
    raw = "raw"


class FlowCodec(str, Enum):
    qwebp = "qwebp"
    qwebp_fine = "qwebp-fine"
    uint8 = "uint8"
    float16 = "float16"
    jpeg = "jpeg"


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)
    app.command("merge")(merge)
    app.command("info")(info)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got '{text}'") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


@user_errors
def extract(
    manifest: Path = typer.Argument(..., help="Manifest CSV from `twostream index`."),
    output: Path = typer.Option(..., "--output", "-o", help="Store file to write (HDF5)."),
    method: Method = typer.Option(Method.tvl1, help="Optical-flow method."),
    backend: Backend = typer.Option(Backend.auto, help="torch, opencv, or auto (torch on CUDA; the faster one on CPU)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda:N."),
    size: int | None = typer.Option(None, help="Square frame side (default 224); 0 keeps the source size (see --short-side)."),
    short_side: int | None = typer.Option(None, help="Resize the short side to this, keeping the aspect (instead of --size)."),
    fps: float | None = typer.Option(None, help="Sample at this frame rate (same time step across sources)."),
    frames: int | None = typer.Option(None, help="Sample N frames spread uniformly."),
    flow_codec: FlowCodec | None = typer.Option(None, help="Stored form of the flow: qwebp (default: 0.25 px steps, lossless WebP; smallest), qwebp-fine, uint8 (TSN quantisation with --bound, gzip), float16, jpeg (denseflow's pair)."),
    flow_dtype: FlowDtype | None = typer.Option(None, help="Shorthand: uint8 = --flow-codec uint8, float16 = --flow-codec float16."),
    rgb_codec: RgbCodec = typer.Option(RgbCodec.jpeg, help="Stored form of the frames: jpeg (quality 95, ~7x smaller) or raw (lossless, uncompressed, fastest to load)."),
    bound: float = typer.Option(20.0, help="Quantisation bound in pixels for uint8 flow (TSN: 20)."),
    workers: int = typer.Option(0, help="Decoding processes (0: one per core)."),
    shard: str | None = typer.Option(None, help="i/n: extract the i-th of n disjoint slices into its own file."),
    strict: bool = typer.Option(False, help="Exit 1 when any video fails."),
) -> None:
    """Extract sampled RGB frames and optical flow for every video of a manifest into one store."""
    from data.manifest import read_manifest
    from data.sampling import Sampling
    from flow.extract import ExtractConfig, extract_dataset

    if frames is not None and fps is not None:
        raise ValueError("give either --fps or --frames, not both")
    if short_side is not None and size is not None:
        raise ValueError("give either --size or --short-side, not both")
    if short_side is None and size is None:
        size = 224
    if flow_dtype is not None and flow_codec is not None and flow_dtype.value != flow_codec.value:
        raise ValueError(f"--flow-dtype {flow_dtype.value} and --flow-codec {flow_codec.value} disagree; give one of them")
    if size is not None and size != 0 and size < 16:
        raise ValueError(f"--size must be at least 16 (got {size})")
    if not manifest.exists():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    rows = read_manifest(manifest)
    sampling = Sampling(fps=fps, frames=frames, size=size or None, short_side=short_side)
    codec = (flow_dtype or flow_codec or FlowCodec.qwebp).value
    cfg = ExtractConfig(method=method.value, backend=backend.value, device=device, sampling=sampling,
                        flow_codec=codec, rgb_codec=rgb_codec.value, bound=bound, workers=workers, shard=parse_shard(shard))
    with Progress(
        TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False,
    ) as bar:
        task = bar.add_task("videos", total=len(rows), rate="")

        def on_progress(p) -> None:
            rate = f"{p.pairs_done / p.elapsed_s:.1f} pairs/s" if p.elapsed_s > 0 and p.pairs_done else ""
            bar.update(task, total=p.videos_total, completed=p.videos_done + p.videos_failed,
                       rate=f"{rate}  {p.videos_failed} failed" if p.videos_failed else rate)

        summary = extract_dataset(rows, output, cfg, on_progress)
    body = [
        ["store", summary.store],
        ["written this run", len(summary.written)],
        ["already complete", len(summary.skipped)],
        ["failed", len(summary.failures)],
        ["frames / flow pairs", f"{summary.frames} / {summary.pairs}"],
        ["time", f"{summary.seconds:.1f} s ({summary.pairs_per_s:.1f} pairs/s)"],
    ]
    out.print(table("extraction", ["", ""], body))
    for f in summary.failures:
        err.print(f"[yellow]skipped[/] {f.path}: {f.reason}")
    if summary.failures_csv:
        err.print(f"reasons written to {summary.failures_csv}")
    if not summary.written and not summary.skipped:
        raise fail("nothing was extracted", code=1)
    if strict and summary.failures:
        raise fail(f"{len(summary.failures)} video(s) failed (--strict)", code=1)


@user_errors
def merge(
    shards: list[Path] = typer.Argument(..., help="Shard stores written with --shard."),
    output: Path = typer.Option(..., "--output", "-o", help="Merged store to write."),
) -> None:
    """Join shard stores into one store that readers open like any other."""
    from data.shards import merge as merge_stores

    missing = [str(s) for s in shards if not s.exists()]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {', '.join(missing)}")
    if not output.parent.resolve().is_dir():
        raise ValueError(f"output folder {output.parent} does not exist")
    path = merge_stores(list(shards), output)
    out.print(f"merged {len(shards)} shard(s) into {path}")


@user_errors
def info(store: Path = typer.Argument(..., help="Store file.")) -> None:
    """Summarise a store and check every video; exit 1 when anything is corrupt."""
    from data.store import CorruptStoreError, Store, require_store

    require_store(store)
    with Store(store) as s:
        try:
            ids = s.video_ids
        except CorruptStoreError as exc:  # damaged where the video list lives: nothing more to check
            err.print(f"[red]corrupt:[/] {exc}")
            raise fail(f"1 problem(s) found in {store}", code=1) from None
        summary = {}  # video id -> (split, label, frames); a video that does not read is left to validate
        for v in ids:
            try:
                summary[v] = (s.attrs(v).get("split", "") or "-", s.label(v), s.num_frames(v))
            except ValueError:  # damaged (CorruptStoreError), no rgb, no label: validate reports it
                continue
        counts = Counter((split, label) for split, label, _ in summary.values())
        splits = sorted({k for k, _ in counts})
        rows = [[k, counts[(k, 1)], counts[(k, 0)]] for k in splits]
        unreadable = f" ({len(s) - len(summary)} unreadable)" if len(summary) < len(s) else ""
        out.print(table(f"{store}: {len(s)} videos{unreadable}", ["split", "violent", "non-violent"], rows))
        frames = [n for _, _, n in summary.values()]
        root = s.root_attrs
        try:
            flow_bytes = s.flow_bytes_per_field(list(summary))
        except (ValueError, KeyError):  # a flow dataset missing or damaged: validate says which
            flow_bytes = None
        body = [
            ["frames per video", f"min {min(frames, default=0)}, mean {sum(frames) / max(1, len(frames)):.1f}, max {max(frames, default=0)}"],
            ["flow", f"{root.get('flow_method', '?')} ({root.get('flow_backend', '?')}), codec {root.get('flow_codec', '?')}, bound {root.get('flow_bound', '?')}"],
            ["flow parameters", root.get("flow_params", "?")],
            ["sampling", root.get("sampling", "?")],
            ["size on disk", f"{s.disk_bytes() / 1e6:.2f} MB"],
            ["bytes per flow field", f"{flow_bytes:.0f}" if flow_bytes is not None else "? (unreadable videos)"],
            ["schema version", root.get("schema_version", "?")],
        ]
        out.print(table("store", ["", ""], body))
        problems = s.validate()
    if problems:
        for p in problems:
            err.print(f"[red]corrupt:[/] {p}")
        raise fail(f"{len(problems)} problem(s) found in {store}", code=1)
    out.print(f"[green]all {len(frames)} videos check out[/]")
