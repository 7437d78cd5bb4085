"""What the evaluator measures: the plasticity probe (and its report)."""
