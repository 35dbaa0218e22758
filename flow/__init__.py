"""Optical flow: TV-L1 and Farneback estimators (OpenCV and batched PyTorch) and dataset extraction."""

from __future__ import annotations

from data.lazy_exports import lazy_exports

# Public names and the module that defines each, imported on first use (data.lazy_exports).
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

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
