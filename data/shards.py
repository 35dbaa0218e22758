"""Joining and converting stores: `merge` shard files into one, `write_index` over them, `recode_rgb`.

Each extraction process writes its own shard (`data.store.shard_path`). `merge` copies the shards'
videos into one file; `write_index` joins them without copying, through a small index file that
`Store` opens like a store; `recode_rgb` copies a store with its frames in another RGB codec. Every
output is written aside and committed by rename, so an interrupted call leaves no partial store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py

from data.h5files import commit, created_with, now, parts_dir, put_attrs, tmp_path, unlink_quiet
from data.rgbcodec import DEFAULT_RGB_CODEC, RGB_HDF5, check_rgb_codec, encode_rgb
from data.store import SCHEMA_VERSION, Store, write_payloads

logger = logging.getLogger(__name__)


def _same_source(a: dict, b: dict) -> bool:
    return a.get("source_path") == b.get("source_path") and a.get("label") == b.get("label")


def _pick_videos(stores: Sequence[Store]) -> dict[str, Store]:
    """Which store each video comes from; a duplicate id is fine only with an identical source."""
    chosen: dict[str, Store] = {}
    for store in stores:
        for video_id in store.video_ids:
            first = chosen.get(video_id)
            if first is None:
                chosen[video_id] = store
            elif _same_source(first.attrs(video_id), store.attrs(video_id)):
                logger.info(
                    "%s is in %s and %s; keeping the first", video_id, first.path, store.path
                )
            else:
                raise ValueError(
                    f"video {video_id!r} is in {first.path} and {store.path} with different sources"
                )
    return chosen


def _common_root(stores: Iterable[Store]) -> dict:
    roots = [s.root_attrs for s in stores]
    keys = set(roots[0]).intersection(*roots[1:]) if roots else set()
    skip = {"schema_version", "store_kind", "shards", "created_at", "finalized_at"}
    return {k: roots[0][k] for k in sorted(keys - skip) if all(r[k] == roots[0][k] for r in roots)}


def _check_output(inputs: Sequence[Path], output: Path, overwrite: bool) -> None:
    if not inputs:
        raise ValueError("nothing to join: no input stores given")
    if output.resolve() in {p.resolve() for p in inputs}:
        raise ValueError(f"output {output} is also an input")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"{output.parent}: no such directory for the output")
    if not overwrite:
        taken = output if output.exists() else parts_dir(output) if parts_dir(output).exists() else None
        if taken is not None:
            raise ValueError(f"{taken} already exists; choose another output path or delete {taken} first")


def _clear_parts(output: Path) -> None:
    # Parts of an older store of this name would otherwise be read as part of the new one.
    parts = parts_dir(output)
    if parts.is_dir():
        for p in parts.iterdir():
            unlink_quiet(p)
        parts.rmdir()


def merge(inputs: Sequence[str | Path], output: str | Path, *, overwrite: bool = False) -> Path:
    """Copy shard stores into one store file (written aside, then renamed into place)."""
    inputs = [Path(p) for p in inputs]
    output = Path(output)
    _check_output(inputs, output, overwrite)
    stores = [Store(p) for p in inputs]
    try:
        chosen = _pick_videos(stores)
        tmp = tmp_path(output)
        with h5py.File(tmp, "w") as out:
            videos = out.create_group("videos")
            for video_id, store in chosen.items():
                videos.copy(store.group(video_id), videos, name=video_id)
            root = _common_root(stores)
            root.update(
                schema_version=SCHEMA_VERSION,
                created_at=now(),
                created_with=created_with(),
                merged_from=[p.name for p in inputs],
            )
            put_attrs(out, root)
    finally:
        for store in stores:
            store.close()
    _clear_parts(output)
    commit(tmp, output)
    logger.info("merged %d stores into %s: %d videos", len(inputs), output, len(chosen))
    return output


def recode_rgb(
    source: str | Path,
    output: str | Path,
    rgb_codec: str = DEFAULT_RGB_CODEC,
    *,
    overwrite: bool = False,
    threads: int | None = None,
) -> Path:
    """Copy a store (or a shard index) into one file whose frames are stored by `rgb_codec`.

    Flow and attrs are copied as they are; frames already in `rgb_codec` are copied without
    re-encoding. Shrinks a store of raw frames about five-fold without recomputing its flow.
    """
    source, output = Path(source), Path(output)
    codec = check_rgb_codec(rgb_codec)
    _check_output([source], output, overwrite)
    threads = threads if threads is not None else min(4, os.cpu_count() or 1)
    store = Store(source, threads=threads)
    tmp = tmp_path(output)
    try:
        with h5py.File(tmp, "w") as out:
            videos = out.create_group("videos")
            for video_id in store.video_ids:
                src = store.group(video_id)
                group = videos.create_group(video_id)
                for key, value in src.attrs.items():
                    group.attrs[key] = value
                for name in src:
                    if name != "rgb" or store.rgb_codec(video_id) == codec:
                        group.copy(src[name], group, name=name)
                if store.rgb_codec(video_id) != codec:
                    frames = store.rgb(video_id)  # (T, H, W, 3) uint8
                    if codec == "jpeg":
                        write_payloads(group, "rgb", encode_rgb(frames, threads))
                    else:
                        t, h, w, _ = frames.shape
                        group.create_dataset("rgb", data=frames, chunks=(1, h, w, 3), **RGB_HDF5)
                group.attrs["rgb_codec"] = codec
            root = {k: v for k, v in store.root_attrs.items() if k not in ("store_kind", "shards")}
            root.update(
                schema_version=SCHEMA_VERSION,
                created_at=now(),
                created_with=created_with(),
                rgb_codec=codec,
                recoded_from=source.name,
            )
            put_attrs(out, root)
    except BaseException:
        unlink_quiet(tmp)
        raise
    finally:
        store.close()
    _clear_parts(output)
    commit(tmp, output)
    logger.info("recoded %s into %s: %d videos, rgb %s", source, output, len(store), codec)
    return output


def write_index(
    shards: Sequence[str | Path], output: str | Path, *, overwrite: bool = False
) -> Path:
    """Join shard stores without copying: a small index file that `Store` opens like a store."""
    shards = [Path(p) for p in shards]
    output = Path(output)
    _check_output(shards, output, overwrite)
    stores = [Store(p) for p in shards]
    try:
        if any(s.root_attrs.get("store_kind") == "index" for s in stores):
            raise ValueError("an index can join store files only, not other indexes")
        chosen = _pick_videos(stores)
        if len(chosen) < sum(len(s) for s in stores):
            raise ValueError("shards share video ids; merge them into one file instead")
        root = _common_root(stores)
    finally:
        for store in stores:
            store.close()
    root.update(
        schema_version=SCHEMA_VERSION,
        store_kind="index",
        shards=[os.path.relpath(p.resolve(), output.parent.resolve()) for p in shards],
        created_at=now(),
        created_with=created_with(),
    )
    tmp = tmp_path(output)
    with h5py.File(tmp, "w") as out:
        put_attrs(out, root)
    _clear_parts(output)
    commit(tmp, output)
    return output
