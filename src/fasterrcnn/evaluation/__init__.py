"""Evaluation: PASCAL VOC AP as the official devkit computes it."""

from fasterrcnn.evaluation.voc import VOCEvaluator, matlab_colon, voc_ap

__all__ = ["VOCEvaluator", "matlab_colon", "voc_ap"]
