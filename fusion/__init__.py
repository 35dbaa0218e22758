"""Late fusion with learned weights, TTA, ensembles, metrics and reports."""
