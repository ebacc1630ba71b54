"""Evaluation: object matching, metrics and the model comparison report.

``evaluate_coco(gt, results, ...)`` is the entry point of the training engine and
``train_net.py --eval-only``; ``evaluate(...)`` returns per-image and per-class detail;
``tools/evaluate.py`` (``detector.cli.evaluate``) writes tables, ``metrics.json``, a per-image
CSV and the comparison report.
"""
from .evaluator import Evaluation, evaluate, evaluate_coco
from .inputs import EvaluationInputError, load_gt, load_predictions

__all__ = ["Evaluation", "EvaluationInputError", "evaluate", "evaluate_coco", "load_gt",
           "load_predictions"]
