"""Manifest CSV: one row per video with its id, path, label, source-recording group and split.

The columns are ``video_id,path,label,group,split``. Labels are 1 = violent, 0 = non-violent;
``group`` names the source recording (splits never put one group in two folds); ``split`` is
``""`` when unassigned, else ``train``, ``val`` or ``test``. Paths are stored relative to the
manifest's folder when the video lies under it, so a dataset folder with its manifest can move.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TextIO

logger = logging.getLogger(__name__)

COLUMNS = ("video_id", "path", "label", "group", "split")
SPLITS = ("train", "val", "test")
CLASS_NAMES = {0: "non_violent", 1: "violent"}

# Class words, lower-cased with separators removed. Folder names use only these words (a folder
# called '0' or '1' is more often a shard number than a class); CSV cells also take 1/0, true/false.
_POSITIVE_WORDS = {"violent", "violence", "fight", "fights"}
_NEGATIVE_WORDS = {
    "nonviolent",
    "nonviolence",
    "noviolence",
    "notviolent",
    "nofight",
    "nofights",
    "nonfight",
    "nonfights",
    "notfight",
}
_POSITIVE_CELLS = _POSITIVE_WORDS | {"1", "true", "yes"}
_NEGATIVE_CELLS = _NEGATIVE_WORDS | {"0", "false", "no"}
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


class MissingPathError(FileNotFoundError, ValueError):
    """A path the user named does not exist; catchable as either FileNotFoundError or ValueError."""


@dataclass(frozen=True)
class ManifestRow:
    """One video of a dataset."""

    video_id: str  # unique, '/'-free (it names the video's HDF5 group)
    path: str  # absolute path of the video file once read; relative only inside the CSV
    label: int  # 1 = violent, 0 = non-violent
    group: str  # source recording; defaults to the video itself
    split: str = ""  # "" when unassigned, else train / val / test


def _squash(text: str) -> str:
    """Lower-case and drop separators, so 'Non_Violence', 'non-violence' and 'NonViolence' agree."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def class_of_folder(name: str) -> int | None:
    """Label a class folder's name spells ('Fight' -> 1, 'non_violence' -> 0), else None."""
    key = _squash(name)
    if key in _POSITIVE_WORDS:
        return 1
    if key in _NEGATIVE_WORDS:
        return 0
    return None


def parse_label(value: object) -> int:
    """Label from 1/0, violent/non-violent, violence/non_violence, fight/nofight or true/false."""
    key = _squash(str(value))
    if key in _POSITIVE_CELLS:
        return 1
    if key in _NEGATIVE_CELLS:
        return 0
    raise ValueError(
        f"bad label {value!r}: use 1/0, violent/non-violent, fight/nofight or true/false"
    )


def parse_split(value: object) -> str:
    """Canonical split name ('' / train / val / test) from common spellings."""
    text = str(value).strip().lower()
    if text == "":
        return ""
    if text not in _SPLIT_ALIASES:
        raise ValueError(f"bad split {value!r}: use train, val, test or leave it empty")
    return _SPLIT_ALIASES[text]


def video_id_for(relpath: str | os.PathLike) -> str:
    """Stable id from a path relative to the dataset root: 'Fight/fi001.avi' -> 'Fight__fi001'.

    Folders are joined with '__' because HDF5 group names cannot contain '/'; the extension is
    dropped. Two files differing only in extension map to the same id; index_dataset reports that.
    """
    parts = [p for p in str(relpath).replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError(f"cannot make a video id from the empty path {str(relpath)!r}")
    stem = PurePosixPath(parts[-1]).stem
    parts[-1] = stem if stem not in ("", ".", "..") else parts[-1]
    return "__".join(parts)


def check_rows(
    rows: Sequence[ManifestRow], where: str = "manifest", first: int = 1, unit: str = "row"
) -> None:
    """Raise ValueError on duplicate ids, ids HDF5 cannot name, labels other than 0/1, bad splits.

    Messages number rows from ``first`` and call them ``unit`` (a CSV reader passes 2, "line").
    """
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=first):
        at = f"{where}: {unit} {i}"
        if row.video_id in ("", ".", "..") or "/" in row.video_id:
            raise ValueError(f"{at}: bad video_id {row.video_id!r} (empty, '.', '..' or has '/')")
        if row.video_id in seen:
            raise ValueError(
                f"{where}: duplicate video_id {row.video_id!r} ({unit}s {seen[row.video_id]} and {i})"
            )
        seen[row.video_id] = i
        if isinstance(row.label, bool) or row.label not in (0, 1):
            raise ValueError(f"{at}: label must be 0 or 1, got {row.label!r}")
        if row.split not in ("", *SPLITS):
            raise ValueError(f"{at}: bad split {row.split!r}")


