"""Dataset layouts: turn a folder of videos (or a CSV listing them) into manifest rows.

Recognised layouts, found in DIR or up to two folders below it:

- ``folder-per-class``: DIR/Fight + DIR/NonFight (also fight/noFight, Violence/NonViolence,
  violent/non-violent, violence/non_violence; any case, with or without separators). Videos may
  sit anywhere below a class folder.
- ``rwf-2000``: DIR/train|val/Fight|NonFight; the top folder gives the split.
- ``hockey``: Hockey Fights, fi*/no* files in one folder (fi1_xvid.avi, no10_xvid.avi).
- ``csv``: a CSV given instead of DIR, columns ``path,label[,group][,split]`` (paths relative to
  the CSV; a ``video_id`` column, as in a manifest, is kept).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from data.manifest import (
    ManifestRow,
    MissingPathError,
    class_of_folder,
    csv_text,
    parse_label,
    parse_split,
    video_id_for,
)

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".mov", ".m4v"})
LAYOUTS = {
    "folder-per-class": "DIR/Fight + DIR/NonFight (or Violence/NonViolence, violent/non-violent, ...)",
    "rwf-2000": "DIR/train|val/Fight|NonFight",
    "hockey": "fi*/no* videos in one folder (fi1_xvid.avi, no1_xvid.avi)",
    "csv": "a CSV with columns path,label[,group][,split]",
}
# Archives unpacked from Kaggle often wrap the dataset in one or two extra folders.
_MAX_DEPTH = 2
# 'fi'/'no' followed by a non-letter, so 'final.avi' or 'normal.mp4' are not hockey clips.
_HOCKEY = re.compile(r"^(fi|no)(?![a-z])", re.IGNORECASE)
_SPLIT_FOLDERS = {"train", "training", "val", "valid", "validation", "test", "testing"}
_VIDEO_COLUMNS = ("video", "path", "video_id", "file")  # accepted names of a groups file's key


@dataclass(frozen=True)
class _Layout:
    """A recognised layout and the folder it starts at."""

    name: str  # a key of LAYOUTS
    root: Path  # folder holding the class / split folders or the hockey clips


@dataclass(frozen=True)
class _Video:
    """A found video before groups are attached."""

    path: Path  # absolute
    rel: str  # POSIX path relative to the source folder (or the CSV's folder)
    video_id: str
    label: int
    group: str  # "" until known
    split: str


def detect_layout(source: str | os.PathLike) -> str:
    """Name of the layout of a dataset folder or CSV (a key of LAYOUTS)."""
    source = _existing(source)
    if source.is_file():
        return _csv_source(source).name
    return _find_layout(source).name


def index_dataset(
    source: str | os.PathLike, groups_file: str | os.PathLike | None = None
) -> list[ManifestRow]:
    """Manifest rows for every video of a dataset folder or CSV, sorted by path.

    ``groups_file`` is a CSV ``video,group`` whose ``video`` is a path relative to DIR, a file name
    or a video id; listed videos take its group, the others stay their own group.
    """
    source = _existing(source)
    if source.is_file():
        videos = _index_csv(_csv_source(source).root)
    else:
        layout = _find_layout(source)
        videos = _index_folder(layout, source)
    videos.sort(key=lambda v: v.rel)
    _check_unique_ids(videos)
    if groups_file is not None and _existing(groups_file).is_dir():
        raise IsADirectoryError(f"groups file {groups_file} is a folder, not a CSV `video,group`")
    groups = _read_groups(_existing(groups_file), videos) if groups_file is not None else {}
    labels = {v.label for v in videos}
    if len(labels) < 2:
        logger.warning("%s: every video is %s", source, "violent" if 1 in labels else "non-violent")
    return [
        ManifestRow(
            v.video_id,
            str(v.path),
            v.label,
            groups.get(v.video_id) or v.group or v.video_id,
            v.split,
        )
        for v in videos
    ]


def _existing(path: str | os.PathLike) -> Path:
    path = Path(os.path.abspath(os.path.expanduser(path)))
    if not path.exists():
        raise MissingPathError(f"{path} does not exist")
    return path


def _csv_source(path: Path) -> _Layout:
    if path.suffix.lower() != ".csv":
        raise ValueError(f"{path} is a file but not a CSV; give a dataset folder or a CSV")
    return _Layout("csv", path)


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    """Entries minus hidden files (macOS '._x.avi' twins) and '__MACOSX' archive debris."""
    return [e for e in entries if not e.name.startswith(".") and e.name != "__MACOSX"]


def _listdir(folder: Path) -> tuple[list[Path], list[Path]]:
    """Visible sub-folders and video files directly in folder, sorted by name."""
    with os.scandir(folder) as it:
        entries = sorted(_visible(list(it)), key=lambda e: e.name)
    dirs = [Path(e.path) for e in entries if e.is_dir()]
    videos = [Path(e.path) for e in entries if e.is_file() and _is_video(e.name)]
    return dirs, videos


def _is_video(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def _class_folders(folder: Path) -> dict[Path, int]:
    """Class folders directly in folder, when both classes are there; else empty."""
    dirs, _ = _listdir(folder)
    found = {d: label for d in dirs if (label := class_of_folder(d.name)) is not None}
    return found if set(found.values()) == {0, 1} else {}


def _split_folders(folder: Path) -> dict[Path, str]:
    """Split folders (train/val/test) directly in folder that each hold both class folders."""
    dirs, _ = _listdir(folder)
    return {
        d: parse_split(d.name)
        for d in dirs
        if d.name.lower() in _SPLIT_FOLDERS and _class_folders(d)
    }


def _is_hockey(folder: Path) -> bool:
    _, videos = _listdir(folder)
    prefixes = [m.group(1).lower() if (m := _HOCKEY.match(v.name)) else None for v in videos]
    return bool(prefixes) and None not in prefixes and set(prefixes) == {"fi", "no"}


def _probe(folder: Path) -> str | None:
    if _class_folders(folder):
        return "folder-per-class"
    if _split_folders(folder):
        return "rwf-2000"
    if _is_hockey(folder):
        return "hockey"
    return None


def _find_layout(source: Path) -> _Layout:
    """Shallowest folder (breadth first, up to _MAX_DEPTH below source) with a known layout."""
    if not source.is_dir():
        raise ValueError(f"{source} is neither a folder nor a CSV")
    level = [source]
    for _ in range(_MAX_DEPTH + 1):
        found = [_Layout(name, d) for d in level if (name := _probe(d)) is not None]
        if len(found) > 1:
            where = ", ".join(f"{f.root.relative_to(source)} ({f.name})" for f in found)
            raise ValueError(
                f"{source} holds several datasets: {where}; index one of them or list the videos in a CSV"
            )
        if found:
            return found[0]
        level = [sub for d in level for sub in _listdir(d)[0]]
    raise ValueError(_unknown_layout_message(source))


def _unknown_layout_message(source: Path) -> str:
    dirs, videos = _listdir(source)
    if not dirs and not videos:
        return f"{source} is empty (no video files with extensions {', '.join(sorted(VIDEO_EXTENSIONS))})"
    seen = ", ".join(d.name + "/" for d in dirs[:6]) or "no folders"
    known = "; ".join(f"{name}: {text}" for name, text in LAYOUTS.items())
    return f"{source}: no dataset layout recognised (saw {seen}, {len(videos)} videos at the top); recognised layouts are {known}"


def _walk_videos(folder: Path) -> list[Path]:
    """Video files anywhere below folder, following links but never the same folder twice."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        found += [Path(top, f) for f in sorted(files) if not f.startswith(".") and _is_video(f)]
    return found


