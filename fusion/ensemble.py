"""Ensembles of trained runs: simplex weights fitted on validation, and the TOML member list.

The ensemble's violent logit is a convex combination of its members' logits (method "logit") or
the logit of a convex combination of their probabilities (method "probability"). The weights
minimise the class-balanced validation log-loss under w >= 0, sum(w) = 1 (SLSQP), which lets a
useless member reach exactly zero weight.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit
from sklearn.utils.class_weight import compute_sample_weight

from fusion.predictions import Predictions, align_all, load_split, read_json, write_atomic
from fusion.threshold import GOALS, choose_threshold

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 has no tomllib; tomli is the same parser
    import tomli as tomllib

logger = logging.getLogger(__name__)

FORMAT = "twostream-ensemble"
VERSION = 1
METHODS = ("logit", "probability")
_PROB_EPS = 1e-12
_ZERO_WEIGHT = 1e-6  # fitted weights below this are set to exactly 0
_MEMBER_KEYS = {"name", "backbone", "head", "run", "stream", "weight"}
_REQUIRED_KEYS = ("name", "backbone", "head", "run")


@dataclass(frozen=True)
class EnsembleWeights:
    """Fitted ensemble weights on the simplex, with the validation operating threshold."""

    members: tuple[str, ...]  # member names, the order of `weights`
    weights: tuple[float, ...]  # >= 0, summing to 1
    method: str  # "logit" or "probability": what the weights average
    threshold: float  # operating threshold on the ensemble probability, chosen on validation
    goal: str  # the threshold goal
    min_recall: float | None = None  # recall floor for goal "recall"
    log_loss: float | None = None  # class-balanced validation log-loss at these weights
    n_val: int = 0  # validation videos the weights were fitted on

    def to_dict(self) -> dict:
        """Plain JSON-ready dict, with format and version keys."""
        d = asdict(self)
        d["members"], d["weights"] = list(self.members), list(self.weights)
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: Mapping) -> EnsembleWeights:
        """Rebuild from `to_dict` output."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT or d.get("version") != VERSION:
            fmt = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not a version-{VERSION} ensemble file (format {fmt!r})")
        body = {k: v for k, v in d.items() if k not in ("format", "version")}
        for key in ("members", "weights"):
            if isinstance(body.get(key), list):
                body[key] = tuple(body[key])
        try:
            out = cls(**body)
        except TypeError as exc:
            raise ValueError(f"malformed ensemble weights: {exc}") from None
        if len(out.members) != len(out.weights):
            raise ValueError("malformed ensemble weights: members and weights differ in length")
        return out


def save_ensemble(weights: EnsembleWeights, path: str | Path) -> Path:
    """Write the weights as JSON, atomically."""
    return write_atomic(path, json.dumps(weights.to_dict(), indent=2) + "\n")


def load_ensemble(path: str | Path) -> EnsembleWeights:
    """Read weights written by `save_ensemble`."""
    return EnsembleWeights.from_dict(read_json(path, "ensemble weights"))


def combine_logits(weights: EnsembleWeights, logits: Mapping[str, np.ndarray]) -> np.ndarray:
    """The ensemble's violent logits from member logits already in one video order.

    Members with zero weight may be absent. Shape: logits[member] (N,) -> (N,).
    """
    used = [(m, w) for m, w in zip(weights.members, weights.weights, strict=True) if w > 0]
    missing = [m for m, _ in used if m not in logits]
    if missing:
        raise ValueError(f"the ensemble needs member(s) {', '.join(missing)}")
    stack = np.stack([np.asarray(logits[m], np.float64) for m, _ in used], axis=1)  # (N, M)
    w = np.asarray([w for _, w in used])
    return _mix(stack, w / w.sum(), weights.method)


def combine(weights: EnsembleWeights, inputs: Mapping[str, Predictions]) -> Predictions:
    """Ensemble predictions over the videos every weighted member holds (sorted by video_id)."""
    used = [m for m, w in zip(weights.members, weights.weights, strict=True) if w > 0]
    missing = [m for m in used if m not in inputs]
    if missing:
        raise ValueError(
            f"the ensemble needs member(s) {', '.join(missing)}; got {', '.join(inputs) or 'none'}"
        )
    aligned = align_all({m: inputs[m] for m in used})
    ref = aligned[used[0]]
    return Predictions(
        ref.video_ids,
        ref.labels,
        combine_logits(weights, {m: p.logits for m, p in aligned.items()}),
    )


def _mix(stack: np.ndarray, w: np.ndarray, method: str) -> np.ndarray:
    """Combine (N, M) member logits with weights (M,) into (N,) logits."""
    if method == "logit":
        return stack @ w
    prob = expit(stack) @ w
    return logit(np.clip(prob, _PROB_EPS, 1 - _PROB_EPS))


def _loss_and_grad(w: np.ndarray, stack: np.ndarray, y: np.ndarray, sw: np.ndarray, method: str):
    """Weighted log-loss of the mixture and its gradient with respect to w."""
    if method == "logit":
        z = stack @ w  # (N,)
        # log(1 + e^-z) for y = 1 and log(1 + e^z) for y = 0, computed without overflow.
        loss = np.logaddexp(0.0, np.where(y == 1, -z, z))
        grad = stack.T @ (sw * (expit(z) - y))
    else:
        probs = expit(stack)  # (N, M)
        p = np.clip(probs @ w, _PROB_EPS, 1 - _PROB_EPS)
        loss = -(y * np.log(p) + (1 - y) * np.log1p(-p))
        grad = probs.T @ (sw * ((1 - y) / (1 - p) - y / p))
    return float(sw @ loss), grad


