import h5py
import numpy as np
import pytest
import torch
from torch import nn

import streams.features as features_mod
from data.augment import AugmentConfig
from data.clips import ClipConfig, ClipDataset, normalize_clip
from streams.backbones import Backbone
from streams.features import FeatureDataset, cache_features, features_path, minority_label
from tests.data.test_clips import make_store

CFG = ClipConfig(steps=4, flow_stack=2)
# Three violent videos and one non-violent: label 0 is the minority.
VIDEOS = {
    "a": (9, 1, "g0", "train"),
    "b": (6, 1, "g1", "train"),
    "c": (5, 0, "g2", "val"),
    "d": (7, 1, "g3", "test"),
}


def mean_backbone(name, in_channels=3, pretrained=False, weights_path=None, image_size=224):
    """A stand-in frame encoder whose features are the per-channel means of each frame: (N, C)."""
    return Backbone(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), in_channels, in_channels, name)


@pytest.fixture()
def builds(monkeypatch):
    calls = []

    def build(*args, **kwargs):
        calls.append(args)
        return mean_backbone(*args, **kwargs)

    monkeypatch.setattr(features_mod, "build_backbone", build)
    return calls


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path / "s.h5", VIDEOS)


def _cache(store, stream="flow", **kw):
    kw.setdefault("clip_cfg", CFG)
    return cache_features(store, stream, "vgg19", device="cpu", batch_size=3, **kw)


def test_path_is_beside_the_store(tmp_path):
    assert features_path(tmp_path / "s.h5", "flow", "vgg19") == tmp_path / "s.h5.features-flow-vgg19.h5"


@pytest.mark.parametrize("labels, minority", [([1, 1, 0], 0), ([0, 0, 1], 1), ([0, 1], 0)])
def test_minority_label(labels, minority):
    assert minority_label(labels) == minority


def test_file_layout_views_and_attrs(store, builds):
    path = _cache(store, views=2, minority_views=5)
    assert path == features_path(store, "flow", "vgg19") and path.exists()
    assert not path.with_name(path.name + ".partial").exists()
    with h5py.File(path, "r") as f:
        assert sorted(f["videos"]) == sorted(VIDEOS)
        for video_id, (_, label, _, _) in VIDEOS.items():
            group = f["videos"][video_id]
            n_views = 5 if label == 0 else 2
            assert group["features"].dtype == np.float16 and group["features"].shape == (n_views, 4, 4)
            assert group["index"].dtype == np.int64 and group["index"].shape == (n_views, 4)
            assert group.attrs["label"] == label and group.attrs["views"] == n_views
        attrs = dict(f.attrs)
    assert attrs["backbone"] == "vgg19" and attrs["stream"] == "flow" and attrs["feature_dim"] == 4
    assert attrs["views"] == 2 and attrs["minority_views"] == 5 and attrs["minority_label"] == 0
    assert '"steps": 4' in attrs["clip"] and attrs["store"] == str(store.resolve())
    assert "synthetic" in attrs["store_flow"]  # the store's flow method travels with the features


@pytest.mark.parametrize("stream", ["rgb", "flow"])
def test_view_features_are_the_backbone_on_clip_views(store, builds, stream):
    path = _cache(store, stream, views=3, seed=4)
    with h5py.File(path, "r") as f:
        feats = f["videos"]["a"]["features"][:]
        index = f["videos"]["a"]["index"][:]
    for view in range(3):
        item = ClipDataset(store, ["a"], stream, CFG, AugmentConfig(), seed=4, view=view)[0]
        expected = normalize_clip(item["clip"], stream, item.get("bound")).mean(dim=(-2, -1))  # (T, C): the mean backbone
        np.testing.assert_allclose(feats[view], expected.numpy(), rtol=2e-3, atol=2e-3)
        assert index[view].tolist() == item["index"].tolist()
    # View 0 is the plain uniform clip: 9 frames, or 7 whole stacks of 2 of the 8 fields.
    assert index[0].tolist() == ([0, 3, 5, 8] if stream == "rgb" else [0, 2, 4, 6])
    assert not np.allclose(feats[1], feats[2])