def _index_folder(layout: _Layout, source: Path) -> list[_Video]:
    # Ids come from paths below the layout's root, so DIR and DIR/videos give the same ids.
    if layout.name == "folder-per-class":
        parts = [(d, label, "") for d, label in _class_folders(layout.root).items()]
    elif layout.name == "rwf-2000":
        parts = [
            (d, label, split)
            for s, split in _split_folders(layout.root).items()
            for d, label in _class_folders(s).items()
        ]
    else:
        _, clips = _listdir(layout.root)
        return [
            _video(p, source, layout.root, 1 if p.name.lower().startswith("fi") else 0, "")
            for p in clips
        ]
    videos = [
        _video(p, source, layout.root, label, split)
        for d, label, split in parts
        for p in _walk_videos(d)
    ]
    if not videos:
        raise ValueError(f"{layout.root}: the class folders hold no video files")
    logger.info("%s: %s layout, %d videos", layout.root, layout.name, len(videos))
    return videos


def _video(path: Path, source: Path, root: Path, label: int, split: str) -> _Video:
    rel = path.relative_to(source).as_posix()
    return _Video(path, rel, video_id_for(path.relative_to(root)), label, "", split)


def _index_csv(path: Path) -> list[_Video]:
    folder = path.parent
    with csv_text(path) as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise ValueError(
                f"{path} lacks column(s) {', '.join(missing)} (expected path,label[,group][,split])"
            )
        videos = []
        for line, rec in enumerate(reader, start=2):
            text = (rec["path"] or "").strip()
            if not text:
                raise ValueError(f"{path}:{line}: empty path")
            try:
                label = parse_label(rec["label"] or "")
                split = parse_split(rec.get("split") or "")
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from None
            video = Path(os.path.normpath(folder / os.path.expanduser(text)))
            try:
                rel = video.relative_to(folder).as_posix()
            except ValueError:
                rel = video.as_posix()
            video_id = (rec.get("video_id") or "").strip() or video_id_for(rel)
            group = (rec.get("group") or "").strip()
            videos.append(_Video(video, rel, video_id, label, group, split))
    if not videos:
        raise ValueError(f"{path} lists no videos")
    absent = [v.rel for v in videos if not v.path.is_file()]
    if absent:
        raise ValueError(
            f"{path}: {len(absent)} listed video(s) do not exist, e.g. {', '.join(absent[:3])}"
        )
    return videos