@contextlib.contextmanager
def csv_text(path: Path) -> Iterator[TextIO]:
    """A CSV file opened for reading as UTF-8 (a spreadsheet's BOM skipped); text in another
    encoding is a one-line ValueError naming the file, wherever in it the bad byte sits."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield f
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as a UTF-8 CSV") from None


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Rows of a manifest CSV, with paths resolved against the manifest's folder.

    ``group`` and ``split`` columns may be absent (group defaults to the video id, split to '').
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(
            f"manifest {path} does not exist"
            if not path.exists()
            else f"manifest {path} is not a file"
        )
    folder = Path(os.path.abspath(path)).parent
    with csv_text(path) as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise ValueError(f"manifest {path} is empty")
        reader.fieldnames = header
        missing = [c for c in ("video_id", "path", "label") if c not in header]
        if missing:
            hint = (
                " (a path,label CSV is indexed with index_dataset)" if "video_id" in missing else ""
            )
            raise ValueError(f"manifest {path} lacks column(s) {', '.join(missing)}{hint}")
        rows = []
        for line, rec in enumerate(reader, start=2):
            where = f"{path}:{line}"
            if None in rec:
                raise ValueError(f"{where}: more cells than columns")
            video_id = (rec["video_id"] or "").strip()
            video = (rec["path"] or "").strip()
            if not video:
                raise ValueError(f"{where}: empty path")
            try:
                label = parse_label(rec["label"] or "")
                split = parse_split(rec.get("split") or "")
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            group = (rec.get("group") or "").strip() or video_id
            rows.append(ManifestRow(video_id, _absolute(video, folder), label, group, split))
    check_rows(rows, where=str(path), first=2, unit="line")
    return rows


def write_manifest(rows: Iterable[ManifestRow], path: str | os.PathLike) -> None:
    """Write rows atomically; videos under the manifest's folder get relative paths.

    Videos elsewhere keep absolute paths: a '../' chain would break when either side moves.
    Relative row paths are taken relative to the current directory.
    """
    rows = list(rows)
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"output folder {path.parent} does not exist")
    folder = Path(os.path.abspath(path.parent))
    check_rows(rows, where=str(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for row in rows:
                writer.writerow(
                    [row.video_id, _relative(row.path, folder), row.label, row.group, row.split]
                )
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result is an ordinary shared file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    logger.info("wrote %d rows to %s", len(rows), path)


def summarize(rows: Sequence[ManifestRow]) -> dict:
    """Counts per class and split, and the majority/minority ratio (None when a class is absent).

    Returns ``{"videos", "groups", "violent", "non_violent", "imbalance_ratio",
    "splits": {name: {"videos", "groups", "violent", "non_violent"}}}``; splits come in the order
    train, val, test, then 'unassigned' for rows without one.
    """

    def counts(part: Sequence[ManifestRow]) -> dict:
        by_class = Counter(r.label for r in part)
        return {
            "videos": len(part),
            "groups": len({r.group for r in part}),
            "violent": by_class[1],
            "non_violent": by_class[0],
        }

    total = counts(rows)
    small, large = sorted((total["violent"], total["non_violent"]))
    total["imbalance_ratio"] = large / small if small else None
    names = [s for s in SPLITS if any(r.split == s for r in rows)]
    if any(r.split == "" for r in rows):
        names.append("unassigned")
    total["splits"] = {
        name: counts([r for r in rows if (r.split or "unassigned") == name]) for name in names
    }
    return total


def _absolute(video: str, folder: Path) -> str:
    """Absolute, normalised path; symlinks are kept as the user laid them out."""
    return os.path.normpath(os.path.join(folder, os.path.expanduser(video)))


def _relative(video: str, folder: Path) -> str:
    """POSIX path relative to folder when video lies under it, else the absolute path."""
    absolute = os.path.abspath(video)
    # Compare the paths as given first, then with symlinks resolved (e.g. /tmp -> /private/tmp).
    for inner, outer in ((absolute, folder), (os.path.realpath(absolute), folder.resolve())):
        try:
            return Path(inner).relative_to(outer).as_posix()
        except ValueError:
            continue
    return absolute