def test_rerun_with_same_settings_does_no_work(store, builds):
    first = _cache(store, views=2)
    stamp = first.stat().st_mtime_ns
    assert _cache(store, views=2) == first and first.stat().st_mtime_ns == stamp
    assert len(builds) == 1
    _cache(store, views=3)  # other settings: computed again
    assert len(builds) == 2
    with h5py.File(first, "r") as f:
        assert f.attrs["views"] == 3


def test_hoghof_features_of_another_descriptor_version_are_recomputed(store, monkeypatch):
    import streams.features as features

    def cache():
        return cache_features(store, "flow", "hoghof", device="cpu", batch_size=3, clip_cfg=CFG)

    first = cache()
    with h5py.File(first, "r") as f:
        assert f.attrs["encoder_version"] == features.HOGHOF_VERSION
    stamp = first.stat().st_mtime_ns
    assert cache().stat().st_mtime_ns == stamp  # same version: reused
    monkeypatch.setattr(features, "HOGHOF_VERSION", features.HOGHOF_VERSION + 1)
    cache()
    with h5py.File(first, "r") as f:
        assert f.attrs["encoder_version"] == features.HOGHOF_VERSION


def _labels(path):
    with h5py.File(path, "r") as f:
        return {v: int(g.attrs["label"]) for v, g in f["videos"].items()}


def test_a_store_extracted_again_at_its_path_is_cached_again(store, builds, tmp_path):
    from data.store import Store, store_identity

    first = _cache(store)
    with h5py.File(first, "r") as f:
        made_from = f.attrs["store_id"]
    with Store(store) as s:
        assert made_from == store_identity(s.root_attrs) != ""

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupted run on the old store must not be resumed either
        _cache(store, out_path=tmp_path / "f.h5", on_progress=stop_after_two)
    store.unlink()
    flipped = {v: (frames, 1 - label, group, split) for v, (frames, label, group, split) in VIDEOS.items()}
    make_store(store, flipped)
    assert _cache(store) == first and len(builds) == 3
    with h5py.File(first, "r") as f:
        assert f.attrs["store_id"] != made_from
    assert _labels(first) == {v: label for v, (_, label, _, _) in flipped.items()}
    progress = []
    _cache(store, out_path=tmp_path / "f.h5", on_progress=lambda d, t: progress.append(d))
    assert progress[0] == 0 and _labels(tmp_path / "f.h5") == _labels(first)


def test_a_video_relabelled_in_place_is_cached_again(store, builds):
    first = _cache(store)
    with h5py.File(store, "a") as f:  # the store keeps its identity
        f["videos"]["a"].attrs["label"] = 0
    _cache(store)
    assert len(builds) == 2 and _labels(first)["a"] == 0


@pytest.mark.parametrize("backbone, versioned", [("hoghof", True), ("vgg19", False), ("resnet50", False)])
def test_encoder_version_tracks_hand_crafted_descriptors_only(backbone, versioned):
    from streams.hoghof import VERSION

    assert features_mod.encoder_version(backbone) == (VERSION if versioned else 0)


def test_temporal_rgb_features_are_cached_per_clip_as_the_model_computes_them(store):
    # hoghof's RGB features describe change between steps: the cache must hand it whole clips,
    # exactly as StreamModel.forward_features does at prediction time.
    from streams.backbones import build_backbone

    path = cache_features(store, "rgb", "hoghof", device="cpu", batch_size=3, clip_cfg=CFG)
    clips = ClipDataset(store, ["a", "b", "c", "d"], "rgb", CFG)
    expected = build_backbone("hoghof", 3).forward_clips(
        normalize_clip(torch.stack([clips[i]["clip"] for i in range(4)]), "rgb"))  # (4, T, D)
    cached = FeatureDataset(path, ["a", "b", "c", "d"])
    for i in range(4):
        torch.testing.assert_close(cached[i]["features"], expected[i].half().float())


def test_interrupted_run_resumes_per_video(store, builds, tmp_path):
    reference = _cache(store, views=2, out_path=tmp_path / "ref.h5")

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    out = tmp_path / "f.h5"
    with pytest.raises(KeyboardInterrupt):
        _cache(store, views=2, out_path=out, on_progress=stop_after_two)
    assert not out.exists() and out.with_name("f.h5.partial").exists()
    progress = []
    _cache(store, views=2, out_path=out, on_progress=lambda d, t: progress.append(d))
    assert progress[0] == 2 and progress[-1] == 4  # two videos were kept from the first run
    with h5py.File(out, "r") as f, h5py.File(reference, "r") as g:
        for video_id in VIDEOS:
            np.testing.assert_array_equal(f["videos"][video_id]["features"][:], g["videos"][video_id]["features"][:])


