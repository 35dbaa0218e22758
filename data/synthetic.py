"""The embedded synthetic dataset: small labelled clips of people-like figures, written as videos.

Violent clips show pairs of fighters in contact whose limbs and bodies move in jerks: strikes go
out and back in a few hundredths of a second, lunges and hit reactions change velocity abruptly,
and some fighters fall. Non-violent clips show walking (steady velocity, periodic gait), standing
and slow gestures, sometimes of two people standing close together. Figure size, speed and
number, brightness, auto-exposure steps, passers-by near the camera, frame rate, sensor noise and
camera shake vary independently of the label, with overlapping ranges, so that no single pixel
statistic (mean brightness, frame-difference energy) separates the classes: what separates them
is how erratic the motion is.

Motion is defined in seconds (speeds in frame heights per second, strikes lasting fixed times),
so a clip's frame rate changes its per-frame displacements the way a real camera's would.
"""

from __future__ import annotations

import csv
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from flow.groundtruth import textured_image

log = logging.getLogger(__name__)

CLASS_FOLDERS = {1: "Violence", 0: "NonViolence"}  # a folder-per-class layout the indexer knows
_FILE_PREFIX = {1: "V", 0: "NV"}  # V_001.mp4 / NV_002.mp4, as in Real Life Violence Situations
# Container -> (suffix, fourcc); all three are written and read back by the pip OpenCV build.
CONTAINERS = {"mp4": (".mp4", "mp4v"), "avi": (".avi", "MJPG"), "mkv": (".mkv", "FFV1")}
# Suffix -> fourcc that write_video uses unless told otherwise. FFV1 is lossless; MPEG-1 (.mpg)
# only accepts the broadcast frame rates (24, 25, 29.97, 30, 50, 60).
_FOURCC_BY_SUFFIX = {
    ".mp4": "mp4v",
    ".avi": "MJPG",
    ".mkv": "FFV1",
    ".webm": "VP80",
    ".mpg": "PIM1",
    ".mpeg": "PIM1",
}
_MARGIN = 12  # background pixels beyond the largest frame on each side, room for camera shake


@dataclass(frozen=True)
class SyntheticSpec:
    """What `generate_dataset` writes."""

    videos: int = 60  # number of clips
    violent_fraction: float = 0.5  # share of label-1 clips
    recordings: int = 12  # source recordings (groups); a recording's clips share scene and camera
    frames: tuple[int, int] = (24, 36)  # frame-count range per clip, inclusive (odd counts occur)
    size: tuple[int, int] = (96, 128)  # side range; w and h drawn independently, then made even
    fps: tuple[int, ...] = (10, 15, 25, 30)  # frame rates, one drawn per clip
    seed: int = 0  # same seed -> identical frames
    container: str = "mp4"  # "mp4" (mp4v), "avi" (MJPG) or "mkv" (FFV1, lossless)

    def __post_init__(self) -> None:
        if self.videos < 1:
            raise ValueError(f"synthetic: videos must be >= 1, got {self.videos}")
        if not 0.0 <= self.violent_fraction <= 1.0:
            raise ValueError(
                f"synthetic: violent_fraction must be in [0, 1], got {self.violent_fraction}"
            )
        if self.recordings < 1:
            raise ValueError(f"synthetic: recordings must be >= 1, got {self.recordings}")
        if len(self.frames) != 2 or not 2 <= self.frames[0] <= self.frames[1]:
            raise ValueError(
                f"synthetic: frames must be a range (lo, hi) with 2 <= lo <= hi, got {self.frames}"
            )
        if len(self.size) != 2 or not 32 <= self.size[0] <= self.size[1]:
            raise ValueError(
                f"synthetic: size must be a range (lo, hi) with 32 <= lo <= hi, got {self.size}"
            )
        if not self.fps or any(not 0 < f <= 240 for f in self.fps):
            raise ValueError(f"synthetic: fps must be rates in (0, 240], got {self.fps}")
        if self.container not in CONTAINERS:
            raise ValueError(
                f"synthetic: container must be one of {', '.join(CONTAINERS)}, got {self.container!r}"
            )


