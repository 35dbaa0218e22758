"""Learned late fusion: a class-balanced, regularised logistic layer over the streams' logits.

The layer is fitted on validation predictions only. Its regularisation pulls it towards the
streams' standardised logits averaged with equal weights, the combination that is hard to beat
when there are few videos to learn weights from (the "forecast combination puzzle", Clemen 1989;
the sum rule of Kittler et al. 1998): a strong penalty gives that average, a weak one free weights
(`_fit_lr`). Plain L2 would pull towards no signal at all. The strength is chosen by stratified
cross-validation on the validation set when the smaller class is big enough, and the learned
fusion is then judged on its out-of-fold logits: in-sample logits would flatter it, since it was
fitted on those very videos while the streams never trained on them. A smaller validation set
(fewer than `cv_min_per_class` videos of the rarer class, about ten per weight) fits no weights:
the equal-weight average and each stream alone compete (`_fixed_fusion`). When the fusion scores
below the best single stream, the model falls back to that stream and says why.

Candidates are compared by accuracy at each one's own threshold (ties: the lower calibrated
log-loss, then ROC-AUC); `select_metric` takes macro-F1, violent F1 or ROC-AUC instead.

Baselines computed alongside: each stream alone, the plain average of probabilities, and TSN's
fixed weighted average of logits (RGB:flow = 1:1.5, Wang et al. 2016).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import expit, logit
from sklearn.metrics import log_loss
from sklearn.model_selection import (
    BaseCrossValidator,
    LeaveOneGroupOut,
    LeaveOneOut,
    StratifiedGroupKFold,
    StratifiedKFold,
)
from sklearn.utils.class_weight import compute_sample_weight

from fusion.metrics import compute_metrics
from fusion.predictions import Predictions, align_all, read_json, write_atomic
from fusion.threshold import GOALS, choose_threshold

logger = logging.getLogger(__name__)

FORMAT = "twostream-fusion"
VERSION = 1
RESERVED = ("average", "tsn", "learned", "equal", "fused")  # candidate names a stream may not take
SELECT_METRICS = ("accuracy", "macro_f1", "f1", "roc_auc")
_PROB_EPS = 1e-12
_S_PENALTY = 1e-3  # keeps the prior's scale finite when it separates the classes perfectly


@dataclass(frozen=True)
class FusionConfig:
    """How late fusion is fitted on validation predictions."""

    goal: str = "accuracy"  # operating-point goal: "accuracy", "f1" (violent) or "recall"
    min_recall: float | None = None  # violent-recall floor when goal == "recall", e.g. 0.95
    select_metric: str = "accuracy"  # fusion vs single stream, at each one's own threshold
    use_embeddings: bool = False  # add the streams' penultimate embeddings as features
    cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # inverse L2 strengths tried by CV
    default_c: float = 1.0  # inverse L2 strength when validation is too small for CV
    cv_folds: int = 5  # stratified folds over the validation videos (whole recordings when groups are known)
    cv_min_per_class: int = 20  # CV only when the smaller class has at least this many videos
    tsn_weights: tuple[tuple[str, float], ...] = (("rgb", 1.0), ("flow", 1.5))  # TSN baseline
    seed: int = 0  # fold shuffling

    def __post_init__(self) -> None:
        if self.goal not in GOALS:
            raise ValueError(
                f"unknown threshold goal {self.goal!r}; choose one of {', '.join(GOALS)}"
            )
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(
                f"unknown select_metric {self.select_metric!r}; choose one of {', '.join(SELECT_METRICS)}"
            )
        if self.goal == "recall" and not (
            self.min_recall is not None and 0.0 < self.min_recall <= 1.0
        ):
            raise ValueError("goal 'recall' needs min_recall in (0, 1], e.g. 0.95")
        if self.goal != "recall" and self.min_recall is not None:
            raise ValueError(f"min_recall applies to goal 'recall' only, not {self.goal!r}")
        if self.default_c <= 0 or not self.cs or min(self.cs) <= 0:
            raise ValueError("inverse L2 strengths (cs, default_c) must be positive")
        if self.cv_folds < 2:
            raise ValueError("cv_folds must be at least 2")


@dataclass(frozen=True)
class FusionModel:
    """Fitted late fusion: logit = features @ weights + bias; violent iff sigmoid >= threshold."""

    streams: tuple[str, ...]  # every stream offered at fit time
    features: tuple[str, ...]  # "<stream>:logit" or "<stream>:emb<j>", the order of `weights`
    weights: tuple[float, ...]  # per feature, in raw (unstandardised) units
    bias: float  # added to the weighted sum
    threshold: float  # operating threshold on the fused probability, chosen on validation
    goal: str  # the threshold goal
    min_recall: float | None  # recall floor for goal "recall"
    method: str  # "learned"; "equal" (equal weights, small validation); "single" after a fallback ("tsn": older files)
    selected: str | None = None  # the stream used alone when method == "single"
    fallback_reason: str | None = None  # why no learned fusion is used
    c: float = 1.0  # inverse L2 strength of the logistic layer
    cv_folds: int = 0  # folds that chose `c` and scored the learned fusion; 0 = none (too small)
    cv_by: str = "video"  # what those folds (and the small-set comparison) hold out: "video" or "recording"
    n_val: int = 0  # validation videos it was fitted on
    validation: dict = field(default_factory=dict)  # candidate -> validation metrics
    trained: dict = field(default_factory=dict)  # stream -> fingerprint of the trained stream it was fitted on ({}: unknown)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict, with format and version keys."""
        d = asdict(self)
        for key in ("streams", "features", "weights"):
            d[key] = list(d[key])
        return {"format": FORMAT, "version": VERSION, **d}

    @classmethod
    def from_dict(cls, d: Mapping) -> FusionModel:
        """Rebuild from `to_dict` output."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            fmt = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not a fusion model (format {fmt!r}, expected {FORMAT!r})")
        if d.get("version") != VERSION:
            raise ValueError(f"unsupported fusion model version {d.get('version')!r}")
        body = {k: v for k, v in d.items() if k not in ("format", "version")}
        for key in ("streams", "features", "weights"):
            if isinstance(body.get(key), list):
                body[key] = tuple(body[key])
        try:
            model = cls(**body)
        except TypeError as exc:
            raise ValueError(f"malformed fusion model: {exc}") from None
        if len(model.features) != len(model.weights):
            raise ValueError("malformed fusion model: features and weights differ in length")
        return model


def save_fusion(model: FusionModel, path: str | Path) -> Path:
    """Write the model as JSON, atomically."""
    return write_atomic(path, json.dumps(model.to_dict(), indent=2) + "\n")


def load_fusion(path: str | Path) -> FusionModel:
    """Read a model written by `save_fusion`."""
    return FusionModel.from_dict(read_json(path, "fusion model"))


def _feature_names(streams: tuple[str, ...], dims: Mapping[str, int]) -> tuple[str, ...]:
    names = []
    for s in streams:
        names.append(f"{s}:logit")
        names.extend(f"{s}:emb{j}" for j in range(dims.get(s, 0)))
    return tuple(names)


def _design(
    features: tuple[str, ...],
    logits: Mapping[str, np.ndarray],
    embeddings: Mapping[str, np.ndarray],
) -> np.ndarray:
    """Stack the named features into a (N, F) float64 matrix."""
    cols = []
    for name in features:
        stream, _, part = name.rpartition(":")
        if part == "logit":
            cols.append(np.asarray(logits[stream], np.float64).reshape(-1))
        else:
            cols.append(np.asarray(embeddings[stream], np.float64)[:, int(part[3:])])
    return np.stack(cols, axis=1)


def _needed_streams(model: FusionModel) -> list[str]:
    return list(dict.fromkeys(name.rpartition(":")[0] for name in model.features))


def fuse_logits(
    model: FusionModel,
    logits: Mapping[str, np.ndarray],
    embeddings: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Fused violent logits from per-stream arrays already in one video order.

    Shape: logits[stream] (N,), embeddings[stream] (N, D) -> (N,).
    """
    embeddings = embeddings or {}
    for stream in _needed_streams(model):
        if stream not in logits:
            raise ValueError(
                f"the fusion model needs stream {stream!r}; got {', '.join(logits) or 'none'}"
            )
        dim = sum(f.startswith(f"{stream}:emb") for f in model.features)
        if dim and stream not in embeddings:
            raise ValueError(f"the fusion model needs embeddings of stream {stream!r}")
        if dim and np.shape(embeddings[stream])[-1] != dim:
            raise ValueError(
                f"the fusion model expects {dim}-d embeddings for stream {stream!r}; "
                f"got shape {np.shape(embeddings[stream])}"
            )
    x = _design(model.features, logits, embeddings)  # (N, F)
    return x @ np.asarray(model.weights, np.float64) + model.bias