def test_unreadable_partial_file_is_started_over(store, builds, tmp_path):
    out = tmp_path / "f.h5"
    out.with_name("f.h5.partial").write_bytes(b"\x89HDF half written")
    _cache(store, out_path=out)
    assert sorted(FeatureDataset(out).video_ids) == sorted(VIDEOS)


def test_workers_give_the_same_features(store, builds, tmp_path):
    a = _cache(store, views=2, out_path=tmp_path / "a.h5")
    b = _cache(store, views=2, out_path=tmp_path / "b.h5", num_workers=2)
    with h5py.File(a, "r") as f, h5py.File(b, "r") as g:
        for video_id in VIDEOS:
            np.testing.assert_array_equal(f["videos"][video_id]["features"][:], g["videos"][video_id]["features"][:])


def test_real_vgg19_gives_fc7_features(tmp_path):
    path = make_store(tmp_path / "v.h5", {"x": (3, 1, "g", "train")})
    out = cache_features(path, "rgb", "vgg19", clip_cfg=ClipConfig(steps=2), device="cpu")
    item = FeatureDataset(out, ["x"])[0]
    assert item["features"].shape == (2, 4096) and torch.isfinite(item["features"]).all()
    assert (item["features"] >= 0).all()  # fc7 comes after a ReLU


class TestFeatureDataset:
    @pytest.fixture()
    def path(self, store, builds):
        return _cache(store, views=2, minority_views=6)

    def test_items(self, path):
        ds = FeatureDataset(path, ["c", "a"])
        item = ds[0]
        assert set(item) == {"video_id", "label", "features", "view"}
        assert item["video_id"] == "c" and item["label"].dtype == torch.float32 and item["label"].item() == 0.0
        assert item["features"].dtype == torch.float32 and item["features"].shape == (4, 4)
        assert item["view"].dtype == torch.int64 and item["view"].item() == 0
        with h5py.File(path, "r") as f:
            np.testing.assert_array_equal(item["features"].numpy(), f["videos"]["c"]["features"][0].astype(np.float32))
        assert ds.views.tolist() == [6, 2] and ds.labels.tolist() == [0, 1] and ds.feature_dim == 4

    def test_training_samples_views_by_seed_and_epoch(self, path):
        ds = FeatureDataset(path, ["c"], train=True, seed=1)
        seen = []
        for epoch in range(30):
            ds.set_epoch(epoch)
            seen.append(ds[0]["view"].item())
        again = FeatureDataset(path, ["c"], train=True, seed=1)
        again.set_epoch(7)
        assert again[0]["view"].item() == seen[7]
        assert set(seen) == set(range(6))  # every cached view comes up
        eval_ds = FeatureDataset(path, ["c"])
        eval_ds.set_epoch(7)
        assert eval_ds[0]["view"].item() == 0

    def test_missing_video_or_file(self, path, tmp_path):
        with pytest.raises(ValueError, match="no cached features"):
            FeatureDataset(path, ["a", "zzz"])
        with pytest.raises(FileNotFoundError, match="twostream features"):
            FeatureDataset(tmp_path / "none.h5", ["a"])


class TestUserMistakes:
    def test_missing_store(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="twostream extract"):
            cache_features(tmp_path / "none.h5", "rgb")

    def test_not_a_store(self, tmp_path):
        path = tmp_path / "notes.h5"
        path.write_text("not hdf5\n")
        with pytest.raises(ValueError, match="twostream extract"):
            cache_features(path, "rgb")

    def test_store_without_flow(self, store):
        with h5py.File(store, "a") as f:
            for group in f["videos"].values():
                del group["flow"]
        with pytest.raises(ValueError, match="no flow data.*twostream extract"):
            cache_features(store, "flow")

    def test_bad_settings(self, store):
        with pytest.raises(ValueError, match="train"):
            cache_features(store, "rgb", clip_cfg=ClipConfig(train=True))
        with pytest.raises(ValueError, match="views"):
            cache_features(store, "rgb", views=0)
        with pytest.raises(ValueError, match="stream"):
            cache_features(store, "depth")