def fit_ensemble(
    val: Mapping[str, Predictions],
    method: str = "logit",
    goal: str = "accuracy",
    min_recall: float | None = None,
    init: Mapping[str, float] | None = None,
) -> EnsembleWeights:
    """Simplex weights over the members minimising class-balanced validation log-loss.

    Args:
        val: member name -> its validation predictions.
        init: starting weights by member (e.g. the config's hand-set ones); uniform if None.
    """
    if method not in METHODS:
        raise ValueError(f"unknown ensemble method {method!r}; choose one of {', '.join(METHODS)}")
    if goal not in GOALS:
        raise ValueError(f"unknown threshold goal {goal!r}; choose one of {', '.join(GOALS)}")
    if not val:
        raise ValueError("an ensemble needs validation predictions of at least one member")
    for name, p in val.items():
        if len(p) == 0:
            raise ValueError(f"validation predictions of member {name!r} are empty")
    aligned = align_all(val)
    members = tuple(aligned)
    y = aligned[members[0]].labels.astype(np.float64)
    if y.min() == y.max():
        raise ValueError("validation set holds only one class; ensemble weights need both")
    stack = np.stack([aligned[m].logits for m in members], axis=1)  # (N, M)
    sw = compute_sample_weight("balanced", y)
    sw = sw / sw.sum()
    if init is None:
        w0 = np.full(len(members), 1.0 / len(members))
    else:
        w0 = np.asarray([max(float(init.get(m, 0.0)), 0.0) for m in members])
        if w0.sum() <= 0:
            raise ValueError("initial ensemble weights must include a positive weight for a member")
        w0 = w0 / w0.sum()
    if len(members) == 1:
        w = w0
    else:
        res = minimize(
            _loss_and_grad,
            w0,
            args=(stack, y, sw, method),
            jac=True,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * len(members),
            constraints=[
                {"type": "eq", "fun": lambda v: v.sum() - 1.0, "jac": lambda v: np.ones_like(v)}
            ],
            options={"maxiter": 500, "ftol": 1e-10},
        )
        if not res.success:
            logger.warning("ensemble weight optimisation stopped early: %s", res.message)
        # Solver round-off leaves ~1e-16 on dropped members; zero them so combining needs no
        # predictions from a member that contributes nothing.
        w = np.where(res.x < _ZERO_WEIGHT, 0.0, res.x)
        w = w / w.sum()
    fused = _mix(stack, w, method)
    loss, _ = _loss_and_grad(w, stack, y, sw, method)
    threshold = choose_threshold(y.astype(np.int64), expit(fused), goal, min_recall)
    logger.info(
        "ensemble weights: %s", ", ".join(f"{m}={v:.3f}" for m, v in zip(members, w, strict=True))
    )
    return EnsembleWeights(
        members=members,
        weights=tuple(float(v) for v in w),
        method=method,
        threshold=threshold,
        goal=goal,
        min_recall=min_recall,
        log_loss=loss,
        n_val=len(y),
    )


def load_ensemble_config(path: str | Path) -> list[dict]:
    """The `[[member]]` tables of an ensemble TOML file, checked and with defaults filled in.

    Each member has `name`; `backbone` and `head` (the stream model's names, e.g. "vgg19",
    "bilstm_attention"); `run`, the run directory (a relative path is taken from the TOML file's
    folder); `stream` (default "rgb"), the run subfolder holding its predictions; and `weight`,
    a hand-set starting weight or None.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ensemble config not found: {path}")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML ({exc})") from None
    if extra := set(doc) - {"member"}:
        raise ValueError(
            f"{path}: unknown top-level key(s) {', '.join(sorted(extra))}; expected [[member]] tables"
        )
    raw = doc.get("member")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: no [[member]] tables")
    members, seen = [], set()
    for i, m in enumerate(raw, start=1):
        where = f"{path}: member {i}"
        if unknown := set(m) - _MEMBER_KEYS:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        if missing := [k for k in _REQUIRED_KEYS if k not in m]:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        for key in ("name", "backbone", "head", "run", "stream"):
            if key in m and not (isinstance(m[key], str) and m[key]):
                raise ValueError(f"{where}: {key} must be a non-empty string")
        if m["name"] in seen:
            raise ValueError(f"{where}: duplicate name {m['name']!r}")
        seen.add(m["name"])
        weight = m.get("weight")
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0
        ):
            raise ValueError(f"{where}: weight must be a number >= 0")
        run = Path(m["run"])
        members.append(
            {
                "name": m["name"],
                "backbone": m["backbone"],
                "head": m["head"],
                "run": str(run if run.is_absolute() else path.parent / run),
                "stream": m.get("stream", "rgb"),
                "weight": None if weight is None else float(weight),
            }
        )
    return members


def load_member_predictions(members: Sequence[Mapping], split: str) -> dict[str, Predictions]:
    """Read each member's `<run>/<stream>/predictions_<split>.csv`, keyed by member name."""
    return {m["name"]: load_split(Path(m["run"]) / m["stream"], split) for m in members}
