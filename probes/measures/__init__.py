"""What the evaluator measures: plasticity probe, curvature, statistics, diagnostics, the probe set."""
