"""Evaluation and outputs: metrics, plots, the run report, prediction and ONNX export."""

from cudacnn.evaluate.metrics import EvalResult, confusion_matrix, evaluate, per_class_metrics

__all__ = ["EvalResult", "confusion_matrix", "evaluate", "per_class_metrics"]