def fuse(model: FusionModel, inputs: Mapping[str, Predictions]) -> Predictions:
    """Fused predictions over the videos every needed stream holds (sorted by video_id)."""
    needed = _needed_streams(model)
    missing = [s for s in needed if s not in inputs]
    if missing:
        raise ValueError(
            f"the fusion model needs stream(s) {', '.join(missing)}; got {', '.join(inputs) or 'none'}"
        )
    aligned = align_all({s: inputs[s] for s in needed})
    emb = {s: p.embeddings for s, p in aligned.items() if p.embeddings is not None}
    fused = fuse_logits(model, {s: p.logits for s, p in aligned.items()}, emb)
    ref = aligned[needed[0]]
    return Predictions(ref.video_ids, ref.labels, fused)


def apply(model: FusionModel, inputs: Mapping[str, Predictions]) -> np.ndarray:
    """Fused violent logits, (N,), in the sorted video_id order of the videos all streams hold."""
    return fuse(model, inputs).logits


def baselines(
    inputs: Mapping[str, Predictions], tsn_weights: Mapping[str, float] | None = None
) -> dict[str, Predictions]:
    """Each stream alone, `average` of probabilities, and `tsn` weighted logits when its streams exist.

    TSN's weighted average is normalised by the weight sum, so it stays on the logit scale.
    """
    tsn_weights = dict(FusionConfig.tsn_weights if tsn_weights is None else tsn_weights)
    aligned = align_all(inputs)
    ref = next(iter(aligned.values()))
    out = {name: Predictions(ref.video_ids, ref.labels, p.logits) for name, p in aligned.items()}
    mean_prob = np.mean([p.probabilities for p in aligned.values()], axis=0)  # (N,)
    out["average"] = Predictions(
        ref.video_ids, ref.labels, logit(np.clip(mean_prob, _PROB_EPS, 1 - _PROB_EPS))
    )
    if tsn_weights and all(s in aligned for s in tsn_weights):
        total = sum(tsn_weights.values())
        tsn = sum(w * aligned[s].logits for s, w in tsn_weights.items()) / total
        out["tsn"] = Predictions(ref.video_ids, ref.labels, tsn)
    return out


