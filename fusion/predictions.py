"""Per-video predictions: the CSV every stream writes for validation and test, read back sorted.

File format (one row per video, or per view when test-time augmentation writes several)::

    video_id,label,logit,probability[,view]

`label` is 1 = violent, 0 = non-violent; `logit` is the violent-class logit and `probability`
its sigmoid, written for people who open the file (the reader trusts the logit). Rows that share a
`video_id` are views of one video and are merged by `average_views`. Optional penultimate
embeddings live next to the CSV as `embeddings_<split>.npy`, one row per CSV data row, in file
order (so the CSV is the index of the array).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit, logit

from data.h5files import write_file_atomic

logger = logging.getLogger(__name__)

COLUMNS = ("video_id", "label", "logit", "probability")
# Probabilities read without a logit are clipped here before the inverse sigmoid (|logit| <= ~27.6).
_PROB_EPS = 1e-12


@dataclass(frozen=True)
class Predictions:
    """Per-video labels and violent-class logits of one model on one split, sorted by video_id.

    Shape: video_ids, labels, logits (N,); embeddings (N, D) or None.
    """

    video_ids: np.ndarray  # (N,) str, unique; sorted ascending on construction
    labels: np.ndarray  # (N,) int64, 1 = violent, 0 = non-violent
    logits: np.ndarray  # (N,) float64 violent-class logits
    embeddings: np.ndarray | None = None  # (N, D) float32 penultimate features, or None

    def __post_init__(self) -> None:
        ids = np.asarray(self.video_ids, dtype=str).reshape(-1)
        labels = np.asarray(self.labels).reshape(-1)
        logits = np.asarray(self.logits, dtype=np.float64).reshape(-1)
        if not (len(ids) == len(labels) == len(logits)):
            raise ValueError(
                f"predictions need one label and one logit per video; got {len(ids)} ids, "
                f"{len(labels)} labels, {len(logits)} logits"
            )
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be 1 (violent) or 0 (non-violent)")
        if not np.isfinite(logits).all():
            raise ValueError("logits must be finite numbers")
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        if len(ids) > 1 and (dup := ids[1:][ids[1:] == ids[:-1]]).size:
            raise ValueError(f"video_id {dup[0]!r} appears more than once")
        emb = self.embeddings
        if emb is not None:
            emb = np.asarray(emb)
            if emb.ndim != 2 or emb.shape[0] != len(ids):
                raise ValueError(f"embeddings must be (N, D) with N = {len(ids)}; got {emb.shape}")
            emb = emb[order]
        object.__setattr__(self, "video_ids", ids)
        object.__setattr__(self, "labels", labels.astype(np.int64)[order])
        object.__setattr__(self, "logits", logits[order])
        object.__setattr__(self, "embeddings", emb)

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def probabilities(self) -> np.ndarray:
        """Violent-class probabilities, sigmoid(logits), (N,) float64."""
        return expit(self.logits)

    def take(self, index: np.ndarray) -> Predictions:
        """The rows at `index` (integer or boolean), still sorted."""
        emb = None if self.embeddings is None else self.embeddings[index]
        return Predictions(self.video_ids[index], self.labels[index], self.logits[index], emb)


def read_json(path: str | Path, what: str):
    """The JSON document at `path`; a missing file or bad JSON is a one-line error naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write a file so that readers see the old content or the new, never half of it."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return write_file_atomic(path, lambda fh: fh.write(payload))


def write_predictions(
    path: str | Path,
    video_ids: Sequence[str] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    logits: Sequence[float] | np.ndarray,
    views: Sequence[int] | np.ndarray | None = None,
) -> Path:
    """Write the predictions CSV atomically, rows in the given order; `views` adds a view column."""
    ids = [str(v) for v in np.asarray(video_ids, dtype=str).reshape(-1)]
    lab = np.asarray(labels).reshape(-1)
    lg = np.asarray(logits, dtype=np.float64).reshape(-1)
    if not (len(ids) == len(lab) == len(lg)):
        raise ValueError(f"got {len(ids)} video ids, {len(lab)} labels and {len(lg)} logits")
    if lab.size and not np.isin(lab, (0, 1)).all():
        raise ValueError("labels must be 1 (violent) or 0 (non-violent)")
    if not np.isfinite(lg).all():
        raise ValueError("logits must be finite numbers")
    columns = list(COLUMNS)
    if views is not None:
        view = np.asarray(views).reshape(-1)
        if len(view) != len(ids):
            raise ValueError(f"got {len(view)} views for {len(ids)} rows")
        columns.append("view")
    prob = expit(lg)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for i in range(len(ids)):
        # repr() round-trips a float64 exactly, so reading back gives the same logits.
        row = [ids[i], int(lab[i]), repr(float(lg[i])), repr(float(prob[i]))]
        if views is not None:
            row.append(int(view[i]))
        writer.writerow(row)
    return write_atomic(path, buf.getvalue())


