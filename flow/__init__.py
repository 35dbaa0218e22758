"""Optical flow: TV-L1 and Farneback estimators (OpenCV and batched PyTorch) and dataset extraction."""

from __future__ import annotations

import importlib

# Public names and the module that defines each; imported on first use, so that importing the
# package stays cheap and the packages can use each other without import cycles.
_EXPORTS = {
    "estimate": "flow.api",
    "FlowEstimator": "flow.api",
    "flow_params": "flow.api",
    "resolve_backend": "flow.api",
    "TVL1": "flow.tvl1",
    "TVL1Params": "flow.tvl1",
    "Farneback": "flow.farneback",
    "FarnebackParams": "flow.farneback",
    "extract_dataset": "flow.extract",
    "ExtractConfig": "flow.extract",
    "ExtractSummary": "flow.extract",
    "resolve_device": "flow.devices",
    "synthetic_pair": "flow.groundtruth",
    "synthetic_pairs": "flow.groundtruth",
    "read_flo": "flow.groundtruth",
    "write_flo": "flow.groundtruth",
    "epe": "flow.groundtruth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
