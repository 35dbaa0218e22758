"""Late fusion with learned weights, TTA, ensembles, metrics and reports; the fuse/evaluate/cv/run/predict pipeline."""

from __future__ import annotations

from data.lazy_exports import lazy_exports

# Public names and the module that defines each, imported on first use (data.lazy_exports).
_EXPORTS = {
    "Predictions": "fusion.predictions",
    "read_predictions": "fusion.predictions",
    "write_predictions": "fusion.predictions",
    "fit_fusion": "fusion.late",
    "fuse": "fusion.late",
    "FusionModel": "fusion.late",
    "fit_ensemble": "fusion.ensemble",
    "combine": "fusion.ensemble",
    "choose_threshold": "fusion.threshold",
    "compute_metrics": "fusion.metrics",
    "write_report": "fusion.report",
    "tta_views": "fusion.tta",
    "fuse_run": "fusion.pipeline",
    "evaluate_run": "fusion.pipeline",
    "cross_validate": "fusion.crossval",
    "repeated_cross_validate": "fusion.crossval",
    "paired_comparison": "fusion.metrics",
    "run_job": "fusion.pipeline",
    "score_video": "fusion.predict",
    "Preset": "fusion.presets",
    "choose_preset": "fusion.presets",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
