from pathlib import Path

import numpy as np
import pytest
import torch

from data.clips import ClipConfig, ClipDataset, normalize_clip, uniform_positions
from data.store import Store, StoreWriter
from fusion.tta import (
    MAX_VIEWS,
    ViewDataset,
    ViewSpec,
    average_predictions,
    check_tta,
    clip_from_arrays,
    predict_views,
    tta_views,
    view_positions,
)

BOUND = 20.0
SIDE = 32


def _arrays(frames: int, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames whose green channel counts time; flow dx = +4 px on the left half, 0 on the right, dy = -1."""
    rgb = np.zeros((frames, SIDE, SIDE, 3), np.uint8)
    rgb[:, :, : SIDE // 2, 0] = 200
    rgb[..., 1] = (7 * np.arange(frames) % 256)[:, None, None]
    rgb[..., 2] = 100 * label
    flow = np.zeros((frames - 1, SIDE, SIDE, 2), np.float32)
    flow[:, :, : SIDE // 2, 0] = 4.0
    flow[..., 1] = -1.0
    return rgb, flow


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tta") / "s.h5"
    with StoreWriter(path, flow_codec="float16", bound=BOUND) as w:
        for i, (n, label) in enumerate([(30, 1), (9, 0), (17, 1)]):
            rgb, flow = _arrays(n, label)
            attrs = dict(label=label, group=f"g{i}", split="test", source_path=f"/v{i}.mp4",
                         source_fps=10.0, source_size=[SIDE, SIDE], flow_method="synthetic")
            w.write(f"v{i}", rgb, flow, attrs)
    return path


class TestViews:
    def test_view_zero_is_the_plain_clip_and_grid_is_deterministic(self):
        assert tta_views(1) == [ViewSpec()]
        views = tta_views(MAX_VIEWS)
        assert views == tta_views(MAX_VIEWS)
        assert len(set(views)) == MAX_VIEWS  # every view differs from the others
        assert [v.flip for v in views[:4]] == [False, True, False, True]
        assert views[2].phase != 0 and views[8].zoom > 1

    @pytest.mark.parametrize("k", [0, -1])
    def test_fewer_than_one_view_is_refused(self, k):
        with pytest.raises(ValueError, match="--tta must be at least 1"):
            check_tta(k)

    def test_more_views_than_the_grid_is_refused(self):
        with pytest.raises(ValueError, match="at most"):
            tta_views(MAX_VIEWS + 1)

    @pytest.mark.parametrize("count,steps", [(30, 8), (9, 8), (5, 8), (100, 16)])
    def test_shifted_positions_stay_in_the_video(self, count, steps):
        assert np.array_equal(view_positions(count, steps, ViewSpec()), uniform_positions(count, steps))
        for phase in (0.5, -0.25, 0.25):
            pos = view_positions(count, steps, ViewSpec(phase=phase))
            assert len(pos) == steps and pos.min() >= 0 and pos.max() <= count - 1
            assert np.all(np.diff(pos) >= 0)

    def test_a_half_step_shift_moves_the_positions(self):
        base = view_positions(31, 4, ViewSpec())  # spacing 10
        shifted = view_positions(31, 4, ViewSpec(phase=0.5))
        assert base.tolist() == [0, 10, 20, 30]
        assert shifted.tolist() == [5, 13, 22, 30]  # span 5..30, cut at the end


def _input(item: dict) -> torch.Tensor:
    """A flow item's clip as network input."""
    return normalize_clip(item["clip"], "flow", item["bound"])


class TestClips:
    @pytest.mark.parametrize("stream", ["rgb", "flow"])
    @pytest.mark.parametrize("size", [None, 24])
    def test_view_zero_equals_the_evaluation_clip_dataset(self, store, stream, size):
        cfg = ClipConfig(steps=6, flow_stack=3, size=size)
        ours = ViewDataset(store, ["v0", "v1"], stream, cfg, ViewSpec())
        ref = ClipDataset(store, ["v0", "v1"], stream, cfg)
        for i in range(2):
            a, b = ours[i], ref[i]
            assert a["video_id"] == b["video_id"] and float(a["label"]) == float(b["label"])
            assert torch.equal(a["index"], b["index"])
            torch.testing.assert_close(a["clip"], b["clip"])
            assert set(a) == set(b)
            if stream == "flow":
                assert float(a["bound"]) == float(b["bound"]) == BOUND

    def test_flow_items_carry_the_bound_the_store_recorded(self, tmp_path):
        path = tmp_path / "b.h5"
        with StoreWriter(path, flow_codec="uint8", bound=7.5) as w:
            rgb, flow = _arrays(5, 1)
            w.write("v0", rgb, flow, dict(label=1, group="g0", split="test", source_path="/v0.mp4",
                                          source_fps=10.0, source_size=[SIDE, SIDE], flow_method="synthetic"))
        item = ViewDataset(path, ["v0"], "flow", ClipConfig(steps=2, flow_stack=2), ViewSpec())[0]
        assert float(item["bound"]) == 7.5
        assert _input(item).abs().max().item() == pytest.approx(4.0 / 7.5, abs=0.02)  # dx 4 px over a 7.5 px bound

    def test_flip_view_negates_dx_of_a_known_flow_clip(self, store):
        cfg = ClipConfig(steps=4, flow_stack=2)
        plain = _input(ViewDataset(store, ["v0"], "flow", cfg, ViewSpec())[0])  # (T, 2L, H, W)
        flipped = _input(ViewDataset(store, ["v0"], "flow", cfg, ViewSpec(flip=True))[0])
        dx, dy = slice(0, None, 2), slice(1, None, 2)
        left, right = slice(0, SIDE // 2 - 1), slice(SIDE // 2 + 1, SIDE)
        # Plain: +4/20 on the left, 0 on the right. Flipped: the motion sits on the right, pointing left.
        assert torch.allclose(plain[:, dx, :, left], torch.tensor(0.2))
        assert torch.allclose(flipped[:, dx, :, right], torch.tensor(-0.2))
        assert torch.allclose(flipped[:, dx, :, left], torch.tensor(0.0))
        assert torch.allclose(flipped[:, dy], plain[:, dy])  # vertical motion is untouched
        assert torch.allclose(flipped[:, dx], -plain[:, dx].flip(-1))

    def test_flip_mirrors_rgb(self, store):
        cfg = ClipConfig(steps=4)
        plain = ViewDataset(store, ["v0"], "rgb", cfg, ViewSpec())[0]["clip"]
        flipped = ViewDataset(store, ["v0"], "rgb", cfg, ViewSpec(flip=True))[0]["clip"]
        torch.testing.assert_close(flipped, plain.flip(-1))

    def test_centre_crop_scales_flow_vectors(self, store):
        cfg = ClipConfig(steps=3, flow_stack=1)
        view = tta_views(9)[8]  # first centre crop, zoom 8/7
        crop = _input(ViewDataset(store, ["v0"], "flow", cfg, view)[0])
        # dy = -1 px everywhere becomes -8/7 px once the crop is resized back (centre pixels).
        centre = crop[:, 1, SIDE // 2 - 4 : SIDE // 2 + 4, SIDE // 2 - 4 : SIDE // 2 + 4]
        assert torch.allclose(centre, torch.tensor(-8 / 7 / BOUND), atol=1e-4)

    @pytest.mark.parametrize("stream", ["rgb", "flow"])
    def test_arrays_and_store_give_the_same_clip(self, store, stream):
        cfg = ClipConfig(steps=5, flow_stack=2, size=20)
        view = ViewSpec(phase=0.5, flip=True)
        s = Store(store)
        frames, flow = s.rgb("v2"), s.flow("v2")
        clip, pos = clip_from_arrays(stream, frames, flow, cfg, view)
        item = ViewDataset(store, ["v2"], stream, cfg, view)[0]
        torch.testing.assert_close(clip, item["clip"])
        assert np.array_equal(pos, item["index"].numpy())


def test_predict_views_averages_logits_per_video(store):
    cfg = ClipConfig(steps=4, flow_stack=2)
    views = tta_views(3)

    def forward(clips):  # (N, T, C, H, W) -> (N,): the mean dx of the clip, + 1 for a mirrored clip
        return clips[:, :, 0].mean(dim=(1, 2, 3))

    ids, labels, logits, view = predict_views(forward, store, ["v0", "v1"], "flow", cfg, views, batch_size=1)
    assert len(ids) == 6 and view.tolist() == [0, 0, 1, 1, 2, 2]
    assert labels.tolist() == [1, 0] * 3
    # Mirroring negates dx, so plain + mirror cancel: the mean is the third view / 3.
    assert logits[2] == pytest.approx(-logits[0], abs=1e-6)
    pred = average_predictions(ids, labels, logits)
    assert pred.video_ids.tolist() == ["v0", "v1"]
    assert pred.logits[0] == pytest.approx(logits[4] / 3, abs=1e-6)
