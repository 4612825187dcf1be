"""Anchor coverage: how well can an anchor config match the ground truth, before any training?

Shape legend: A anchors of one image (h*w*k), G ground-truth boxes of one image.

Pure: ground-truth boxes, an :class:`~fasterrcnn.anchors.AnchorGenerator` and image sizes in,
numbers out (no config, no files). :func:`anchor_coverage` measures, over some images,

* the best IoU of each box with an anchor the RPN is trained on (one lying inside the image,
  the rule of AnchorTargetCreator, :func:`fasterrcnn.boxes.inside_image`): the share of boxes
  reaching each threshold (0.7, a positive by threshold, and 0.5) and the median;
* given an :class:`~fasterrcnn.creators.AnchorTargetCreator`, the positive anchors per image it
  labels with its real rules (its :class:`~fasterrcnn.matcher.Matcher`: inside anchors only, the
  best anchor of each box, IoU >= pos_iou_thresh), after its sampling (at most
  n_sample * pos_ratio) and before it, and how many of those are positive only as the best
  anchor of a box (IoU below pos_iou_thresh; all tied anchors count, e.g. every large anchor
  that contains a small box has the same IoU with it).

``scripts/anchor_coverage.py`` (:mod:`fasterrcnn.analysis.coverage_report`) compares anchor
configs with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn.boxes import inside_image
from fasterrcnn.creators import AnchorTargetCreator, subsample_labels
from fasterrcnn.matcher import match_iou

IOU_THRESHOLDS = (0.7, 0.5)
Size = tuple[int, int]  # (height, width)


@dataclass
class Sample:
    """One image as the RPN sees it: resized ``image_size`` (H, W), the trunk's
    ``feature_size`` (h, w) and the ``gt_boxes (G, 4)`` in resized coordinates."""

    image_size: Size
    feature_size: Size
    gt_boxes: Tensor


@dataclass
class Coverage:
    """The coverage of one anchor config over some images. The positive counts are per image,
    None when no AnchorTargetCreator was given."""

    num_images: int
    num_boxes: int
    share_iou: dict[float, float]  # threshold -> share of boxes whose best anchor reaches it (nan: no box)
    median_iou: float  # nan: no box
    positives: float | None = None  # after AnchorTargetCreator's sampling
    positives_unsampled: float | None = None  # before it
    positives_low_iou: float | None = None  # before sampling, below pos_iou_thresh (best-of-box matches)


def best_anchor_iou(anchors: Tensor, gt_boxes: Tensor, image_size: Size) -> Tensor:
    """``(G,)``: the highest IoU of each ground-truth box ``(G, 4)`` with an anchor ``(A, 4)``
    inside the image (0 where no anchor is inside), as the Matcher computes it."""
    return match_iou(anchors, gt_boxes, valid=inside_image(anchors, image_size)).gt_max_iou.clamp(min=0)


def count_positives(creator: AnchorTargetCreator, anchors: Tensor, gt_boxes: Tensor, image_size: Size) -> tuple[int, int, int]:
    """Positive anchors that ``creator`` labels for one image: after sampling, before it, and
    how many of those before it have an IoU below ``creator.pos_iou_thresh`` (positive only as
    the best anchor of a box, ties included).

    "Before" is the labelling of the creator's own Matcher; "after" applies its sampling
    (:func:`fasterrcnn.creators.subsample_labels`) to those labels, as the creator does."""
    inside = inside_image(anchors, image_size)
    match = creator.matcher.match(anchors, gt_boxes, valid=inside)
    labels = creator.matcher.label(match, valid=inside)  # (A,)
    positive = labels == 1
    sampled = int((subsample_labels(labels, creator.n_sample, creator.pos_ratio) == 1).sum())
    low = int((positive & (match.max_iou < creator.pos_iou_thresh)).sum())
    return sampled, int(positive.sum()), low


def anchor_coverage(
    generator: AnchorGenerator,
    samples: Sequence[Sample],
    creator: AnchorTargetCreator | None = None,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> Coverage:
    """The coverage of the anchors of ``generator`` over ``samples`` (see the module docstring);
    the positive counts only with a ``creator``.

    >>> gen = AnchorGenerator(scales=[2], ratios=[1], base_size=16, stride=16)  # 32 px anchors
    >>> cov = anchor_coverage(gen, [Sample((64, 64), (4, 4), torch.tensor([[8., 8., 40., 40.]]))])
    >>> cov.num_boxes, cov.share_iou, cov.median_iou
    (1, {0.7: 1.0, 0.5: 1.0}, 1.0)
    """
    if not samples:
        raise ValueError("no images to measure the anchor coverage on")
    best, counts = [], torch.zeros(3, dtype=torch.long)
    for sample in samples:
        anchors = generator(*sample.feature_size)  # (h*w*k, 4)
        best.append(best_anchor_iou(anchors, sample.gt_boxes, sample.image_size))
        if creator is not None:
            counts += torch.tensor(count_positives(creator, anchors, sample.gt_boxes, sample.image_size))
    ious = torch.cat(best)  # (sum of G,)
    nan = float("nan")
    per_image = [int(c) / len(samples) for c in counts] if creator is not None else [None] * 3
    return Coverage(
        len(samples),
        ious.numel(),
        {float(t): float((ious >= t).float().mean()) if ious.numel() else nan for t in thresholds},
        float(ious.quantile(0.5)) if ious.numel() else nan,
        *per_image,
    )
