"""Evaluation: object matching, metrics and the model comparison report."""