def _check_unique_ids(videos: list[_Video]) -> None:
    first: dict[str, str] = {}
    for v in videos:
        if v.video_id in first:
            raise ValueError(
                f"{first[v.video_id]} and {v.rel} get the same video id {v.video_id!r}; rename or remove one"
            )
        first[v.video_id] = v.rel


def _read_groups(path: Path, videos: list[_Video]) -> dict[str, str]:
    """video_id -> group from a CSV ``video,group``; 'video' may be a path, file name or id."""
    # Most specific key first: a file name may be shared by two class folders, a path may not.
    tables: list[dict[str, list[str]]] = [{}, {}, {}, {}, {}]
    for v in videos:
        keys = (str(v.path), v.rel, v.video_id, v.path.name, v.path.stem)
        for table, key in zip(tables, keys, strict=True):
            table.setdefault(key, []).append(v.video_id)
    groups: dict[str, str] = {}
    unmatched = []
    with csv_text(path) as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        key_column = next((c for c in _VIDEO_COLUMNS if c in header), None)
        if key_column is None or "group" not in header:
            raise ValueError(
                f"groups file {path} needs columns video,group (has {','.join(header) or 'none'})"
            )
        for line, rec in enumerate(reader, start=2):
            key = (rec[key_column] or "").strip().replace("\\", "/").removeprefix("./")
            group = (rec["group"] or "").strip()
            if not key:
                continue
            if not group:
                raise ValueError(f"{path}:{line}: empty group for {key!r}")
            if os.path.isabs(key):
                key = os.path.normpath(key)
            ids = next((t[key] for t in tables if key in t), None)
            if ids is None:
                unmatched.append(key)
                continue
            if len(ids) > 1:
                raise ValueError(
                    f"{path}:{line}: {key!r} matches several videos ({', '.join(ids[:3])}); give its path relative to the dataset folder"
                )
            if groups.get(ids[0], group) != group:
                raise ValueError(
                    f"{path}:{line}: {key!r} is given two groups, {groups[ids[0]]!r} and {group!r}"
                )
            groups[ids[0]] = group
    if not groups:
        raise ValueError(
            f"groups file {path} matches none of the {len(videos)} videos (e.g. {unmatched[:1]})"
        )
    if unmatched:
        logger.warning(
            "groups file %s: %d entries match no video, e.g. %s",
            path,
            len(unmatched),
            unmatched[:3],
        )
    logger.info(
        "groups file %s: %d of %d videos grouped into %d groups",
        path,
        len(groups),
        len(videos),
        len(set(groups.values())),
    )
    return groups
