"""Durable HDF5 files: sibling paths, atomic commits, and attributes that keep any plain value.

A file is written under `tmp_path(final)`, then `commit` fsyncs it and renames it into place, so a
reader sees the old file or the new one, never half of one; `write_file_atomic` does the same for
any file written through a callback (checkpoints, JSON, CSV). `put_attrs` stores numbers, strings and
homogeneous lists as native HDF5 attributes and anything else JSON-serialisable (dicts, None,
mixed lists) as JSON text, listed under the `JSON_KEYS` attribute; `get_attrs` reads both back as
plain Python values.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np

JSON_KEYS = "_json_keys"  # attr listing the keys whose values were stored as JSON text

# --- paths -------------------------------------------------------------------------------------


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")



# --- durability


def fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows; nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """Make the complete file `tmp` durable and atomically visible as `final`."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def write_file_atomic(path: str | Path, fill: Callable[[BinaryIO], None]) -> Path:
    """Write `path` through `fill(file)`: readers see the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the result is an ordinary shared file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# --- attrs


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def same_value(a: object, b: object) -> bool:
    """Equal once stored: a tuple reads back as a list, a numpy scalar as a Python number."""
    canon = lambda v: json.dumps(v, default=_json_default, sort_keys=True)  # noqa: E731
    try:
        return canon(a) == canon(b)
    except TypeError:
        return False


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _native(value: object) -> object | None:
    """The HDF5-attribute form of `value`, or None when only JSON keeps it intact."""
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if _is_int(value):
        return np.int64(value)
    if isinstance(value, (float, np.floating)):
        return np.float64(value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and value.size:
        return value
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(x, str) for x in value):
            return list(value)
        if all(_is_int(x) for x in value):
            return np.asarray(value, np.int64)
        if all(isinstance(x, (float, np.floating)) for x in value):
            return np.asarray(value, np.float64)
    return None


def put_attrs(obj: h5py.HLObject, attrs: dict) -> None:
    """Write plain values as HDF5 attrs; dicts, None, empty or mixed lists go in as JSON text."""
    json_keys = set(_get_json_keys(obj))
    for key, value in attrs.items():
        if not isinstance(key, str) or not key or key == JSON_KEYS:
            raise ValueError(
                f"attr name must be a non-empty string other than {JSON_KEYS!r}, got {key!r}"
            )
        native = _native(value)
        if native is None:
            try:
                native = json.dumps(value, default=_json_default)
            except (TypeError, ValueError) as err:
                raise ValueError(f"attr {key!r}: cannot store a value of type {err}") from None
            json_keys.add(key)
        else:
            json_keys.discard(key)
        obj.attrs[key] = native
    if json_keys:
        obj.attrs[JSON_KEYS] = sorted(json_keys)
    elif JSON_KEYS in obj.attrs:
        del obj.attrs[JSON_KEYS]


def _get_json_keys(obj: h5py.HLObject) -> list[str]:
    keys = obj.attrs.get(JSON_KEYS)
    return [] if keys is None else [k.decode() if isinstance(k, bytes) else str(k) for k in keys]


def plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [plain(x) for x in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def get_attrs(obj: h5py.HLObject) -> dict:
    json_keys = set(_get_json_keys(obj))
    out = {}
    for key, value in obj.attrs.items():
        if key == JSON_KEYS:
            continue
        out[key] = json.loads(plain(value)) if key in json_keys else plain(value)
    return out


def created_with() -> str:
    try:
        from importlib.metadata import version

        ours = version("twostream-violence")
    except Exception:  # running from a source tree that is not installed
        ours = "unknown"
    return f"twostream {ours}; h5py {h5py.__version__}; HDF5 {h5py.version.hdf5_version}"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