@dataclass(frozen=True)
class Recording:
    """One source camera: the scene and imaging conditions its clips share."""

    background: np.ndarray  # (Hb, Wb, 3) float32 in [0, 255], larger than any frame
    noise: float  # sensor noise std in grey levels
    shake: float  # std in pixels of the camera's wobble about its rest position (0 = fixed mount)
    gain: float  # brightness gain of the camera


@dataclass(frozen=True)
class SyntheticClip:
    """A rendered clip and where `generate_dataset` puts it."""

    path: str  # POSIX path relative to the dataset folder, e.g. "Violence/V_003.mp4"
    label: int  # 1 = violent, 0 = non-violent
    group: str  # recording name, e.g. "rec04"
    fps: int  # frame rate written to the container
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB


def _colour_texture(
    height: int, width: int, rng: np.random.Generator, contrast: float
) -> np.ndarray:
    """(H, W, 3) float32: a texture about a random colour, `contrast` grey levels peak to peak."""
    tex = textured_image(height, width, rng)[..., None] / 255.0 - 0.5  # (H, W, 1)
    base = rng.uniform(40, 215, 3)
    tint = rng.uniform(0.6, 1.0, 3)  # texture not quite grey, as on dyed cloth or painted walls
    return np.clip(base + contrast * tint * tex, 0, 255).astype(np.float32)


