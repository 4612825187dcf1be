"""The three target/proposal rules of Faster R-CNN, named as in the reference implementation.

* :class:`AnchorTargetCreator` labels anchors and gives the RPN its regression targets.
* :class:`ProposalCreator` turns RPN outputs into region proposals (RoIs).
* :class:`ProposalTargetCreator` samples RoIs and gives the RoI head its targets.

Shape legend (one image): A = anchors (H*W*k), G = ground-truth boxes, R = RoIs.
Box conventions are those of :mod:`fasterrcnn.boxes`. Everything stays on the input's device
and is vectorised; sampling uses random keys, so it needs no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou, clip_boxes_to_image, nms, remove_small_boxes

from fasterrcnn.boxes import BoxCoder, nms_topk


def _rank(keys: Tensor) -> Tensor:
    """Position of each element of ``keys (N,)`` in ascending order: ``(N,)`` int64."""
    order = keys.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=keys.device)
    return rank


def subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float) -> Tensor:
    """Randomly keep at most ``int(num_samples * positive_fraction)`` positives (label >= 1) and
    fill the rest of ``num_samples`` with negatives (label 0); all others become -1 (ignored).

    Uniform sampling without replacement, as ``numpy.random.choice(..., replace=False)`` in the
    reference, but with random keys instead of a host-side count.

    Args:
        labels: ``(N,)`` int64, -1 ignore, 0 negative, >= 1 positive.
    Returns:
        ``(N,)`` labels with the unsampled ones set to -1.
    """
    positive = labels >= 1
    negative = labels == 0
    keys = torch.rand(labels.shape, device=labels.device)
    max_positive = int(num_samples * positive_fraction)
    keep_positive = positive & (_rank(torch.where(positive, keys, 2.0)) < max_positive)
    num_negative = num_samples - keep_positive.sum()
    keep_negative = negative & (_rank(torch.where(negative, keys, 2.0)) < num_negative)
    return torch.where(keep_positive | keep_negative, labels, labels.new_full((), -1))


class AnchorTargetCreator:
    """Assigns ground-truth boxes to anchors for training the RPN (Section 3.1.2).

    * only anchors lying fully inside the image are labelled (others: -1);
    * for each ground-truth box the anchor(s) of highest IoU, ties included, are positive;
    * an anchor with IoU >= ``pos_iou_thresh`` with any ground truth is positive;
    * an anchor whose IoU is below ``neg_iou_thresh`` for every ground truth is negative;
    * ``n_sample`` anchors are sampled with at most ``pos_ratio`` of them positive;
    * an image without objects yields only negatives.
    """

    def __init__(
        self,
        n_sample: int = 256,
        pos_iou_thresh: float = 0.7,
        neg_iou_thresh: float = 0.3,
        pos_ratio: float = 0.5,
        coder: BoxCoder | None = None,
    ) -> None:
        self.n_sample = n_sample
        self.pos_iou_thresh = pos_iou_thresh
        self.neg_iou_thresh = neg_iou_thresh
        self.pos_ratio = pos_ratio
        self.coder = coder or BoxCoder()

    @torch.no_grad()
    def __call__(self, anchors: Tensor, gt_boxes: Tensor, image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """
        Args:
            anchors: ``(A, 4)``.
            gt_boxes: ``(G, 4)``, G may be 0.
            image_size: ``(height, width)`` of the (resized) image.
        Returns:
            gt_labels ``(A,)`` int64 in {-1, 0, 1} and gt_deltas ``(A, 4)``, the regression targets
            (meaningful where the label is 1, zero elsewhere).
        """
        height, width = image_size
        inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= width) & (anchors[:, 3] <= height)
        labels = torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
        if gt_boxes.numel() == 0:
            labels[inside] = 0
            return subsample_labels(labels, self.n_sample, self.pos_ratio), torch.zeros_like(anchors)

        iou = box_iou(anchors, gt_boxes)  # (A, G)
        iou = torch.where(inside[:, None], iou, -1.0)  # outside anchors never win anything
        max_iou, matched = iou.max(dim=1)  # (A,)
        gt_max = iou.max(dim=0).values  # (G,)
        # The best anchor of each ground truth (all of them on ties). A ground truth that overlaps
        # no inside anchor at all (gt_max == 0) gets none rather than every zero-IoU anchor.
        best_of_some_gt = ((iou == gt_max[None]) & (gt_max[None] > 0)).any(dim=1)

        labels = torch.where(inside & (max_iou < self.neg_iou_thresh), 0, labels)
        labels = torch.where(inside & (best_of_some_gt | (max_iou >= self.pos_iou_thresh)), 1, labels)
        labels = subsample_labels(labels, self.n_sample, self.pos_ratio)
        deltas = self.coder.encode(anchors, gt_boxes[matched])
        deltas = torch.where((labels == 1)[:, None], deltas, 0.0)
        return labels, deltas


class ProposalCreator:
    """Turns RPN outputs into proposals (Section 3.1 and 3.3 of the paper).

    Decode every anchor, clip to the image, drop boxes smaller than ``min_size`` pixels at the
    *original* image scale, keep the ``n_pre_nms`` highest by foreground probability, apply NMS
    at ``nms_thresh`` and keep the ``n_post_nms`` highest. Training and testing use different
    counts (12000 -> 2000 and 6000 -> 300 in the paper), chosen by the caller's ``training``.
    Proposals carry no gradient.
    """

    def __init__(
        self,
        nms_thresh: float = 0.7,
        n_train_pre_nms: int = 12000,
        n_train_post_nms: int = 2000,
        n_test_pre_nms: int = 6000,
        n_test_post_nms: int = 300,
        min_size: float = 16,
        coder: BoxCoder | None = None,
    ) -> None:
        self.nms_thresh = nms_thresh
        self.n_pre_nms = {"training": n_train_pre_nms, "testing": n_test_pre_nms}
        self.n_post_nms = {"training": n_train_post_nms, "testing": n_test_post_nms}
        self.min_size = min_size
        self.coder = coder or BoxCoder()

    @torch.no_grad()
    def __call__(
        self,
        deltas: Tensor,
        fg_scores: Tensor,
        anchors: Tensor,
        image_size: tuple[int, int],
        scale: float = 1.0,
        training: bool = True,
        n_post_nms: int | None = None,
    ) -> Tensor:
        """
        Args:
            deltas: ``(A, 4)`` predicted RPN deltas.
            fg_scores: ``(A,)`` foreground probabilities.
            anchors: ``(A, 4)``.
            image_size: ``(height, width)`` of the resized image.
            scale: resized / original image size, so ``min_size`` applies at the original scale.
            training: use the training counts (True) or the testing counts (False).
            n_post_nms: keep this many instead of the mode's count (proposal recall at 2000
                while testing); the first ``n`` of a longer list are the ``n`` proposals.
        Returns:
            rois ``(R, 4)`` sorted by decreasing score, R <= n_post_nms.
        """
        mode = "training" if training else "testing"
        boxes = clip_boxes_to_image(self.coder.decode(anchors, deltas.detach()), image_size)
        keep = remove_small_boxes(boxes, self.min_size * scale)
        boxes, scores = boxes[keep], fg_scores.detach()[keep]
        scores, order = scores.topk(min(self.n_pre_nms[mode], scores.numel()))
        boxes = boxes[order]
        n_post = n_post_nms or self.n_post_nms[mode]
        if boxes.device.type == "cpu":
            # The same boxes as torchvision's nms(...)[:n_post], without suppressing past the
            # n_post-th kept box: at 6000 -> 300 about 30x faster than the (one-thread) CPU kernel.
            keep = nms_topk(boxes, scores, self.nms_thresh, n_post)
        else:
            keep = nms(boxes, scores, self.nms_thresh)[:n_post]  # nms keeps score order
        return boxes[keep]


class ProposalTargetCreator:
    """Samples RoIs from the proposals and gives each its targets (Fast R-CNN, Section 2.3).

    The ground-truth boxes are added to the proposals. A RoI with IoU >= ``pos_iou_thresh`` with
    some ground truth is foreground and takes that box's class; one with IoU in
    ``[neg_iou_thresh_lo, neg_iou_thresh_hi)`` is background. ``n_sample`` RoIs are sampled with
    at most ``pos_ratio`` foreground. Regression targets are normalised by
    ``loc_normalize_mean`` and ``loc_normalize_std``.

    The output always has ``min(n_sample, R + G)`` rows; when too few background RoIs exist the
    filling rows carry label -1 and are ignored by the losses (so shapes stay fixed).
    """

    def __init__(
        self,
        n_sample: int = 128,
        pos_ratio: float = 0.25,
        pos_iou_thresh: float = 0.5,
        neg_iou_thresh_hi: float = 0.5,
        neg_iou_thresh_lo: float = 0.0,
        loc_normalize_mean: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        loc_normalize_std: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
    ) -> None:
        self.n_sample = n_sample
        self.pos_ratio = pos_ratio
        self.pos_iou_thresh = pos_iou_thresh
        self.neg_iou_thresh_hi = neg_iou_thresh_hi
        self.neg_iou_thresh_lo = neg_iou_thresh_lo
        self.coder = BoxCoder(loc_normalize_mean, loc_normalize_std)

    @torch.no_grad()
    def __call__(self, rois: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            rois: ``(R, 4)`` proposals.
            gt_boxes: ``(G, 4)``; gt_labels: ``(G,)`` in 1..K.
        Returns:
            sample_rois ``(S, 4)``, gt_roi_labels ``(S,)`` (-1 ignored, 0 background, 1..K),
            gt_roi_deltas ``(S, 4)`` normalised targets (zero unless foreground),
            with ``S = min(n_sample, R + G)``.
        """
        rois = torch.cat((rois, gt_boxes.to(rois.dtype)), dim=0)
        if gt_boxes.numel():
            iou = box_iou(rois, gt_boxes)  # (R+G, G)
            max_iou, matched = iou.max(dim=1)
            matched_boxes, matched_labels = gt_boxes[matched], gt_labels[matched]
        else:
            max_iou = rois.new_zeros(rois.shape[0])
            matched_boxes, matched_labels = rois, gt_labels.new_zeros(rois.shape[0])

        labels = torch.full_like(matched_labels, -1)
        background = (max_iou < self.neg_iou_thresh_hi) & (max_iou >= self.neg_iou_thresh_lo)
        labels = torch.where(background, 0, labels)
        labels = torch.where(max_iou >= self.pos_iou_thresh, matched_labels, labels)
        labels = subsample_labels(labels, self.n_sample, self.pos_ratio)

        # Take the sampled rows first (foreground, then background, then ignored filler).
        priority = (labels >= 1).float() * 2 + (labels == 0).float() + torch.rand(labels.shape, device=labels.device) * 0.5
        index = priority.topk(min(self.n_sample, labels.numel())).indices
        rois, labels, matched_boxes = rois[index], labels[index], matched_boxes[index]
        deltas = self.coder.encode(rois, matched_boxes)
        deltas = torch.where((labels >= 1)[:, None], deltas, 0.0)
        return rois, labels, deltas
