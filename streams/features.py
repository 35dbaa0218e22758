"""Stage 1 of training: run the frozen backbone once per clip view and cache per-step features.

A features file sits beside its store as `<store>.features-<stream>-<backbone>.h5`:

    /                attrs: schema_version, stream, backbone, feature_dim, clip (ClipConfig as
                     JSON), augment (JSON), views, minority_views, minority_label, seed, pretrained,
                     weights_path, encoder_version (hoghof's descriptor version; 0 for CNNs, whose
                     features the seed or weights fix), store (absolute path), store_id (the
                     store's identity: `data.store.store_identity`, so a store deleted and extracted
                     again at the same path is not mistaken for this one), store_flow (the store's
                     flow settings, JSON)
    /videos/<id>/    attrs: label, views
        features     (V, T, D) float16    view 0 = the plain uniform clip (what evaluation sees),
                                          views 1.. = seeded augmented draws (`ClipDataset` views)
        index        (V, T) int64         frame index of each step, per view

The minority class (the less frequent label among the cached videos; a tie counts 0, the
project's usual minority) gets `minority_views` views, the other `views`: the report's
augmentation factor, paid once here instead of every epoch.

Crash safety follows the store: finished videos go into `<file>.partial` (closed after each
video, so a kill between videos leaves it whole); a rerun with the same settings resumes from it,
and the finished file is fsynced and renamed into place. A partial file that a kill left
unreadable is discarded and the run starts over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.augment import AugmentConfig
from data.clips import ClipConfig, ClipDataset, clip_inputs
from data.store import CorruptStoreError, FeatureCacheError, Store, require_store, store_identity
from flow.devices import resolve_device
from streams.backbones import build_backbone
from streams.hoghof import VERSION as HOGHOF_VERSION

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_DEFAULT_CLIP = ClipConfig()
_STORE_FLOW_KEYS = ("flow_method", "flow_params", "flow_backend", "flow_codec", "flow_bound", "sampling")


def features_path(store_path: str | Path, stream: str, backbone: str) -> Path:
    """Where the features of `stream` through `backbone` are cached: beside the store."""
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.name}.features-{stream}-{backbone}.h5")


def minority_label(labels: Sequence[int]) -> int:
    """The less frequent of labels 0 and 1 (0 on a tie)."""
    labels = np.asarray(labels, np.int64)
    return int((labels == 1).sum() < (labels == 0).sum())


def cache_features(
    store_path: str | Path,
    stream: str,
    backbone: str = "vgg19",
    views: int = 1,
    minority_views: int | None = None,
    clip_cfg: ClipConfig = _DEFAULT_CLIP,
    device: str | torch.device = "auto",
    batch_size: int = 32,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
    num_workers: int = 0,
    out_path: str | Path | None = None,
    *,
    augment: AugmentConfig | None = None,
    video_ids: Sequence[str] | None = None,
    seed: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Cache backbone features of every video's views; returns the features file.

    `batch_size` counts clips; the backbone sees them as one (batch, T, C, H, W) batch.
    `augment` draws views 1.. (default AugmentConfig()); `video_ids` defaults to the whole store;
    `on_progress(done, total)` is called as videos finish. A finished file with the same settings
    and videos is returned as is.
    """
    store_path = Path(store_path)
    if clip_cfg.train:
        raise ValueError("clip_cfg.train must be False when caching features: views give the augmentation")
    if views < 1 or (minority_views is not None and minority_views < 1):
        raise ValueError(f"views and minority_views must be >= 1, got {views} and {minority_views}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    minority_views = views if minority_views is None else minority_views
    augment = augment if augment is not None else AugmentConfig()
    ids, labels, store_root = _read_store(store_path, stream, video_ids)
    minority = minority_label(list(labels.values()))
    settings = {
        "stream": stream,
        "backbone": backbone,
        "clip": json.dumps(clip_cfg.to_dict(), sort_keys=True),
        "augment": json.dumps(augment.to_dict(), sort_keys=True),
        "views": int(views),
        "minority_views": int(minority_views),
        "minority_label": minority,
        "seed": int(seed),
        "pretrained": bool(pretrained),
        "weights_path": str(weights_path or ""),
        "encoder_version": encoder_version(backbone),
        "store": str(store_path.resolve()),
        # The path alone does not tell a store extracted again in its place (other videos or labels).
        "store_id": store_identity(store_root),
        "store_flow": store_flow_signature(store_root),
    }
    out = Path(out_path) if out_path is not None else features_path(store_path, stream, backbone)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    if set(ids) <= _finished(out, settings, labels):
        log.info("%s already holds these features", out)
        if on_progress is not None:
            on_progress(len(ids), len(ids))
        return out
    partial = out.with_name(out.name + ".partial")
    done = _resume(partial, settings, labels)
    todo = [v for v in ids if v not in done]
    n_views = {v: minority_views if labels[v] == minority else views for v in ids}
    log.info("caching %s %s features of %d videos (%d done before), %d views each (%d for label %d)",
             stream, backbone, len(todo), len(ids) - len(todo), views, minority_views, minority)

    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):  # seeded like build_model: a random backbone is the one the run rebuilds
        torch.manual_seed(seed)
        net = build_backbone(backbone, clip_cfg.channels(stream), pretrained, weights_path, clip_cfg.size or 224)
    net = net.to(dev).eval().requires_grad_(False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    if partial.exists() and not done:
        partial.unlink()
    if not partial.exists():
        with h5py.File(partial, "w") as f:
            f.create_group("videos")
            f.attrs.update({**settings, "schema_version": SCHEMA_VERSION, "feature_dim": net.out_dim})

    items = _ViewItems(store_path, todo, n_views, stream, clip_cfg, augment, seed)
    loader = DataLoader(items, batch_size=batch_size, num_workers=num_workers, pin_memory=dev.type == "cuda")
    pending: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    finished = len(ids) - len(todo)
    if on_progress is not None:
        on_progress(finished, len(ids))
    with torch.inference_mode():
        for batch in loader:
            clips = clip_inputs(batch, dev)  # (B, T, C, H, W) float32, normalised on the device
            with autocast:
                feats = net.forward_clips(clips)  # (B, T, D)
            feats = feats.to(torch.float16).cpu().numpy()  # (B, T, D)
            for j, video_id in enumerate(batch["video_id"]):
                views_of = pending.setdefault(video_id, {})
                views_of[int(batch["view"][j])] = (feats[j], batch["index"][j].numpy())
                if len(views_of) == n_views[video_id]:
                    _append_video(partial, video_id, labels[video_id], pending.pop(video_id))
                    finished += 1
                    if on_progress is not None:
                        on_progress(finished, len(ids))
    items.close()
    _finish(partial, out)
    log.info("features written to %s", out)
    return out


def features_mismatch(path: str | Path, cfg, run: dict) -> str | None:
    """How the features file at `path` differs from the one a stream was trained on, or None.

    The file is shared by every run on its store, and training with another seed (a randomly
    initialised CNN) or on a store extracted again remakes it; heads fitted on it later (inner
    folds) would then not match the run's own. `cfg` is the run's RunConfig, `run` its [run]
    table (with `store_id` from the version that records it).
    """
    attrs = features_attrs(Path(path))
    if attrs is None:
        return "is gone"
    if run.get("store_id") and attrs.get("store_id") and str(attrs["store_id"]) != run["store_id"]:
        return "was made again from another store"
    random_cnn = cfg.model.backbone != "hoghof" and not cfg.model.pretrained and not cfg.model.weights_path
    if random_cnn and int(attrs.get("seed", -1)) != cfg.train.seed:
        return f"was made again by a backbone drawn with seed {attrs.get('seed')} (the run's is {cfg.train.seed})"
    return None


def features_attrs(path: Path) -> dict[str, Any] | None:
    """A features file's attrs as plain values, with "videos": the set of its video ids; None when
    there is no readable file."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: v.item() if isinstance(v, np.generic) else v for k, v in f.attrs.items()}
            attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
            attrs["videos"] = set(f["videos"])
            return attrs
    except (OSError, KeyError):
        return None


def labels_agree(path: Path, labels: dict[str, int]) -> bool:
    """Whether the features file holds every video of `labels` with that label: stage 1 trains on
    the file's labels, so a store relabelled since (or too old to record its identity) must not
    keep stale ones."""
    try:
        with h5py.File(path, "r") as f:
            videos = f["videos"]
            return all(v in videos and _same_label(v, videos[v], labels) for v in labels)
    except (OSError, KeyError):
        return False


def encoder_version(backbone: str) -> int:
    """The version of a hand-crafted encoder's descriptors (hoghof), recorded with its features; 0 for CNNs."""
    return HOGHOF_VERSION if backbone == "hoghof" else 0


def store_flow_signature(store_root: dict) -> str:
    """The store's sampling and flow settings as recorded in a features file (JSON)."""
    return json.dumps({k: store_root[k] for k in _STORE_FLOW_KEYS if k in store_root}, sort_keys=True, default=str)


def _read_store(path: Path, stream: str, video_ids: Sequence[str] | None) -> tuple[list[str], dict[str, int], dict]:
    """Video ids, their labels and the store's root attrs; user mistakes as one-line errors."""
    if stream not in ("rgb", "flow"):
        raise ValueError(f"unknown stream {stream!r}; expected 'rgb' or 'flow'")
    require_store(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a store; make a store with `twostream extract`")
    store = Store(path)
    try:
        try:
            all_ids = store.video_ids
        except (CorruptStoreError, FeatureCacheError):
            raise  # already one line saying what the file is
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} is not a twostream store; make one with `twostream extract`") from exc
        if not all_ids:
            raise ValueError(f"{path} holds no videos; make a store with `twostream extract`")
        ids = list(all_ids) if video_ids is None else [str(v) for v in video_ids]
        missing = [v for v in ids if v not in store]
        if missing:
            raise ValueError(f"{len(missing)} video(s) not in {path}, e.g. {missing[0]!r}")
        if not ids:
            raise ValueError("no videos to cache")
        try:
            (store.rgb if stream == "rgb" else store.flow)(ids[0], [0])
        except (KeyError, OSError) as exc:
            raise ValueError(f"{path} has no {stream} data (video {ids[0]!r}); extract it with `twostream extract`") from exc
        labels = {v: store.label(v) for v in ids}
        root = store.root_attrs
    finally:
        store.close()  # DataLoader workers forked later must not inherit an open file
    return ids, labels, root


def _same_settings(attrs: Any, settings: dict) -> bool:
    def plain(v: Any) -> Any:
        return v.item() if isinstance(v, np.generic) else v.decode() if isinstance(v, bytes) else v

    return all(k in attrs and plain(attrs[k]) == v for k, v in settings.items())


def _finished(path: Path, settings: dict, labels: dict[str, int]) -> set[str]:
    """Videos of a finished features file made with `settings` (empty when absent or different),
    less those labelled otherwise than `labels` says: training takes its labels from this file."""
    if not path.exists():
        return set()
    try:
        with h5py.File(path, "r") as f:
            if not _same_settings(f.attrs, settings):
                return set()
            return {v for v, group in f["videos"].items() if _same_label(v, group, labels)}
    except (OSError, KeyError):
        return set()


def _same_label(video_id: str, group: h5py.Group, labels: dict[str, int]) -> bool:
    """Whether a cached video carries the label `labels` gives it (a video `labels` lacks is not asked about)."""
    return video_id not in labels or ("label" in group.attrs and int(group.attrs["label"]) == labels[video_id])


def _resume(partial: Path, settings: dict, labels: dict[str, int]) -> set[str]:
    """Whole videos of an interrupted run with the same settings and labels; a broken partial file is dropped."""
    if not partial.exists():
        return set()
    try:
        with h5py.File(partial, "r") as f:
            if not _same_settings(f.attrs, settings):
                log.info("%s was made with other settings; starting over", partial)
                return set()
            done = set()
            for video_id, group in f["videos"].items():
                if ("features" in group and "index" in group and group["features"].shape[0] == group.attrs.get("views")
                        and _same_label(video_id, group, labels)):
                    done.add(video_id)
            return done
    except (OSError, KeyError, ValueError) as exc:
        log.warning("%s is unreadable (%s); starting over", partial, exc)
        partial.unlink()
        return set()


def _append_video(partial: Path, video_id: str, label: int, views: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write one video's views; the file is closed again so a kill between videos leaves it whole."""
    order = sorted(views)
    feats = np.stack([views[v][0] for v in order])  # (V, T, D) float16
    index = np.stack([views[v][1] for v in order]).astype(np.int64)  # (V, T)
    with h5py.File(partial, "a") as f:
        videos = f["videos"]
        if video_id in videos:  # a half-written group from a killed run
            del videos[video_id]
        group = videos.create_group(video_id)
        group.create_dataset("features", data=feats, chunks=(1, *feats.shape[1:]))
        group.create_dataset("index", data=index)
        # Written last: a group with its views attr is a finished video.
        group.attrs["label"] = int(label)
        group.attrs["views"] = len(order)


def _finish(partial: Path, out: Path) -> None:
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, out)


class _ViewItems(Dataset):
    """(video, view) pairs, video-major, each a `ClipDataset` item plus its view number."""

    def __init__(self, store_path: Path, video_ids: list[str], n_views: dict[str, int], stream: str,
                 cfg: ClipConfig, augment: AugmentConfig, seed: int) -> None:
        store = Store(store_path)  # one lazily opened reader shared by every view
        most = max((n_views[v] for v in video_ids), default=1)
        self.views = [ClipDataset(store, video_ids, stream, cfg, augment, seed=seed, view=k) for k in range(most)]
        self.pairs = [(i, k) for i, v in enumerate(video_ids) for k in range(n_views[v])]

    def __len__(self) -> int:
        return len(self.pairs)

    def close(self) -> None:
        self.views[0].store.close()

    def __getitem__(self, i: int) -> dict[str, Any]:
        video, view = self.pairs[i]
        return {**self.views[view][video], "view": torch.tensor(view, dtype=torch.int64)}


class FeatureDataset(Dataset):
    """Cached features of some videos, one item per video.

    `__getitem__(i)` returns exactly {"video_id": str, "label": float32 tensor (),
    "features": float32 tensor (T, D), "view": int64 tensor ()}. With `train`, each epoch picks a
    random cached view per video, fixed by (seed, epoch, video id); call `set_epoch` every epoch.
    Without it, view 0 (the plain uniform clip). `video_ids` None means every cached video.
    `labels` and `views` (per video) are read up front; features open lazily in each process.
    """

    def __init__(self, path: str | Path, video_ids: Sequence[str] | None = None, train: bool = False,
                 seed: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"features file {self.path} does not exist; make it with `twostream features`")
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        try:
            with h5py.File(self.path, "r") as f:
                self.attrs = {k: v.item() if isinstance(v, np.generic) else v for k, v in f.attrs.items()}
                videos = f["videos"]
                self.video_ids = list(videos) if video_ids is None else [str(v) for v in video_ids]
                missing = [v for v in self.video_ids if v not in videos]
                if missing:
                    raise ValueError(f"{len(missing)} video(s) have no cached features in {self.path}, e.g. "
                                     f"{missing[0]!r}; rerun `twostream features`")
                self.views = np.array([int(videos[v].attrs["views"]) for v in self.video_ids], np.int64)
                self.labels = np.array([int(videos[v].attrs["label"]) for v in self.video_ids], np.int64)
                first = videos[self.video_ids[0]]["features"].shape if self.video_ids else (0, 0, 0)
        except OSError as exc:
            raise ValueError(f"{self.path} is not a features file; make it with `twostream features`") from exc
        self.steps, self.feature_dim = int(first[1]), int(first[2])
        self._file: h5py.File | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}  # h5py handles never cross a process boundary

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.video_ids)

    def view_of(self, i: int) -> int:
        """The view item i returns this epoch."""
        if not self.train:
            return 0
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(self.video_ids[i].encode())])
        return int(rng.integers(self.views[i]))

    def _videos(self) -> h5py.Group:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")  # a forked worker's inherited handle is not reused
            self._pid = os.getpid()
        return self._file["videos"]

    def __getitem__(self, i: int) -> dict[str, Any]:
        view = self.view_of(i)
        feats = self._videos()[self.video_ids[i]]["features"][view]  # (T, D) float16
        return {
            "video_id": self.video_ids[i],
            "label": torch.tensor(float(self.labels[i]), dtype=torch.float32),
            "features": torch.from_numpy(feats.astype(np.float32)),
            "view": torch.tensor(view, dtype=torch.int64),
        }
