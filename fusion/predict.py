"""Scoring new footage: sliding windows over a video of any length, per-window and per-video violence.

Frames are streamed (`data.video.iter_frames`) and only the current window's frames are held,
each with the flow from its predecessor, so memory stays at one window whatever the video's
length. Frames are sampled and resized as the run's store was (its recorded sampling); flow is
computed on the fly with the store's method and parameters (`flow.api.FlowEstimator`) and passed
through the store's codec at its bound, so the flow stream sees the quantisation it trained on
(and the RGB stream sees frames through the store's JPEG codec when the store keeps them so).
Each pair of frames gets its flow once, even when windows overlap.

Windows: frame i sits at t = i / fps of the source; window [s, s + window) takes the frames in
it, for s = 0, stride, 2 stride, ... while the window fits in the video (duration = frames / fps),
plus one last window ending at the video's end when the regular ones leave a tail unscored; a
video shorter than a window is one window. Each window is scored by both streams (the mean logit
over the TTA views), then fused with RUN/fusion.json.

Verdict: the video's score is the mean of its `top_k` highest fused window probabilities (top_k
= 2 by default; the max when there is one window), and the video is violent when that score is at
or above the run's operating threshold (chosen on validation). Averaging the two highest windows
keeps one spurious window from flagging a video, while a fight lasting a window's length still
covers two overlapping windows at the default stride.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.special import expit

from data.clips import ClipConfig, normalize_clip
from data.flowcodec import decode, encode
from data.rgbcodec import decode_rgb, encode_rgb
from data.sampling import Sampling
from data.video import iter_frames, source_fps
from fusion.late import FusionModel, fuse_logits, load_fusion
from fusion.predictions import write_atomic
from fusion.tta import ViewSpec, check_tta, clip_from_arrays, tta_views

logger = logging.getLogger(__name__)

STREAMS = ("rgb", "flow")
TOP_K = 2  # windows averaged into the video's score
_EPS = 1e-9  # time comparisons: a window ending exactly on a frame's time does not hold that frame


@dataclass(frozen=True)
class WindowScore:
    """Violence probabilities of one window."""

    start_s: float  # window start, seconds from the video's first frame
    end_s: float  # window end (exclusive), seconds
    frames: int  # sampled frames in the window
    p_rgb: float  # RGB stream probability
    p_flow: float  # flow stream probability
    p_fused: float  # fused probability, compared with the run's threshold


@dataclass(frozen=True)
class VideoScore:
    """A scored video: its windows and the overall verdict."""

    path: str  # the video as given
    fps: float  # source frame rate
    duration_s: float  # decoded frames / fps
    windows: tuple[WindowScore, ...]  # in time order
    score: float  # mean of the top_k highest fused window probabilities
    threshold: float  # the run's operating threshold on the fused probability
    violent: bool  # score >= threshold
    top_k: int  # windows averaged into `score`
    tta: int  # views per window and stream
    max_frames_held: int  # most sampled frames held at once (one window's worth at most)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["windows"] = [asdict(w) for w in self.windows]
        return d


def check_windows(window: float, stride: float) -> None:
    """--window and --stride: finite positive seconds, else a one-line ValueError."""
    if not (math.isfinite(window) and math.isfinite(stride) and window > 0 and stride > 0):
        raise ValueError(f"--window and --stride must be positive seconds, got {window} and {stride}")


def window_starts(duration: float, window: float, stride: float) -> list[tuple[float, float]]:
    """(start, end) of every window of a video lasting `duration` seconds (module docstring)."""
    check_windows(window, stride)
    if duration <= window + _EPS:
        return [(0.0, duration)]
    count = int(np.floor((duration - window) / stride + _EPS)) + 1
    spans = [(k * stride, k * stride + window) for k in range(count)]
    if spans[-1][1] < duration - _EPS:
        spans.append((duration - window, duration))
    return spans


def _store_settings(store_path: Path) -> dict:
    """Sampling, flow method/parameters, codec and bound of the run's store (first video's attrs)."""
    from data.store import Store, store_exists

    if not store_exists(store_path):
        raise FileNotFoundError(
            f"the run was trained on store {store_path}, which no longer exists; its sampling and flow "
            "settings are needed to score new videos"
        )
    with Store(store_path) as s:
        if not len(s):
            raise ValueError(f"{store_path} holds no videos")
        attrs = s.attrs(s.video_ids[0])
        root = s.root_attrs
        ids = s.video_ids  # the median length needs no more than a few hundred of them, spread evenly
        seconds = [video_seconds(s.attrs(ids[i])) for i in np.unique(np.linspace(0, len(ids) - 1, 256).astype(int))]
    params = {k[len("flow_param_"):]: v for k, v in attrs.items() if k.startswith("flow_param_")}
    return {
        "sampling": Sampling.from_attrs(attrs, prefix="sampling_"),
        "method": attrs.get("flow_method", root.get("flow_method", "tvl1")),
        "backend": attrs.get("flow_backend", root.get("flow_backend", "auto")),
        "params": params,
        "codec": attrs.get("flow_codec", "float16"),
        "rgb_codec": attrs.get("rgb_codec", "raw"),  # stores written before the attr hold raw frames
        "bound": float(attrs.get("flow_bound", root.get("flow_bound", 20.0))),
        "clip_seconds": float(np.median(known)) if (known := [x for x in seconds if x is not None]) else None,
    }


def video_seconds(attrs: dict) -> float | None:
    """How long a stored video lasts in its source, from its attrs; None when they do not say."""
    frames, fps = attrs.get("decoded_frames"), attrs.get("source_fps")
    if frames is None or fps is None or not float(fps) > 0:
        return None
    return float(frames) / float(fps)


def window_mismatch(window: float, clip_seconds: float | None, tolerance: float = 1.5) -> str | None:
    """A warning when windows are much longer or shorter than the clips the models learned from.

    A clip's T steps are spread over the whole training video but over one window here, so a
    window of another length changes the time between steps, and with it every descriptor of
    change between steps (most of all `hoghof`'s temporal bands, whose frequencies are per step).
    """
    if clip_seconds is None or clip_seconds <= 0 or max(window / clip_seconds, clip_seconds / window) <= tolerance:
        return None
    return (f"the models learned from clips of {clip_seconds:.1f} s (median of the run's store) and "
            f"these windows last {window:.1f} s, so their steps lie {window / clip_seconds:.2g}x as far "
            f"apart in time as in training; --window {clip_seconds:.1f} matches the training clips")


class Scorer:
    """A run loaded once for scoring many videos: both stream models, fusion, sampling and flow."""

    def __init__(self, run_dir: str | Path, tta: int = 1, device: str = "auto", batch_views: int = 8) -> None:
        from flow.api import FlowEstimator
        from flow.devices import resolve_device
        from fusion.pipeline import check_run, clip_forward, fuse_run, stream_fingerprints
        from streams.rundir import load_stream_model
        from streams.train import use_fused_lstm

        self.run = check_run(run_dir)
        self.views: list[ViewSpec] = tta_views(check_tta(tta))
        self.device = resolve_device(device)
        self.batch_views = max(1, int(batch_views))
        self.models, self.clip_cfgs = {}, {}
        store = None
        for stream in STREAMS:
            model, cfg, info = load_stream_model(self.run / stream, "best", self.device)
            if self.device.type == "cpu":
                use_fused_lstm(model)
            self.models[stream] = clip_forward(model, info.get("module") or "model")
            self.clip_cfgs[stream] = ClipConfig(steps=cfg.train.steps, flow_stack=cfg.model.flow_stack,
                                                size=cfg.train.size)
            store = store or Path(info["run"].get("store", ""))
        fusion_path = self.run / "fusion.json"
        if not fusion_path.is_file():
            logger.info("%s has no fusion.json; fitting fusion on validation first", self.run)
            fuse_run(self.run)
        self.fusion: FusionModel = load_fusion(fusion_path)
        now = stream_fingerprints(self.run)
        retrained = [s for s, mark in self.fusion.trained.items() if now.get(s) != mark]
        if retrained:  # its weights and threshold were fitted on the predictions of streams since replaced
            raise ValueError(f"{fusion_path} was fitted before the {' and '.join(retrained)} stream"
                             f"{'s were' if len(retrained) > 1 else ' was'} trained again; refit it with "
                             f"`twostream fuse {self.run}`")
        if any(":emb" in f for f in self.fusion.features):
            raise ValueError(f"{fusion_path} fuses embeddings; window scoring needs a logit-only fusion")
        settings = _store_settings(store)
        sampling = settings["sampling"]
        # Uniform-N sampling spans a whole stored clip; here each window takes N frames instead.
        self.window_frames = sampling.frames
        self.sampling = Sampling(fps=sampling.fps, size=sampling.size, short_side=sampling.short_side)
        self.codec, self.bound, self.rgb_codec = settings["codec"], settings["bound"], settings["rgb_codec"]
        self.clip_seconds: float | None = settings["clip_seconds"]  # median training video length
        backend = settings["backend"] if self.device.type == "cpu" else "auto"
        self.flow = FlowEstimator(settings["method"], backend, self.device, **settings["params"])

    def _logit(self, stream: str, frames: np.ndarray | None, flow: np.ndarray | None) -> float:
        """Mean logit of one stream over the views of one window."""
        clips = [clip_from_arrays(stream, frames, flow, self.clip_cfgs[stream], v)[0] for v in self.views]
        out = []
        with torch.inference_mode():
            for i in range(0, len(clips), self.batch_views):
                batch = torch.stack(clips[i : i + self.batch_views]).to(self.device)  # (V, T, C, H, W)
                batch = normalize_clip(batch, stream, self.bound)  # on the device: float32 network input
                out.append(self.models[stream](batch).float().reshape(-1).cpu())
        return float(torch.cat(out).mean())

    def _flow_fields(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """Flow between consecutive frames, quantised as the store keeps it. Shape: (N, H, W, 2)."""
        flow = self.flow(prev, nxt)
        return decode(encode(flow, self.codec, self.bound), self.codec, self.bound)

    def _score_window(self, held: deque, start: float, end: float) -> WindowScore | None:
        items = [h for h in held if start - _EPS <= h[0] < end - _EPS]
        if self.window_frames is not None and len(items) > self.window_frames:
            keep = np.floor(np.linspace(0, len(items) - 1, self.window_frames) + 0.5).astype(int)
            items = [items[i] for i in keep]
        if len(items) < 2:
            return None
        # Flow of each frame from the one before it; computed once per pair, in one batch.
        missing = [i for i in range(1, len(items)) if items[i][2] is None or items[i][3] != items[i - 1][0]]
        if missing:
            prev = np.stack([items[i - 1][1] for i in missing])
            nxt = np.stack([items[i][1] for i in missing])
            fields = self._flow_fields(prev, nxt)
            for j, i in enumerate(missing):
                items[i][2], items[i][3] = fields[j], items[i - 1][0]
        frames = np.stack([h[1] for h in items])  # (m, H, W, 3)
        if self.rgb_codec == "jpeg":  # the RGB stream trained on the store's JPEG frames; flow came from raw ones
            frames = decode_rgb(encode_rgb(frames))
        flow = np.stack([h[2] for h in items[1:]])  # (m - 1, H, W, 2)
        logits = {"rgb": self._logit("rgb", frames, None), "flow": self._logit("flow", None, flow)}
        fused = fuse_logits(self.fusion, {s: np.array([v]) for s, v in logits.items()})[0]
        return WindowScore(round(start, 6), round(end, 6), len(items), float(expit(logits["rgb"])),
                           float(expit(logits["flow"])), float(expit(fused)))

    def score(self, path: str | Path, window: float = 2.0, stride: float = 1.0, top_k: int = TOP_K) -> VideoScore:
        """Score one video; a missing, broken or too short video raises data.video.VideoReadError."""
        check_windows(window, stride)
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        fps = source_fps(path)
        frames = iter_frames(path, self.sampling)
        # Held entries: [time, frame (H, W, 3), flow from the previous held frame or None, its time].
        # Only frames later than (newest - window) are kept: every window still to be scored lies there.
        held: deque = deque()
        scores: list[WindowScore] = []
        next_start, max_held, last_t = 0.0, 0, 0.0
        for index, frame in frames:
            t = index / fps
            last_t = t
            # A window ending at or before this frame is complete and inside the video: score it now.
            while t >= next_start + window - _EPS:
                if (s := self._score_window(held, next_start, next_start + window)) is not None:
                    scores.append(s)
                next_start += stride
            held.append([t, frame, None, None])
            while held[0][0] <= t - window + _EPS:
                held.popleft()
            max_held = max(max_held, len(held))
        duration = last_t + 1.0 / fps
        # What is left: regular windows ending on the video's last frame, and the tail window.
        scored = {round(w.start_s, 6) for w in scores}
        for start, end in window_starts(duration, window, stride):
            if start >= next_start - _EPS or (start, end) == (duration - window, duration):
                if round(start, 6) not in scored and (s := self._score_window(held, start, end)) is not None:
                    scores.append(s)
        if not scores:
            raise ValueError(f"{path}: no window holds two sampled frames; try a longer --window")
        scores.sort(key=lambda w: w.start_s)
        fused = np.sort([w.p_fused for w in scores])[::-1]
        k = min(top_k, len(fused))
        score = float(fused[:k].mean())
        threshold = float(self.fusion.threshold)
        return VideoScore(str(path), float(fps), float(duration), tuple(scores), score, threshold,
                          bool(score >= threshold), k, len(self.views), max_held)


def score_video(
    path: str | Path,
    run_dir: str | Path,
    window: float = 2.0,
    stride: float = 1.0,
    tta: int = 1,
    device: str = "auto",
) -> VideoScore:
    """Per-window violence probabilities (RGB, flow, fused) and the verdict for one video."""
    return Scorer(run_dir, tta, device).score(path, window, stride)


# --- outputs ------------------------------------------------------------------------------------


_CSV_COLUMNS = ("start_s", "end_s", "p_rgb", "p_flow", "p_fused")


def windows_csv(score: VideoScore) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for w in score.windows:
        writer.writerow([repr(w.start_s), repr(w.end_s), repr(w.p_rgb), repr(w.p_flow), repr(w.p_fused)])
    return buf.getvalue()


def timeline_png(score: VideoScore) -> bytes:
    """Window probabilities over time with the threshold, drawn on an Agg canvas (no pyplot state)."""
    fig = Figure(figsize=(8, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    mid = [(w.start_s + w.end_s) / 2 for w in score.windows]
    for name, values, style in (("RGB", [w.p_rgb for w in score.windows], ":"),
                                ("flow", [w.p_flow for w in score.windows], "--"),
                                ("fused", [w.p_fused for w in score.windows], "-")):
        ax.plot(mid, values, style, marker="o", markersize=3, label=name)
    ax.axhline(score.threshold, color="0.4", linewidth=1, label=f"threshold {score.threshold:.2f}")
    for w in score.windows:
        if w.p_fused >= score.threshold:
            ax.axvspan(w.start_s, w.end_s, color="red", alpha=0.08)
    verdict = "violent" if score.violent else "non-violent"
    ax.set(xlabel="time (s)", ylabel="violence probability", ylim=(-0.02, 1.02),
           xlim=(0, max(score.duration_s, 1e-3)), title=f"{Path(score.path).name}: {verdict} (score {score.score:.2f})")
    ax.legend(loc="upper right", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def write_outputs(score: VideoScore, out_dir: str | Path, name: str | None = None) -> list[Path]:
    """`<name>.csv`, `<name>.json` and `<name>.png` (timeline) in `out_dir`; name defaults to the video's stem."""
    out = Path(out_dir)
    name = name or Path(score.path).stem
    return [
        write_atomic(out / f"{name}.csv", windows_csv(score)),
        write_atomic(out / f"{name}.png", timeline_png(score)),
        write_atomic(out / f"{name}.json", json.dumps(score.to_dict(), indent=2) + "\n"),
    ]


def output_names(paths: Sequence[str | Path]) -> list[str]:
    """A distinct output name per video: its stem, with a number where two stems collide."""
    names, seen = [], {}
    for p in paths:
        stem = Path(p).stem or "video"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names
