import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data.manifest import ManifestRow, write_manifest
from data.sampling import Sampling
from data.store import Store
from data.synthetic import render_clip, write_video
from flow.api import flow_params
from flow.extract import ExtractConfig, extract_dataset, failures_path, shard_rows

FAST = ExtractConfig(method="farneback", backend="opencv", sampling=Sampling(size=32), workers=1, rgb_codec="raw")


def _clip(tmp: Path, name: str, frames: int, label: int, seed: int) -> ManifestRow:
    rng = np.random.default_rng(seed)
    path = tmp / f"{name}.avi"
    write_video(path, render_clip(label, rng, 48, 40, frames), fps=10)
    return ManifestRow(video_id=name, path=str(path), label=label, group=f"g{seed % 3}", split="train")


@pytest.fixture()
def rows(tmp_path):
    return [_clip(tmp_path, f"v{i}", frames, i % 2, i) for i, frames in enumerate([5, 7, 8, 3])]


def test_every_video_gets_t_minus_one_flows(tmp_path, rows):
    summary = extract_dataset(rows, tmp_path / "s.h5", FAST)
    assert sorted(summary.written) == sorted(r.video_id for r in rows) and not summary.failures
    store = Store(tmp_path / "s.h5")
    assert store.validate() == []
    for row, frames in zip(rows, [5, 7, 8, 3]):
        rgb, fl = store.rgb(row.video_id), store.flow(row.video_id)
        assert rgb.shape == (frames, 32, 32, 3) and rgb.dtype == np.uint8
        assert fl.shape == (frames - 1, 32, 32, 2) and fl.dtype == np.float32
        attrs = store.attrs(row.video_id)
        assert attrs["label"] == row.label and attrs["group"] == row.group
        assert attrs["flow_method"] == "farneback" and attrs["flow_param_winsize"] == flow_params("farneback")["winsize"]
        assert tuple(attrs["source_size"]) == (48, 40)
        assert attrs["source_fps"] == pytest.approx(10, abs=0.5)
    assert summary.pairs == sum(f - 1 for f in [5, 7, 8, 3])


def test_flow_in_store_matches_the_estimator(tmp_path, rows):
    from flow.api import estimate

    extract_dataset(rows[:1], tmp_path / "s.h5", FAST)
    store = Store(tmp_path / "s.h5")
    rgb = store.rgb("v0")
    direct = estimate(rgb[:-1], rgb[1:], method="farneback", backend="opencv")
    stored = store.flow("v0")
    # The store's codec is lossy within its quantisation: compare to the bound's scale.
    assert np.abs(stored - np.clip(direct, -20, 20)).mean() < 0.2


def test_rerun_skips_completed_videos(tmp_path, rows):
    extract_dataset(rows[:2], tmp_path / "s.h5", FAST)
    summary = extract_dataset(rows, tmp_path / "s.h5", FAST)
    assert sorted(summary.skipped) == ["v0", "v1"]
    assert sorted(summary.written) == ["v2", "v3"]
    assert len(Store(tmp_path / "s.h5")) == 4


def test_resume_with_other_settings_is_refused(tmp_path, rows):
    extract_dataset(rows[:1], tmp_path / "s.h5", FAST)
    with pytest.raises(ValueError, match="new output path"):
        extract_dataset(rows, tmp_path / "s.h5", ExtractConfig(method="farneback", backend="opencv", sampling=Sampling(size=48), workers=1))


def test_broken_videos_are_skipped_and_recorded(tmp_path, rows):
    missing = tmp_path / "missing.mp4"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    good = Path(rows[2].path)
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(good.read_bytes()[:200])
    single = tmp_path / "single.avi"
    write_video(single, render_clip(1, np.random.default_rng(0), 48, 40, 1), fps=10)
    bad = [ManifestRow(p.stem, str(p), 1, p.stem, "train") for p in (missing, empty, text, truncated, single)]
    summary = extract_dataset(rows + bad, tmp_path / "s.h5", FAST)
    assert sorted(summary.written) == sorted(r.video_id for r in rows)
    assert sorted(f.video_id for f in summary.failures) == sorted(r.video_id for r in bad)
    with open(failures_path(tmp_path / "s.h5")) as fh:
        recorded = {r["video_id"]: r["reason"] for r in csv.DictReader(fh)}
    assert set(recorded) == {r.video_id for r in bad} and all(recorded.values())


def test_shards_are_disjoint_and_cover_everything(tmp_path, rows):
    from data.shards import merge

    parts = []
    for i in range(2):
        summary = extract_dataset(rows, tmp_path / "s.h5", ExtractConfig(**{**FAST.__dict__, "shard": (i, 2)}))
        parts.append(summary.store)
    assert parts[0] != parts[1]
    ids = [set(Store(p).video_ids) for p in parts]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {r.video_id for r in rows}
    merged = Store(merge(parts, tmp_path / "all.h5"))
    assert sorted(merged.video_ids) == sorted(r.video_id for r in rows) and merged.validate() == []
    assert [r.video_id for r in shard_rows(rows, 0, 2)] == sorted(r.video_id for r in rows)[0::2]


def test_kill_during_extraction_keeps_completed_videos(tmp_path):
    rows = [_clip(tmp_path, f"k{i:02d}", 9, i % 2, i) for i in range(24)]
    manifest = tmp_path / "m.csv"
    write_manifest(rows, manifest)
    store_path = tmp_path / "k.h5"
    cmd = [sys.executable, "-m", "cli", "extract", str(manifest), "-o", str(store_path), "--method", "tvl1",
           "--backend", "opencv", "--size", "48", "--workers", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    parts = Path(str(store_path) + ".parts")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("*.h5"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "extraction finished before it could be killed; make the job longer"
    children = _children(proc.pid)
    assert children, "the extraction should decode in worker processes"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)], "decoding workers outlived the killed extraction"
    store = Store(store_path)
    survivors = set(store.video_ids)
    assert 3 <= len(survivors) < len(rows)
    assert store.validate() == []
    for vid in survivors:
        assert store.flow(vid).shape == (8, 48, 48, 2)
    store.close()
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    final = Store(store_path)
    assert sorted(final.video_ids) == sorted(r.video_id for r in rows) and final.validate() == []


def _children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