def _fit_lr(x: np.ndarray, y: np.ndarray, c: float, prior: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Class-balanced L2 logistic layer on standardised features, shrunk towards `prior`; weights in raw units.

    On standardised features x~ the logit is s * (x~ @ prior) + x~ @ d + b: the scale s >= 0 of
    the prior's fixed combination and the bias b are free, the departure d from it pays sklearn's
    L2 penalty |d|^2 / 2 against C times the balanced log-loss. So strong regularisation gives the
    prior's combination (calibrated, never reversed), not the constant model that plain L2 shrinks
    to; weak regularisation gives the unconstrained layer. `prior` None is plain L2 (towards no
    weights at all); c = 0 fits s and b alone (d = 0) and needs a prior.
    """
    from scipy.optimize import minimize

    f = x.shape[1]
    if c == 0 and prior is None:
        raise ValueError("a layer with no free weights (c = 0) needs a prior combination")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature carries nothing; keep it finite
    xs = (x - mean) / scale  # (N, F)
    u = np.zeros(f) if prior is None else np.asarray(prior, np.float64)
    along = xs @ u  # (N,) the prior's combination
    sw = compute_sample_weight("balanced", y)
    free = c > 0

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        # sklearn's C * loss + |d|^2 / 2, divided by C: the same minimum, better scaled for small C.
        s_, b = theta[0], theta[1]
        d = theta[2:] if free else np.zeros(f)
        z = s_ * along + b + xs @ d
        r = sw * (expit(z) - y)  # (N,) d loss / d z
        loss = float(np.sum(sw * (np.logaddexp(0.0, z) - y * z))) + 0.5 * _S_PENALTY * s_ * s_
        grad = [float(r @ along) + _S_PENALTY * s_, float(r.sum())]
        if free:
            loss += 0.5 * float(d @ d) / c
            grad = np.concatenate([grad, xs.T @ r + d / c])
        return loss, np.asarray(grad, np.float64)

    bounds = [(0.0, None), (None, None)] + [(None, None)] * (f if free else 0)  # s >= 0: the prior is never reversed
    theta = minimize(objective, np.zeros(len(bounds)), jac=True, method="L-BFGS-B", bounds=bounds,
                     options={"maxiter": 2000, "gtol": 1e-9}).x
    w_std = theta[0] * u + (theta[2:] if free else 0.0)
    w = w_std / scale
    return w, float(theta[1] - w @ mean)


def _out_of_fold(x: np.ndarray, y: np.ndarray, c: float, folds: BaseCrossValidator,
                 prior: np.ndarray | None = None, groups: np.ndarray | None = None) -> np.ndarray:
    oof = np.empty(len(y))
    for train, test in folds.split(x, y, groups):
        w, b = _fit_lr(x[train], y[train], c, prior)
        oof[test] = x[test] @ w + b
    return oof


def _score(labels: np.ndarray, logits: np.ndarray, cfg: FusionConfig) -> dict:
    probs = expit(logits)
    thr = choose_threshold(labels, probs, cfg.goal, cfg.min_recall)
    m = compute_metrics(labels, probs, thr)
    return {
        "threshold": thr,
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "f1": m["per_class"]["violent"]["f1"],
        "recall": m["per_class"]["violent"]["recall"],
        "roc_auc": m["roc_auc"],
        "log_loss": m["log_loss"],
    }


def _loss(s: dict) -> float:
    """The log-loss candidates are compared by: calibrated when known, else the raw one."""
    return s.get("calibrated_log_loss", s["log_loss"])


def _rank_key(s: dict, metric: str) -> tuple[float, float, float]:
    """Larger is better: the chosen metric, then lower log-loss (`_loss`), then higher ROC-AUC."""
    return (s[metric] if s[metric] is not None else -np.inf, -_loss(s), s["roc_auc"] or 0.0)


def _balanced_log_loss(y: np.ndarray, logits: np.ndarray) -> float:
    return float(log_loss(y, expit(logits), sample_weight=compute_sample_weight("balanced", y), labels=[0, 1]))


def _calibrate(scores: dict, logits: Mapping[str, np.ndarray], y: np.ndarray, c: float,
               judge: BaseCrossValidator, groups: np.ndarray | None = None) -> None:
    """Add each candidate's "calibrated_log_loss": its logit through a one-feature layer, held out.

    Ties in the selection metric go to the lower log-loss, but the candidates' raw logits are not
    calibrated while a fitted layer's are; comparing every candidate through the same layer,
    judged out of sample, makes it a nested comparison that pure noise in one stream cannot pass.
    """
    for name, z in logits.items():
        alone = _out_of_fold(np.asarray(z, np.float64).reshape(-1, 1), y, c, judge, groups=groups)
        scores[name]["calibrated_log_loss"] = _balanced_log_loss(y, alone)


def _single(stream: str, threshold: float, reason: str, common: dict) -> FusionModel:
    return FusionModel(features=(f"{stream}:logit",), weights=(1.0,), bias=0.0, threshold=threshold,
                       method="single", selected=stream, fallback_reason=reason, **common)


def _prior(features: tuple[str, ...]) -> np.ndarray:
    """The layer's prior combination: every stream's logit weighted equally, embeddings not at all. Shape (F,)."""
    is_logit = np.array([name.endswith(":logit") for name in features], np.float64)
    return is_logit / is_logit.sum()


def _fixed_fusion(y: np.ndarray, logits: Mapping[str, np.ndarray], scores: dict, minority: int, cfg: FusionConfig,
                  common: dict, judge: BaseCrossValidator, groups: np.ndarray | None) -> FusionModel:
    """Fusion for a validation set too small to fit weights: the equal-weight layer, or one stream.

    A logistic layer needs about ten videos of the rarer class per weight it fits (events per
    variable, Peduzzi et al. 1996): below `cv_min_per_class` its weights, and any score of them on
    the same few videos, are noise. So the streams' standardised logits are averaged with equal
    weights (only the scale and bias of that average are fitted, which moves no video past another)
    and compared on validation with each stream alone; only thresholds are chosen.
    """
    streams = tuple(logits)
    logit_features = tuple(f"{st}:logit" for st in streams)
    xl = np.stack([np.asarray(logits[st], np.float64) for st in streams], axis=1)  # (N, streams)
    w, b = _fit_lr(xl, y, 0.0, _prior(logit_features))
    equal = xl @ w + b
    scores["equal"] = _score(y, equal, cfg)
    candidates = {**logits, "equal": equal}
    if minority >= 2:
        _calibrate(scores, candidates, y, cfg.default_c, judge, groups)
    chosen = max(candidates, key=lambda name: _rank_key(scores[name], cfg.select_metric))
    pick = scores[chosen]
    names = ", ".join(f"{st} alone" for st in streams)
    common = {**common, "c": 0.0, "cv_folds": 0}
    if chosen == "equal":
        logger.info("validation has %d video(s) of its rarer class (< %d): equal-weight fusion kept", minority,
                    cfg.cv_min_per_class)
        return FusionModel(features=logit_features, weights=tuple(float(v) for v in w), bias=b,
                           threshold=pick["threshold"], method="equal", **common)
    reason = (
        f"validation has {minority} video(s) of its rarer class (< {cfg.cv_min_per_class}): too few to "
        f"learn fusion weights; the equal-weight fusion and {names} were compared and "
        f"{chosen} scored best ({cfg.select_metric} {pick[cfg.select_metric]:.4f}, log-loss {_loss(pick):.4f})"
    )
    logger.warning("%s", reason)
    return _single(chosen, pick["threshold"], reason, common)


def _folds(cfg: FusionConfig, groups: np.ndarray | None, small: bool) -> BaseCrossValidator:
    """The folds inside a fit: leave-one-out for a small validation set (`_fixed_fusion`), else
    stratified K-fold (the learned layer); over whole recordings when `groups` is given."""
    if small:
        return LeaveOneOut() if groups is None else LeaveOneGroupOut()
    if groups is None:
        return StratifiedKFold(cfg.cv_folds, shuffle=True, random_state=cfg.seed)
    return StratifiedGroupKFold(min(cfg.cv_folds, len(np.unique(groups))), shuffle=True, random_state=cfg.seed)


def _both_classes_in_every_fit(y: np.ndarray, groups: np.ndarray, folds: BaseCrossValidator) -> bool:
    """Whether `folds` of whole recordings leave both classes in every training part.

    With a recording that holds every video of a class, a fold would fit on one class alone and
    score noise; the folds then hold out videos instead (and say so in the log).
    """
    if all(len(np.unique(y[train])) == 2 for train, _ in folds.split(y, y, groups)):
        return True
    logger.info("a recording holds every validation video of a class: fusion's folds hold out videos instead")
    return False


def fit_fusion(
    val_inputs: Mapping[str, Predictions], config: FusionConfig | None = None,
    groups: Mapping[str, str] | None = None,
) -> FusionModel:
    """Fit late fusion of the streams' validation predictions; fall back to one stream if better.

    Args:
        val_inputs: stream name -> its validation predictions (never test predictions).
        groups: video id -> source recording. When given (and the validation videos come from at
            least two recordings), every cross-validation inside the fit holds out whole
            recordings, as the splits that made the predictions did: the strength `c`, the
            learned layer's validation score and the calibrated log-losses then measure how
            fusion carries over to recordings it was not fitted on, which is how it is used.
            A video missing from `groups` is its own recording.
    """
    cfg = config or FusionConfig()
    if not val_inputs:
        raise ValueError("fusion needs validation predictions of at least one stream")
    for name, p in val_inputs.items():
        if name in RESERVED:
            raise ValueError(f"stream name {name!r} is reserved; rename the stream")
        if len(p) == 0:
            raise ValueError(f"validation predictions of stream {name!r} are empty")
        if cfg.use_embeddings and p.embeddings is None:
            raise ValueError(
                f"use_embeddings is set but stream {name!r} has no validation embeddings"
            )
    aligned = align_all(val_inputs)
    streams = tuple(aligned)
    y = aligned[streams[0]].labels
    n_pos = int(y.sum())
    if n_pos in (0, len(y)):
        only = "violent" if n_pos else "non-violent"
        raise ValueError(
            f"validation set holds only {only} videos ({len(y)}); fusion needs both classes"
        )

    logits = {s: p.logits for s, p in aligned.items()}
    emb = {s: p.embeddings for s, p in aligned.items()} if cfg.use_embeddings else {}
    features = _feature_names(streams, {s: e.shape[1] for s, e in emb.items()})
    x = _design(features, logits, emb)  # (N, F)

    minority = min(n_pos, len(y) - n_pos)
    base = baselines(aligned, dict(cfg.tsn_weights))
    scores = {name: _score(y, p.logits, cfg) for name, p in base.items()}
    small = minority < cfg.cv_min_per_class
    g = None
    if groups is not None:
        g = np.array([str(groups.get(v, v)) for v in aligned[streams[0]].video_ids])  # unknown: its own recording
        g = g if len(np.unique(g)) >= 2 and _both_classes_in_every_fit(y, g, _folds(cfg, g, small)) else None
    folds = _folds(cfg, g, small)
    common = dict(streams=streams, goal=cfg.goal, min_recall=cfg.min_recall, n_val=len(y), validation=scores,
                  cv_by="video" if g is None else "recording")
    if small:
        return _fixed_fusion(y, logits, scores, minority, cfg, common, folds, g)

    prior = _prior(features)
    n_folds = folds.get_n_splits()
    best = None
    for c in sorted(cfg.cs):  # ascending, so ties keep the stronger regularisation (closer to equal weights)
        oof = _out_of_fold(x, y, c, folds, prior, g)
        loss = _balanced_log_loss(y, oof)
        logger.debug("fusion C=%g: out-of-fold balanced log-loss %.4f", c, loss)
        if best is None or loss < best[0] - 1e-12:
            best = (loss, c, oof)
    _, c, learned_val = best
    w, b = _fit_lr(x, y, c, prior)
    scores["learned"] = _score(y, learned_val, cfg)
    _calibrate(scores, {s: logits[s] for s in streams}, y, c, folds, g)
    scores["learned"]["calibrated_log_loss"] = _balanced_log_loss(y, learned_val)
    best_single = max(streams, key=lambda s: _rank_key(scores[s], cfg.select_metric))
    learned, single = scores["learned"], scores[best_single]
    common.update(c=float(c), cv_folds=n_folds)
    if _rank_key(learned, cfg.select_metric) < _rank_key(single, cfg.select_metric):
        reason = (
            f"learned fusion (out-of-fold) scored validation {cfg.select_metric} {learned[cfg.select_metric]:.4f}, "
            f"log-loss {_loss(learned):.4f}, below {best_single} alone "
            f"({single[cfg.select_metric]:.4f}, log-loss {_loss(single):.4f}); using {best_single} alone"
        )
        logger.warning("%s", reason)
        return _single(best_single, single["threshold"], reason, common)
    logger.info(
        "learned fusion kept: validation %s %.4f vs best single stream %s %.4f",
        cfg.select_metric,
        learned[cfg.select_metric],
        best_single,
        single[cfg.select_metric],
    )
    return FusionModel(
        features=features,
        weights=tuple(float(v) for v in w),
        bias=b,
        threshold=learned["threshold"],
        method="learned",
        **common,
    )
