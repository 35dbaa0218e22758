import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from data.augment import AugmentConfig
from data.clips import (
    ClipConfig,
    ClipDataset,
    clip_inputs,
    crop_positions,
    normalize_clip,
    read_rows,
    stack_fields,
    uniform_positions,
    video_ids_for_split,
)
from data.store import Store, StoreWriter
from streams.backbones import normalize_flow, normalize_rgb

BOUND = 20.0
SIDE = 32


def video_arrays(frames: int, label: int, side: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Frames that say which they are and flow that says which field it is.

    RGB: red 200 on the left half and 20 on the right, green 5 * t, blue 100 * label.
    Flow field i: dx = 0.5 * (i + 1) on the left half and 0 on the right, dy = -0.25 * (i + 1).
    """
    half = side // 2
    rgb = np.zeros((frames, side, side, 3), np.uint8)
    rgb[:, :, :half, 0] = 200
    rgb[:, :, half:, 0] = 20
    rgb[..., 1] = (5 * np.arange(frames) % 256)[:, None, None]
    rgb[..., 2] = 100 * label
    flow = np.zeros((frames - 1, side, side, 2), np.float32)
    steps = np.arange(1, frames, dtype=np.float32)[:, None, None]
    flow[:, :, :half, 0] = 0.5 * steps
    flow[..., 1] = -0.25 * steps
    return rgb, flow


def make_store(path: Path, videos: dict, side: int = SIDE) -> Path:
    """A store of synthetic videos: {video_id: (frames, label, group, split)}; float16 flow, exact."""
    with StoreWriter(path, flow_codec="float16", rgb_codec="raw", bound=BOUND, root_attrs={"flow_method": "synthetic"}) as w:
        for video_id, (frames, label, group, split) in videos.items():
            rgb, flow = video_arrays(frames, label, side)
            attrs = dict(label=label, group=group, split=split, source_path=f"/videos/{video_id}.mp4",
                         source_fps=10.0, source_size=[side, side], flow_method="synthetic")
            w.write(video_id, rgb, flow, attrs)
    return path


VIDEOS = {
    "long": (31, 1, "g0", "train"),
    "odd": (5, 0, "g1", "train"),
    "pair": (2, 1, "g2", "val"),
    "mid": (12, 0, "g3", "test"),
}
FLIP = AugmentConfig(hflip_p=1.0, scale_range=(1.0, 1.0), rotation_deg=0.0, brightness=0.0, contrast=0.0,
                     saturation=0.0, frame_rate_range=(1.0, 1.0), temporal_dropout=0.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("clips") / "s.h5", VIDEOS)


def _item(store, video_id, stream, **kw):
    """The dataset's item with its network input (the normalised clip) added as "input"."""
    cfg = kw.pop("cfg", ClipConfig(steps=8, flow_stack=3))
    item = ClipDataset(store, [video_id], stream, cfg, **kw)[0]
    return {**item, "input": _input(item, stream)}


def _input(item: dict, stream: str) -> torch.Tensor:
    return normalize_clip(item["clip"], stream, item.get("bound"))


def _left_right(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of the left and right halves over (..., H, W), excluding the two middle columns."""
    w = x.shape[-1]
    return x[..., : w // 2 - 1].mean(dim=(-2, -1)), x[..., w // 2 + 1 :].mean(dim=(-2, -1))


class TestPositions:
    @pytest.mark.parametrize(
        "count, steps, expected",
        [
            (31, 16, list(range(0, 31, 2))),
            (5, 8, [0, 1, 2, 3, 4, 4, 4, 4]),
            (1, 3, [0, 0, 0]),
            (10, 10, list(range(10))),
            (7, 1, [3]),
        ],
    )
    def test_uniform(self, count, steps, expected):
        assert uniform_positions(count, steps).tolist() == expected

    def test_crop_stays_inside_and_moves(self):
        starts = set()
        for s in range(30):
            pos = crop_positions(100, 8, 0.5, np.random.default_rng(s))
            assert pos.min() >= 0 and pos.max() <= 99 and np.all(np.diff(pos) >= 0)
            assert pos[-1] - pos[0] <= 0.5 * 99 + 1  # half the uniform span
            starts.add(int(pos[0]))
        assert len(starts) > 5

    def test_full_crop_of_a_long_video_is_uniform_spacing(self):
        pos = crop_positions(31, 16, 1.0, np.random.default_rng(0))
        assert pos.tolist() == list(range(0, 31, 2))

    def test_read_rows_reads_runs_as_slices_and_reorders(self):
        data = np.arange(20) * 10
        calls = []

        def fetch(rows):
            calls.append(rows)
            return data[rows]

        index = np.array([7, 3, 4, 3, 12, 5, 13])
        assert read_rows(fetch, index).tolist() == data[index].tolist()
        assert calls == [slice(3, 6), slice(7, 8), slice(12, 14)]

    def test_stack_clamps_at_the_end(self):
        assert stack_fields(np.array([0, 2, 3]), 4, 3).tolist() == [[0, 1, 2], [2, 3, 3], [3, 3, 3]]


class TestItems:
    @pytest.mark.parametrize("stream, channels", [("rgb", 3), ("flow", 6)])
    @pytest.mark.parametrize("size", [None, 16])
    def test_keys_shapes_dtypes(self, store, stream, channels, size):
        item = _item(store, "long", stream, cfg=ClipConfig(steps=8, flow_stack=3, size=size))
        keys = {"video_id", "label", "clip", "index", "input"}
        assert set(item) == (keys | {"bound"} if stream == "flow" else keys)
        assert item["video_id"] == "long"
        assert item["label"].dtype == torch.float32 and item["label"].shape == () and item["label"].item() == 1.0
        side = size or SIDE
        dtype = torch.uint8 if stream == "rgb" else torch.float16
        assert item["clip"].dtype == dtype and item["clip"].shape == (8, channels, side, side)
        assert item["clip"].is_contiguous()
        assert item["input"].dtype == torch.float32 and item["input"].shape == (8, channels, side, side)
        assert item["index"].dtype == torch.int64 and item["index"].shape == (8,)
        if stream == "flow":
            assert item["bound"].dtype == torch.float32 and item["bound"].item() == BOUND

    def test_rgb_eval_is_uniform_and_holds_those_frames(self, store):
        item = _item(store, "long", "rgb", cfg=ClipConfig(steps=16))
        assert item["index"].tolist() == list(range(0, 31, 2))
        rgb, _ = video_arrays(31, 1)
        frames = torch.from_numpy(rgb[item["index"].numpy()])  # (T, H, W, 3)
        assert torch.equal(item["clip"], frames.permute(0, 3, 1, 2))
        assert torch.equal(item["input"], normalize_rgb(frames))

    def test_flow_steps_stack_l_consecutive_fields(self, store):
        item = _item(store, "long", "flow", cfg=ClipConfig(steps=4, flow_stack=3))
        # 30 fields, stacks of 3: starts spread over 0..27.
        assert item["index"].tolist() == [0, 9, 18, 27]
        clip = item["input"]  # (T, 2L, H, W): dx_1, dy_1, dx_2, ...
        for t, start in enumerate(item["index"].tolist()):
            for j in range(3):
                field = start + j
                assert clip[t, 2 * j, 0, 0].item() == pytest.approx(0.5 * (field + 1) / BOUND)
                assert clip[t, 2 * j, 0, -1].item() == 0.0
                assert clip[t, 2 * j + 1, 5, 5].item() == pytest.approx(-0.25 * (field + 1) / BOUND)

    def test_short_odd_video_pads_with_its_last_frame(self, store):
        rgb = _item(store, "odd", "rgb")
        assert rgb["index"].tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
        torch.testing.assert_close(rgb["clip"][5], rgb["clip"][4])
        flow = _item(store, "odd", "flow")  # 4 fields, stacks of 3: two whole stacks, then repeats
        assert flow["index"].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
        dx_last = flow["input"][1, 4, 0, 0].item() * BOUND  # third field of the stack at 1 = field 3
        assert dx_last == pytest.approx(2.0)

    def test_two_frame_video_repeats_its_only_field(self, store):
        flow = _item(store, "pair", "flow", cfg=ClipConfig(steps=5, flow_stack=5))
        assert flow["index"].tolist() == [0] * 5
        assert torch.allclose(flow["input"][:, 0::2, 0, 0], torch.full((5, 5), 0.5 / BOUND))

    def test_resize_scales_flow_vectors(self, store):
        item = _item(store, "long", "flow", cfg=ClipConfig(steps=4, flow_stack=3, size=16))
        # Halving the frame halves the motion in pixels.
        assert item["input"][0, 0, 0, 0].item() == pytest.approx(0.25 / BOUND)
        assert item["input"][0, 1, 5, 5].item() == pytest.approx(-0.125 / BOUND)

    def test_bad_arguments(self, store):
        with pytest.raises(ValueError, match="stream"):
            ClipDataset(store, ["long"], "depth", ClipConfig())
        with pytest.raises(ValueError, match="steps"):
            ClipConfig(steps=0)
        with pytest.raises(ValueError, match="size"):
            ClipConfig(size=8)
        with pytest.raises(FileNotFoundError):
            ClipDataset(store.parent / "none.h5", ["long"], "rgb")


class TestTraining:
    def _indices(self, store, seed, epoch, augment=None, video="long"):
        ds = ClipDataset(store, [video], "rgb", ClipConfig(steps=8, train=True, min_crop=0.5), augment, seed=seed)
        ds.set_epoch(epoch)
        return ds[0]["index"].tolist()

    def test_deterministic_given_seed_and_epoch(self, store):
        assert self._indices(store, 3, 1) == self._indices(store, 3, 1)
        draws = {tuple(self._indices(store, 3, e)) for e in range(8)}
        assert len(draws) > 3  # new crops each epoch
        assert {tuple(self._indices(store, s, 0)) for s in range(8)} != {tuple(self._indices(store, 3, 0))}

    def test_crops_stay_sorted_and_in_range(self, store):
        for epoch in range(10):
            idx = np.array(self._indices(store, 0, epoch, AugmentConfig()))
            assert idx.min() >= 0 and idx.max() <= 30 and np.all(np.diff(idx) >= 0)

    def test_eval_ignores_seed(self, store):
        a = ClipDataset(store, ["long"], "rgb", ClipConfig(steps=8), seed=1)[0]
        b = ClipDataset(store, ["long"], "rgb", ClipConfig(steps=8), seed=2)[0]
        torch.testing.assert_close(a["clip"], b["clip"])

    def test_faster_replay_scales_flow(self, store):
        fast = AugmentConfig(**{**FLIP.to_dict(), "hflip_p": 0.0, "frame_rate_range": (1.25, 1.25)})
        ds = ClipDataset(store, ["long"], "flow", ClipConfig(steps=4, flow_stack=1, train=True), fast)
        item = ds[0]
        fields = item["index"].numpy()
        assert _input(item, "flow")[:, 0, 0, 0].numpy() * BOUND == pytest.approx(1.25 * 0.5 * (fields + 1), rel=1e-4)


class TestViewsAndAugmentation:
    def test_view_zero_is_the_plain_clip(self, store):
        plain = _item(store, "long", "flow")
        view0 = _item(store, "long", "flow", augment=AugmentConfig(), view=0)
        torch.testing.assert_close(plain["clip"], view0["clip"])

    def test_views_are_fixed_draws(self, store):
        a1 = _item(store, "long", "rgb", augment=AugmentConfig(), view=1, seed=5)
        b1 = _item(store, "long", "rgb", augment=AugmentConfig(), view=1, seed=5)
        a2 = _item(store, "long", "rgb", augment=AugmentConfig(), view=2, seed=5)
        torch.testing.assert_close(a1["clip"], b1["clip"])
        assert not torch.equal(a1["clip"], a2["clip"])

    @pytest.mark.parametrize("mode", ["view", "train"])
    def test_flip_mirrors_frames_and_negates_dx(self, store, mode):
        cfg = ClipConfig(steps=4, flow_stack=2, train=mode == "train")
        rgb = _item(store, "long", "rgb", cfg=cfg, augment=FLIP, view=1)["input"]
        flow = _item(store, "long", "flow", cfg=cfg, augment=FLIP, view=1)["input"]
        red_left, red_right = _left_right(rgb[:, 0])
        assert torch.all(red_right > red_left)  # the bright half moved to the right
        dx_left, dx_right = _left_right(flow[:, 0::2])
        assert torch.all(dx_right < 0) and torch.allclose(dx_left, torch.zeros_like(dx_left))
        dy_left, dy_right = _left_right(flow[:, 1::2])
        assert torch.all(dy_left < 0) and torch.allclose(dy_left, dy_right)  # dy keeps its sign

    def test_both_streams_draw_the_same_geometry(self, store):
        aug = AugmentConfig(**{**FLIP.to_dict(), "hflip_p": 0.5})
        flips = []
        for seed in range(12):
            rgb = _input(ClipDataset(store, ["long"], "rgb", ClipConfig(steps=4, train=True), aug, seed=seed)[0], "rgb")
            flow = _input(ClipDataset(store, ["long"], "flow", ClipConfig(steps=4, train=True), aug, seed=seed)[0],
                          "flow")
            rgb_flipped = bool(_left_right(rgb[:, 0])[1].mean() > _left_right(rgb[:, 0])[0].mean())
            flow_flipped = bool(_left_right(flow[:, 0])[1].mean() < 0)
            assert rgb_flipped == flow_flipped
            flips.append(rgb_flipped)
        assert 0 < sum(flips) < len(flips)

    def test_full_augmentation_keeps_shapes(self, store):
        cfg = ClipConfig(steps=6, flow_stack=5, size=24, train=True)
        for stream, c in (("rgb", 3), ("flow", 10)):
            item = ClipDataset(store, list(VIDEOS), stream, cfg, AugmentConfig(), seed=1)[1]
            assert item["clip"].shape == (6, c, 24, 24) and torch.isfinite(_input(item, stream)).all()


class TestNormalisation:
    """Loader clips normalised on the device give what the dataset returned as float32 clips."""

    @staticmethod
    def _float32_clip(monkeypatch, ds: ClipDataset) -> torch.Tensor:
        """The item's clip computed in float32 throughout: the dataset as it was before float16 flow."""
        import data.clips

        keep = data.clips.channels_first
        monkeypatch.setattr(data.clips, "channels_first", lambda x, dtype=None: keep(x))
        try:
            return ds[0]["clip"]
        finally:
            monkeypatch.setattr(data.clips, "channels_first", keep)

    @pytest.mark.parametrize("size", [None, 24])
    def test_rgb_is_bit_identical_to_normalize_rgb_of_the_augmented_frames(self, store, size, monkeypatch):
        for cfg, augment, view in ((ClipConfig(steps=8, size=size), None, 0),
                                   (ClipConfig(steps=8, size=size, train=True), AugmentConfig(), 0),
                                   (ClipConfig(steps=8, size=size), AugmentConfig(), 2)):
            ds = ClipDataset(store, ["long"], "rgb", cfg, augment, seed=3, view=view)
            clip = ds[0]["clip"]  # (T, 3, H, W) uint8
            assert clip.dtype == torch.uint8
            expected = normalize_rgb(clip.permute(0, 2, 3, 1))  # what the dataset returned before
            assert torch.equal(normalize_clip(clip, "rgb"), expected)

    def test_flow_eval_is_bit_identical(self, store):
        item = _item(store, "long", "flow", cfg=ClipConfig(steps=4, flow_stack=3))
        _, flow = video_arrays(31, 1)
        fields = stack_fields(item["index"].numpy(), 30, 3)  # (T, L)
        expected = normalize_flow(torch.from_numpy(flow[fields]), BOUND)  # (T, 2L, H, W)
        assert torch.equal(item["input"], expected)

    @pytest.mark.parametrize("size", [None, 24])
    def test_augmented_flow_is_within_float16_rounding(self, store, size, monkeypatch):
        ds = ClipDataset(store, ["long"], "flow", ClipConfig(steps=6, flow_stack=3, size=size, train=True),
                         AugmentConfig(rotation_deg=30.0), seed=5)
        item = ds[0]
        reference = normalize_flow(self._float32_clip(monkeypatch, ds).unflatten(1, (3, 2)).movedim(2, -1), BOUND)
        ours = normalize_clip(item["clip"], "flow", item["bound"])
        assert not torch.equal(item["clip"].float(), self._float32_clip(monkeypatch, ds))  # rounding did happen
        torch.testing.assert_close(ours, reference, rtol=0.0, atol=2.0**-11)

    def test_a_batch_takes_one_bound_per_clip(self):
        clip = torch.full((2, 1, 2, 3, 3), 10.0, dtype=torch.float16)  # (B, T, 2L, H, W) px
        out = normalize_clip(clip, "flow", torch.tensor([20.0, 5.0]))
        assert out.dtype == torch.float32
        assert torch.all(out[0] == 0.5) and torch.all(out[1] == 1.0)  # 10 / 5 clipped to 1

    def test_rgb_known_values(self):
        clip = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
        clip[:, 0] = 255
        out = normalize_clip(clip, "rgb")
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        expected = [(1 - mean[0]) / std[0], -mean[1] / std[1], -mean[2] / std[2]]
        for c in range(3):
            assert out[0, c].flatten().tolist() == pytest.approx([expected[c]] * 4, rel=1e-6)

    @pytest.mark.parametrize("clip, stream, bound, match", [
        (torch.zeros(2, 4, 4, 4, dtype=torch.uint8), "rgb", None, "3 channels"),
        (torch.zeros(2, 2, 4, 4), "flow", None, "bound"),
        (torch.zeros(2, 2, 4, 4), "flow", 0.0, "bound must be > 0"),
        (torch.zeros(3, 2, 2, 4, 4), "flow", torch.ones(2), "one bound per clip"),
        (torch.zeros(3, 4, 4), "rgb", None, r"\(\.\.\., T, C, H, W\)"),
        (torch.zeros(2, 3, 4, 4), "depth", None, "unknown stream"),
    ])
    def test_bad_input(self, clip, stream, bound, match):
        with pytest.raises(ValueError, match=match):
            normalize_clip(clip, stream, bound)

    @pytest.mark.parametrize("stream", ["rgb", "flow"])
    def test_clip_inputs_of_a_loader_batch(self, store, stream):
        ds = ClipDataset(store, list(VIDEOS), stream, ClipConfig(steps=4, flow_stack=2))
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
        x = clip_inputs(batch, "cpu")  # (B, T, C, H, W)
        assert x.dtype == torch.float32 and x.shape == (3, 4, ds.cfg.channels(stream), SIDE, SIDE)
        for j in range(3):
            assert torch.equal(x[j], _input(ds[j], stream))
        already = {"clip": x}  # float clips without a bound pass through as network input
        assert torch.equal(clip_inputs(already, "cpu"), x)


def _open_fds_to(path: Path) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == str(path.resolve())
        except OSError:
            pass
    return n


class TestWorkers:
    def test_not_opened_in_the_parent_and_pickles(self, tmp_path):
        store = make_store(tmp_path / "lazy.h5", VIDEOS)  # a file nothing else has opened
        ds = ClipDataset(str(store), list(VIDEOS), "flow", ClipConfig(steps=4, flow_stack=2))
        clone = pickle.loads(pickle.dumps(ds))
        assert _open_fds_to(store) == 0
        item = clone[1]
        assert _open_fds_to(store) == 1  # reading opens it, once
        torch.testing.assert_close(item["clip"], ds[1]["clip"])

    def test_two_workers_yield_the_same_items(self, store):
        ds = ClipDataset(store, list(VIDEOS), "rgb", ClipConfig(steps=4, train=True), AugmentConfig(), seed=7)
        ds.set_epoch(2)

        def run(workers):
            loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers)
            return list(loader)

        serial, parallel = run(0), run(2)
        for a, b in zip(serial, parallel, strict=True):
            assert a["video_id"] == b["video_id"]
            torch.testing.assert_close(a["clip"], b["clip"])
            torch.testing.assert_close(a["index"], b["index"])


class TestSplits:
    def test_from_split_attrs(self, store):
        assert video_ids_for_split(store) == {"train": ["long", "odd"], "val": ["pair"], "test": ["mid"]}
        assert video_ids_for_split(Store(store), "val") == {"val": ["pair"]}

    def test_folds_keep_groups_apart_and_cover_everything(self, tmp_path):
        videos = {f"v{i:02d}": (3, i % 2, f"g{i // 2}", "") for i in range(16)}
        path = make_store(tmp_path / "f.h5", videos)
        tests = []
        for k in range(4):
            parts = video_ids_for_split(path, fold=(k, 4))
            groups = {name: {videos[v][2] for v in ids} for name, ids in parts.items()}
            assert not groups["train"] & groups["test"] and not groups["val"] & groups["test"]
            assert not groups["train"] & groups["val"]
            assert sorted(sum(parts.values(), [])) == sorted(videos)
            tests += parts["test"]
        assert sorted(tests) == sorted(videos)

    def test_videos_without_a_split_are_assigned_by_group(self, tmp_path):
        videos = {f"v{i:02d}": (3, i % 2, f"g{i // 2}", "") for i in range(20)}
        parts = video_ids_for_split(make_store(tmp_path / "a.h5", videos))
        assert all(parts.values())
        assert sorted(sum(parts.values(), [])) == sorted(videos)

    def test_bad_split_name(self, store):
        with pytest.raises(ValueError, match="unknown split"):
            video_ids_for_split(store, "holdout")
