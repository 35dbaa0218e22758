"""Videos, dataset layouts, manifests, splits, the HDF5 store, clip datasets and augmentation."""

from __future__ import annotations

from data.lazy_exports import lazy_exports

# Public names and the module that defines each, imported on first use (data.lazy_exports).
_EXPORTS = {
    "read_video": "data.video",
    "iter_frames": "data.video",
    "probe": "data.video",
    "VideoInfo": "data.video",
    "VideoReadError": "data.video",
    "Sampling": "data.sampling",
    "sample_indices": "data.sampling",
    "ManifestRow": "data.manifest",
    "read_manifest": "data.manifest",
    "write_manifest": "data.manifest",
    "summarize": "data.manifest",
    "video_id_for": "data.manifest",
    "index_dataset": "data.layouts",
    "detect_layout": "data.layouts",
    "group_kfold": "data.splits",
    "assign_splits": "data.splits",
    "fold_split": "data.splits",
    "SyntheticSpec": "data.synthetic",
    "generate_dataset": "data.synthetic",
    "render_clip": "data.synthetic",
    "write_video": "data.synthetic",
    "Store": "data.store",
    "StoreWriter": "data.store",
    "merge": "data.shards",
    "shard_path": "data.store",
    "write_index": "data.shards",
    "recode_rgb": "data.shards",
    "MissingVideoError": "data.store",
    "MissingDatasetError": "data.store",
    "CorruptStoreError": "data.store",
    "FeatureCacheError": "data.store",
    "encode": "data.flowcodec",
    "decode": "data.flowcodec",
    "get_codec": "data.flowcodec",
    "ClipConfig": "data.clips",
    "ClipDataset": "data.clips",
    "video_ids_for_split": "data.clips",
    "normalize_clip": "data.clips",
    "clip_inputs": "data.clips",
    "AugmentConfig": "data.augment",
    "augment_clip": "data.augment",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
