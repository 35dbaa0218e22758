"""Late fusion with learned weights, TTA, ensembles, metrics and reports; the fuse/evaluate/cv/run/predict pipeline."""

from __future__ import annotations

import importlib

# Public names and the module that defines each; imported on first use, so that importing the
# package stays cheap and the packages can use each other without import cycles.
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
    "cross_validate": "fusion.pipeline",
    "run_job": "fusion.pipeline",
    "score_video": "fusion.predict",
    "Preset": "fusion.presets",
    "choose_preset": "fusion.presets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