def write_embeddings(path: str | Path, embeddings: np.ndarray) -> Path:
    """Write `embeddings_<split>.npy` atomically; rows follow the predictions CSV's rows.

    Shape: embeddings (R, D) with R = the CSV's data rows.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be (rows, dim); got shape {emb.shape}")
    buf = io.BytesIO()
    np.save(buf, emb, allow_pickle=False)
    return write_atomic(path, buf.getvalue())


def average_views(
    video_ids: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray,
    embeddings: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Merge the rows of each video into one: the mean logit (and mean embedding) of its views.

    Logits are averaged rather than probabilities so that one over-confident view cannot pin the
    video at 0 or 1; the video's probability is then sigmoid(mean logit).

    Shape: inputs (R,) [and (R, D)] -> outputs (V,) [and (V, D)], V = distinct video ids, sorted.
    """
    ids, inverse, counts = np.unique(
        np.asarray(video_ids, dtype=str), return_inverse=True, return_counts=True
    )
    labels = np.asarray(labels).reshape(-1)
    mean_logits = (
        np.bincount(inverse, weights=np.asarray(logits, np.float64), minlength=len(ids)) / counts
    )
    video_labels = np.zeros(len(ids), np.int64)
    video_labels[inverse] = labels
    if (bad := video_labels[inverse] != labels).any():
        raise ValueError(f"views of video {ids[inverse[np.argmax(bad)]]!r} carry different labels")
    mean_emb = None
    if embeddings is not None:
        emb = np.asarray(embeddings, np.float64)
        mean_emb = np.zeros((len(ids), emb.shape[1]), np.float64)
        np.add.at(mean_emb, inverse, emb)
        mean_emb = (mean_emb / counts[:, None]).astype(np.asarray(embeddings).dtype)
    return ids, video_labels, mean_logits, mean_emb


def read_predictions(path: str | Path, embeddings_path: str | Path | None = None) -> Predictions:
    """Read a predictions CSV (and optionally its embeddings), merging views, sorted by video_id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        missing = [c for c in ("video_id", "label") if c not in fields]
        if missing or not ({"logit", "probability"} & set(fields)):
            raise ValueError(
                f"{path}: expected columns video_id,label,logit[,probability][,view]; got {','.join(fields)}"
            )
        ids, labels, values = [], [], []
        use_logit = "logit" in fields
        for line, row in enumerate(reader, start=2):
            try:
                labels.append(int(row["label"]))
                values.append(float(row["logit" if use_logit else "probability"]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{line}: label must be 0/1 and logit a number") from None
            ids.append(row["video_id"])
    ids_arr = np.asarray(ids, dtype=str)
    values_arr = np.asarray(values, np.float64)
    if use_logit:
        logits = values_arr
    else:
        # Files from other tools may carry probabilities only; the logit is recovered from them.
        if ((values_arr < 0) | (values_arr > 1)).any():
            raise ValueError(f"{path}: probabilities must lie in [0, 1]")
        logits = logit(np.clip(values_arr, _PROB_EPS, 1 - _PROB_EPS))
    emb = None
    if embeddings_path is not None:
        embeddings_path = Path(embeddings_path)
        if not embeddings_path.is_file():
            raise FileNotFoundError(f"embeddings file not found: {embeddings_path}")
        emb = np.load(embeddings_path, allow_pickle=False)
        if emb.ndim != 2 or emb.shape[0] != len(ids_arr):
            raise ValueError(
                f"{embeddings_path}: expected {len(ids_arr)} rows (one per line of {path.name}); got shape {emb.shape}"
            )
    labels_arr = np.asarray(labels, np.int64)
    try:
        if "view" in fields:
            ids_arr, labels_arr, logits, emb = average_views(ids_arr, labels_arr, logits, emb)
        return Predictions(ids_arr, labels_arr, logits, emb)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def split_paths(stream_dir: str | Path, split: str) -> tuple[Path, Path]:
    """The predictions CSV and embeddings file of one split in a stream's run directory."""
    stream_dir = Path(stream_dir)
    return stream_dir / f"predictions_{split}.csv", stream_dir / f"embeddings_{split}.npy"


def load_split(stream_dir: str | Path, split: str, embeddings: bool = False) -> Predictions:
    """Read `RUN/<stream>/predictions_<split>.csv`, with its embeddings when asked."""
    csv_path, npy_path = split_paths(stream_dir, split)
    return read_predictions(csv_path, npy_path if embeddings else None)


def align(a: Predictions, b: Predictions) -> tuple[Predictions, Predictions]:
    """Keep the videos both hold, in the same order; labels must agree."""
    out = align_all({"a": a, "b": b})
    return out["a"], out["b"]


def align_all(inputs: Mapping[str, Predictions]) -> dict[str, Predictions]:
    """Keep the videos every input holds, in one shared order; labels must agree."""
    if not inputs:
        raise ValueError("no predictions to align")
    names = list(inputs)
    common = inputs[names[0]].video_ids
    for name in names[1:]:
        common = np.intersect1d(common, inputs[name].video_ids)
    if len(common) == 0:
        raise ValueError(f"no video_id is shared by all of {', '.join(names)}")
    out = {}
    for name in names:
        pred = inputs[name]
        if len(pred) != len(common):
            logger.warning(
                "%s: %d of %d videos have no match in the others; dropped",
                name,
                len(pred) - len(common),
                len(pred),
            )
        out[name] = pred.take(np.isin(pred.video_ids, common))
    ref = out[names[0]].labels
    for name in names[1:]:
        if (bad := out[name].labels != ref).any():
            vid = common[np.argmax(bad)]
            raise ValueError(
                f"labels disagree between {names[0]} and {name} on {int(bad.sum())} videos (e.g. {vid!r})"
            )
    return out