def make_recording(
    rng: np.random.Generator, max_width: int = 128, max_height: int = 128
) -> Recording:
    """A random camera: textured background with a few wall-like blocks, noise, shake and gain."""
    hb, wb = max_height + 2 * _MARGIN, max_width + 2 * _MARGIN
    bg = _colour_texture(hb, wb, rng, rng.uniform(40, 110))  # plainer than clothing
    for _ in range(int(rng.integers(2, 6))):  # blocks give the background edges like a real scene
        x0, y0 = int(rng.integers(0, wb)), int(rng.integers(0, hb))
        x1, y1 = x0 + int(rng.integers(8, wb // 2)), y0 + int(rng.integers(8, hb // 2))
        bg[y0:y1, x0:x1] = 0.5 * bg[y0:y1, x0:x1] + 0.5 * rng.uniform(20, 235, 3)
    return Recording(
        background=bg,
        noise=float(rng.uniform(1.0, 6.0)),
        shake=float(rng.uniform(0.1, 0.5)) if rng.uniform() < 0.5 else 0.0,
        gain=float(rng.uniform(0.75, 1.25)),
    )


@dataclass
class _Track:
    """A figure's pose over time, one entry per frame; angles in degrees."""

    x: np.ndarray  # (T,) hip x in pixels
    y: np.ndarray  # (T,) hip y in pixels
    tilt: np.ndarray  # (T,) body lean, 0 = upright, positive = clockwise
    arms: np.ndarray  # (T, 2) arm angles from hanging down, positive = forward
    legs: np.ndarray  # (T, 2) leg angles from straight down, positive = forward
    facing: float  # +1 faces right, -1 left
    height: float  # figure height in pixels
    texture: np.ndarray  # (2H, 2W, 3) float32 clothing texture, moves with the hip


def _pulses(
    t: np.ndarray, starts: np.ndarray, rise: np.ndarray, fall: np.ndarray, amp: np.ndarray
) -> np.ndarray:
    """Sum of strike-shaped pulses: straight out to `amp` in `rise` s and straight back in `fall` s.

    Velocity jumps at the start, the peak and the end of each strike: the erratic motion the
    classes differ by.
    """
    out = np.zeros_like(t)
    for s, r, f, a in zip(starts, rise, fall, amp, strict=True):
        dt = t - s
        out += a * np.clip(np.minimum(dt / r, 1.0 - (dt - r) / f), 0.0, 1.0)
    return out


def _lag(signal: np.ndarray, t: np.ndarray, tau: float) -> np.ndarray:
    """First-order lag with time constant `tau` s: piecewise-constant targets become sharp lunges."""
    out = np.empty_like(signal)
    out[0] = signal[0]
    for i in range(1, len(signal)):
        k = 1.0 - math.exp(-(t[i] - t[i - 1]) / tau)
        out[i] = out[i - 1] + k * (signal[i] - out[i - 1])
    return out


def _events(rng: np.random.Generator, duration: float, rate: float) -> np.ndarray:
    """Event times of a Poisson process of `rate` Hz over [-0.1, duration), at least 1/16 s apart."""
    gaps = np.maximum(rng.exponential(1.0 / rate, int(duration * rate * 3) + 4), 1.0 / 16)
    times = np.cumsum(gaps) - 0.1 - gaps[0] * rng.uniform()
    return times[times < duration]


def _calm(
    rng: np.random.Generator,
    t: np.ndarray,
    x0: float,
    y0: float,
    fh: float,
    frame_h: int,
    kind: str | None = None,
) -> dict:
    """Walking, standing or gesturing (`kind`, random when None): steady or periodic motion."""
    T = len(t)
    kind = kind or str(rng.choice(["walk", "walk", "stand", "gesture"]))
    facing = float(rng.choice([-1.0, 1.0]))
    arms = np.tile(rng.uniform(5, 20, 2), (T, 1))
    legs = np.tile(rng.uniform(-4, 4, 2), (T, 1))
    tilt = np.full(T, rng.uniform(-3, 3))
    sway_f = rng.uniform(0.1, 0.5)
    x = x0 + 0.01 * fh * np.sin(2 * np.pi * sway_f * t + rng.uniform(0, 6.3))
    y = np.full(T, y0)
    if kind == "walk":
        speed = rng.uniform(0.1, 0.55) * frame_h  # px/s; the top overlaps lunges of fighters
        heading = rng.uniform(-0.3, 0.3)
        x = x0 + facing * speed * math.cos(heading) * t
        y = y0 + speed * math.sin(heading) * t
        step_f, phase = rng.uniform(1.2, 2.4), rng.uniform(0, 2 * np.pi)
        swing = np.sin(2 * np.pi * step_f * t + phase)
        leg_amp, arm_amp = rng.uniform(15, 32), rng.uniform(10, 30)
        legs = np.stack([leg_amp * swing, -leg_amp * swing], 1)
        arms = np.stack([-arm_amp * swing, arm_amp * swing], 1) + rng.uniform(5, 15)
        y = y - 0.02 * fh * np.cos(4 * np.pi * step_f * t + 2 * phase)  # bob twice per stride
        tilt = tilt + facing * rng.uniform(0, 6)
    elif kind == "gesture":
        f, amp = rng.uniform(0.3, 1.3), rng.uniform(25, 75)
        wave = amp * (0.5 - 0.5 * np.cos(2 * np.pi * f * t + rng.uniform(0, 6.3)))
        arms = arms.copy()
        arms[:, 0] += wave
        if rng.uniform() < 0.5:
            arms[:, 1] += wave * rng.uniform(0.3, 1.0)
    return dict(x=x, y=y, tilt=tilt, arms=arms, legs=legs, facing=facing, height=fh)


def _fight(rng: np.random.Generator, t: np.ndarray, cx: float, y0: float, fh: float) -> list[dict]:
    """Two fighters in contact: jerky strikes, lunges, hit reactions; maybe one falls."""
    T, duration = len(t), float(t[-1]) + 1e-6
    gap = rng.uniform(0.25, 0.45) * fh
    vigour = rng.uniform(0.6, 1.0)  # some fights are scrappy, some are all-out
    poses = []
    for side in (-1.0, 1.0):
        facing = -side
        strikes = _events(rng, duration, rng.uniform(3.0, 6.0))
        n = len(strikes)
        rise, fall = rng.uniform(0.03, 0.07, n), rng.uniform(0.05, 0.12, n)
        amp, which = rng.uniform(40, 75, n) * vigour, rng.integers(0, 2, n)
        arms = np.full((T, 2), rng.uniform(40, 70))  # guard: fists up in front
        for arm in (0, 1):
            sel = which == arm
            arms[:, arm] += _pulses(t, strikes[sel], rise[sel], fall[sel], amp[sel])
        punch = _pulses(t, strikes, rise, fall, amp)  # (T,) how far any strike is extended
        kicks = _events(rng, duration, rng.uniform(0.5, 2.0))
        legs = np.tile(rng.uniform(-8, 8, 2), (T, 1))
        legs[:, 0] += _pulses(
            t,
            kicks,
            rng.uniform(0.04, 0.08, len(kicks)),
            rng.uniform(0.06, 0.15, len(kicks)),
            rng.uniform(30, 70, len(kicks)) * vigour,
        )
        lunges = _events(rng, duration, rng.uniform(2.5, 5.0))
        target_x = np.zeros(T)
        target_y = np.zeros(T)
        for s in lunges:
            target_x[t >= s] = rng.uniform(-0.2, 0.2) * fh * vigour
            target_y[t >= s] = rng.uniform(-0.05, 0.05) * fh
        tau = rng.uniform(0.02, 0.05)
        x = cx + side * gap / 2 + _lag(target_x, t, tau)
        y = y0 + _lag(target_y, t, tau)
        tilt_target = np.zeros(T)
        for s in _events(rng, duration, rng.uniform(2.0, 5.0)):
            tilt_target[t >= s] = rng.uniform(-18, 18) * vigour
        tilt = _lag(tilt_target, t, tau)
        poses.append(
            dict(x=x, y=y, tilt=tilt, arms=arms, legs=legs, facing=facing, height=fh, punch=punch)
        )
    for me, other in ((0, 1), (1, 0)):  # a landed strike knocks the other fighter back
        hit = poses[other]["punch"] / 75.0 * rng.uniform(0.08, 0.18) * fh
        poses[me]["x"] = poses[me]["x"] - poses[me]["facing"] * hit
        poses[me]["tilt"] = poses[me]["tilt"] - poses[me]["facing"] * hit / fh * 60
    if rng.uniform() < 0.4:
        _fall(rng, t, poses[int(rng.integers(0, 2))], fh)
    for p in poses:
        del p["punch"]
    return poses


def _fall(rng: np.random.Generator, t: np.ndarray, pose: dict, fh: float) -> None:
    """Make a fighter topple: the lean accelerates to lying within 0.2-0.4 s, then stays."""
    start = rng.uniform(0.3, 0.7) * t[-1]
    length = rng.uniform(0.2, 0.4)
    s = np.clip((t - start) / length, 0.0, 1.0) ** 2  # gravity: the lean accelerates
    after = t >= start
    direction = -pose["facing"]  # knocked backwards
    frozen = {
        k: pose[k][np.argmax(after)] if after.any() else pose[k][-1] for k in ("x", "y", "tilt")
    }
    pose["tilt"] = np.where(
        after, frozen["tilt"] + s * (direction * rng.uniform(70, 90) - frozen["tilt"]), pose["tilt"]
    )
    pose["y"] = np.where(after, frozen["y"] + s * 0.3 * fh, pose["y"])
    pose["x"] = np.where(after, frozen["x"] + s * direction * 0.25 * fh, pose["x"])
    pose["arms"] = np.where(
        after[:, None],
        pose["arms"][np.argmax(after)] * (1 - s[:, None]) + 150 * s[:, None],
        pose["arms"],
    )


def _rot(v: np.ndarray, deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _draw_mask(track: _Track, i: int, offset: np.ndarray, height: int, width: int) -> np.ndarray:
    """Anti-aliased (H, W) uint8 silhouette of `track` at frame i."""
    mask = np.zeros((height, width), np.uint8)
    fh, tilt, face = track.height, float(track.tilt[i]), track.facing
    hip = np.array([track.x[i], track.y[i]]) + offset
    up = _rot(np.array([0.0, -1.0]), tilt)
    down = -up
    neck = hip + up * 0.36 * fh
    sh = 16.0  # cv2 fixed-point scale (shift=4) for sub-pixel drawing

    def pt(p: np.ndarray) -> tuple[int, int]:
        return int(round(p[0] * sh)), int(round(p[1] * sh))

    def limb(a: np.ndarray, b: np.ndarray, thick: float) -> None:
        cv2.line(mask, pt(a), pt(b), 255, max(2, int(round(thick))), cv2.LINE_AA, 4)

    mid = (hip + neck) / 2
    axes = (int(round(0.1 * fh * sh)), int(round(0.2 * fh * sh)))
    cv2.ellipse(mask, pt(mid), axes, tilt, 0, 360, 255, -1, cv2.LINE_AA, 4)
    cv2.circle(mask, pt(neck + up * 0.1 * fh), int(round(0.08 * fh * sh)), 255, -1, cv2.LINE_AA, 4)
    shoulder = neck - up * 0.04 * fh
    for k in range(2):
        hand = shoulder + _rot(down, -face * float(track.arms[i, k])) * 0.3 * fh
        limb(shoulder, hand, 0.055 * fh)
        foot = hip + _rot(down, -face * float(track.legs[i, k])) * 0.4 * fh
        limb(hip, foot, 0.075 * fh)
    return mask


def _cast(
    label: int, rng: np.random.Generator, t: np.ndarray, width: int, height: int
) -> list[dict]:
    """Who is in the clip and how each moves: a list of pose tracks (see _Track)."""
    fh = rng.uniform(0.45, 0.8) * height
    ground = rng.uniform(0.55, 0.75) * height
    poses: list[dict] = []
    if label == 1:
        poses += _fight(rng, t, rng.uniform(0.3, 0.7) * width, ground, fh)
        bystanders = int(rng.choice([0, 0, 1, 2]))
    else:
        bystanders = int(rng.integers(2, 5))
        if rng.uniform() < 0.4:  # two people close together, chatting: contact without violence
            cx, gap = rng.uniform(0.3, 0.7) * width, rng.uniform(0.25, 0.45) * fh
            for side in (-1.0, 1.0):
                poses.append(_calm(rng, t, cx + side * gap / 2, ground, fh, height))
                poses[-1]["facing"] = -side
            bystanders -= 2
    for _ in range(bystanders):
        x0 = rng.uniform(0.1, 0.9) * width
        y0 = ground + rng.uniform(-0.1, 0.15) * height
        poses.append(_calm(rng, t, x0, y0, fh * rng.uniform(0.8, 1.1), height))
    if rng.uniform() < 0.25:  # someone walks past close to the camera, in either class
        x0 = rng.uniform(-0.1, 1.1) * width
        poses.append(_calm(rng, t, x0, 0.8 * height, fh * rng.uniform(1.2, 1.5), height, "walk"))
    return poses


def _exposure(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """(T,) brightness factor: sometimes an auto-exposure step of 10-25 % within 0.1-0.4 s."""
    if rng.uniform() >= 0.3:
        return np.ones_like(t)
    start, length = rng.uniform(0, t[-1] + 1e-6), rng.uniform(0.1, 0.4)
    ramp = np.clip((t - start) / length, 0.0, 1.0)
    return 1.0 + rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.25) * ramp * ramp * (3 - 2 * ramp)


def render_clip(
    label: int,
    rng: np.random.Generator,
    width: int,
    height: int,
    frames: int,
    *,
    fps: float = 25.0,
    recording: Recording | None = None,
) -> np.ndarray:
    """Render one clip; everything random is drawn from `rng`, so equal rng states give equal clips.

    `recording` supplies the background and camera; None draws a fresh one from `rng`.

    Shape: (frames, height, width, 3) uint8 RGB.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label}")
    if frames < 1 or width < 32 or height < 32 or not fps > 0:
        raise ValueError(
            f"clip needs >= 1 frame, sides >= 32 and fps > 0, got {frames} x {width}x{height} at {fps}"
        )
    if recording is None:
        recording = make_recording(rng, width, height)
    bg = recording.background
    if bg.shape[0] < height + 2 * _MARGIN or bg.shape[1] < width + 2 * _MARGIN:
        raise ValueError(
            f"recording background {bg.shape[1]}x{bg.shape[0]} is too small for {width}x{height}"
        )
    t = np.arange(frames) / fps  # (T,) seconds
    tracks = [
        _Track(**pose, texture=_colour_texture(2 * height, 2 * width, rng, rng.uniform(90, 200)))
        for pose in _cast(label, rng, t, width, height)
    ]
    tracks.sort(key=lambda tr: float(tr.y[0]))  # farther (higher in the frame) figures first
    shake = np.zeros((frames, 2))  # (T, 2) camera offset: an AR(1) wobble, as of a pole in wind
    for i in range(1, frames):
        shake[i] = 0.8 * shake[i - 1] + rng.normal(0.0, 0.6 * recording.shake, 2)
    gain = recording.gain * rng.uniform(0.8, 1.2) * _exposure(rng, t)  # (T,)
    base = _MARGIN + rng.uniform(-4, 4, 2)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        ox, oy = base + shake[i]
        warp = np.float32([[1, 0, -ox], [0, 1, -oy]])
        frame = cv2.warpAffine(bg, warp, (width, height), borderMode=cv2.BORDER_REFLECT)
        offset = np.array([_MARGIN - ox, _MARGIN - oy])  # figures move with the camera
        for tr in tracks:
            # Only the figure's neighbourhood (a body height around the hip) can be covered.
            cx, cy, reach = tr.x[i] + offset[0], tr.y[i] + offset[1], tr.height
            x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 2)
            y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 2)
            if x0 >= x1 or y0 >= y1:
                continue
            alpha = _draw_mask(tr, i, offset, height, width)[y0:y1, x0:x1, None] * np.float32(
                1 / 255
            )
            # The clothing texture is pinned to the hip, so it moves with the body (real flow).
            dx = int(np.clip(round(tr.x[i] - tr.x[0]), -(width // 2), width // 2))
            dy = int(np.clip(round(tr.y[i] - tr.y[0]), -(height // 2), height // 2))
            top, left = height // 2 - dy, width // 2 - dx
            cloth = tr.texture[top + y0 : top + y1, left + x0 : left + x1]
            frame[y0:y1, x0:x1] += alpha * (cloth - frame[y0:y1, x0:x1])
        frame *= gain[i]
        # Uniform noise of the same std: a quarter of the cost of Gaussian draws, looks the same.
        noise = rng.random(frame.shape, np.float32) - np.float32(0.5)
        frame += np.float32(recording.noise * math.sqrt(12.0)) * noise
        out[i] = np.rint(np.clip(frame, 0, 255))
    return out


def _plan(spec: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-clip labels (shuffled) and recordings (dealt round-robin, so each has both classes)."""
    rng = np.random.default_rng([spec.seed, 0])
    n_violent = int(round(spec.videos * spec.violent_fraction))
    labels = rng.permutation(np.r_[np.ones(n_violent, int), np.zeros(spec.videos - n_violent, int)])
    return labels, np.arange(spec.videos) % spec.recordings


def iter_clips(spec: SyntheticSpec = SyntheticSpec()) -> Iterator[SyntheticClip]:
    """The clips of `spec` with their ground-truth frames, in file order; deterministic in spec.seed."""
    labels, recs = _plan(spec)
    side = spec.size[1]
    recordings = [
        make_recording(np.random.default_rng([spec.seed, 1, r]), side, side)
        for r in range(spec.recordings)
    ]
    suffix = CONTAINERS[spec.container][0]
    for i, (label, rec) in enumerate(zip(labels.tolist(), recs.tolist(), strict=True)):
        rng = np.random.default_rng([spec.seed, 2, i])
        frames = int(rng.integers(spec.frames[0], spec.frames[1] + 1))
        width = int(rng.integers(spec.size[0], spec.size[1] + 1)) // 2 * 2
        height = int(rng.integers(spec.size[0], spec.size[1] + 1)) // 2 * 2
        fps = int(rng.choice(spec.fps))
        clip = render_clip(label, rng, width, height, frames, fps=fps, recording=recordings[rec])
        path = f"{CLASS_FOLDERS[label]}/{_FILE_PREFIX[label]}_{i:03d}{suffix}"
        yield SyntheticClip(path, label, f"rec{rec:02d}", fps, clip)


def generate_dataset(
    out_dir: str | Path, spec: SyntheticSpec = SyntheticSpec(), overwrite: bool = False
) -> Path:
    """Write the clips of `spec` under out_dir/Violence and out_dir/NonViolence, plus groups.csv.

    groups.csv has columns `video,group` (video = POSIX path relative to out_dir). An out_dir that
    is not empty is refused unless `overwrite`, which first removes the two class folders and
    groups.csv (and nothing else).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"{out} is not empty; choose a new or empty folder, or delete {out} first"
            )
        for name in CLASS_FOLDERS.values():
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "groups.csv").unlink(missing_ok=True)
    for name in CLASS_FOLDERS.values():
        (out / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for clip in iter_clips(spec):
        write_video(out / clip.path, clip.frames, clip.fps, fourcc=CONTAINERS[spec.container][1])
        rows.append((clip.path, clip.group))
    with open(out / "groups.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["video", "group"])
        writer.writerows(rows)
    log.info(
        "synthetic dataset: %d clips (%d violent) in %s",
        len(rows),
        sum(r[0].startswith("Violence/") for r in rows),
        out,
    )
    return out


def write_video(
    path: str | Path, frames_rgb: np.ndarray, fps: float, fourcc: str | None = None
) -> None:
    """Write (T, H, W, 3) uint8 RGB frames as a video, with `fourcc` or the suffix's codec.

    Codecs by suffix: .mp4 mp4v, .avi MJPG, .mkv FFV1 (lossless), .webm VP8, .mpg MPEG-1. Sides must be even: the
    encoders would silently drop an odd last row or column.
    """
    path = Path(path)
    frames_rgb = np.asarray(frames_rgb)
    if (
        frames_rgb.ndim != 4
        or frames_rgb.shape[-1] != 3
        or frames_rgb.dtype != np.uint8
        or len(frames_rgb) == 0
    ):
        raise ValueError(
            f"write_video: frames must be non-empty (T, H, W, 3) uint8, got {frames_rgb.dtype} {frames_rgb.shape}"
        )
    _, height, width, _ = frames_rgb.shape
    if height % 2 or width % 2:
        raise ValueError(f"write_video: frame sides must be even, got {width}x{height}")
    if fourcc is None:
        if path.suffix.lower() not in _FOURCC_BY_SUFFIX:
            raise ValueError(
                f"write_video: unknown suffix {path.suffix!r} (use one of {', '.join(_FOURCC_BY_SUFFIX)} or pass fourcc)"
            )
        fourcc = _FOURCC_BY_SUFFIX[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(
        str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height)
    )
    if not writer.isOpened():
        raise ValueError(f"write_video: OpenCV cannot write {fourcc} at {fps} fps to {path}")
    try:
        for frame in frames_rgb:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
