"""The three target/proposal rules of Faster R-CNN, named as in the reference implementation.

* :class:`AnchorTargetCreator` labels anchors and gives the RPN its regression targets.
* :class:`ProposalCreator` turns RPN outputs into region proposals (RoIs).
* :class:`ProposalTargetCreator` samples RoIs and gives the RoI head its targets.

Shape legend (one image): A = anchors (H*W*k), G = ground-truth boxes, R = RoIs.
Box conventions are those of :mod:`fasterrcnn.boxes`. Everything stays on the input's device
and is vectorised; sampling uses random keys, so it needs no host synchronisation. On a GPU,
ProposalCreator is where the host waits: the number of boxes left after dropping the small
ones, and torchvision's CUDA NMS, which finishes its greedy pass on the host, depend on the
data (two syncs per image; the CPU keeps :func:`~fasterrcnn.boxes.nms_topk`). The IoU rules
of both target creators are a :class:`~fasterrcnn.matcher.Matcher`, whose memory stays bounded
however many objects an image holds.
"""

from __future__ import annotations


import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image, nms, remove_small_boxes

from fasterrcnn.boxes import BoxCoder, inside_image, nms_topk
from fasterrcnn.matcher import BEST_IOU_RTOL, MAX_CHUNK_ELEMENTS, Matcher


def _rank(keys: Tensor) -> Tensor:
    """Position of each element of ``keys (N,)`` in ascending order: ``(N,)`` int64."""
    order = keys.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=keys.device)
    return rank


def smallest(keys: Tensor, k: Tensor | int) -> Tensor:
    """``(N,)`` bool: the ``k`` smallest of ``keys (N,)`` (all of them when ``k >= N``).

    On the CPU ``topk`` (about 35x faster than sorting 30k anchor keys, which cost 3.5 ms of a
    training step); elsewhere the rank under a full sort, which needs no host-side ``k``."""
    if keys.device.type != "cpu":
        return _rank(keys) < k
    k = max(0, min(int(k), keys.numel()))
    mask = torch.zeros(keys.shape, dtype=torch.bool)
    mask[keys.topk(k, largest=False, sorted=False).indices] = True
    return mask


def subsample_labels(labels: Tensor, num_samples: int, positive_fraction: float) -> Tensor:
    """Randomly keep at most ``int(num_samples * positive_fraction)`` positives (label >= 1) and
    fill the rest of ``num_samples`` with negatives (label 0); all others become -1 (ignored).

    Uniform sampling without replacement, as ``numpy.random.choice(..., replace=False)`` in the
    reference, but with random keys instead of a host-side count: the positives (negatives)
    with the smallest keys are kept.

    Args:
        labels: ``(N,)`` int64, -1 ignore, 0 negative, >= 1 positive.
    Returns:
        ``(N,)`` labels with the unsampled ones set to -1.
    """
    positive = labels >= 1
    negative = labels == 0
    keys = torch.rand(labels.shape, device=labels.device)
    max_positive = int(num_samples * positive_fraction)
    keep_positive = positive & smallest(torch.where(positive, keys, 2.0), max_positive)
    num_negative = num_samples - keep_positive.sum()
    keep_negative = negative & smallest(torch.where(negative, keys, 2.0), num_negative)
    return torch.where(keep_positive | keep_negative, labels, labels.new_full((), -1))


class AnchorTargetCreator:
    """Assigns ground-truth boxes to anchors for training the RPN (Section 3.1.2).

    * only anchors lying fully inside the image are labelled (others: -1);
    * for each ground-truth box the anchor(s) of highest IoU are positive, ties included (within
      the relative tolerance :data:`~fasterrcnn.matcher.BEST_IOU_RTOL`, as float equality splits
      ties of equal geometry);
    * an anchor with IoU >= ``pos_iou_thresh`` with any ground truth is positive;
    * an anchor whose IoU is below ``neg_iou_thresh`` for every ground truth is negative;
    * ``n_sample`` anchors are sampled with at most ``pos_ratio`` of them positive;
    * an image without objects yields only negatives.

    ``best_iou_rtol``: the relative tolerance of those ties (0: float equality, as the reference
    implementation). ``max_chunk_elements``: the IoU matrix is computed in blocks of that many
    IoUs (None: whole).
    """

    def __init__(
        self,
        n_sample: int = 256,
        pos_iou_thresh: float = 0.7,
        neg_iou_thresh: float = 0.3,
        pos_ratio: float = 0.5,
        coder: BoxCoder | None = None,
        best_iou_rtol: float = BEST_IOU_RTOL,
        max_chunk_elements: int | None = MAX_CHUNK_ELEMENTS,
    ) -> None:
        self.n_sample = n_sample
        self.pos_iou_thresh = pos_iou_thresh
        self.neg_iou_thresh = neg_iou_thresh
        self.pos_ratio = pos_ratio
        self.coder = coder or BoxCoder()
        self.best_iou_rtol = best_iou_rtol
        self.max_chunk_elements = max_chunk_elements

    @property
    def matcher(self) -> Matcher:
        """The IoU rules above (built from the thresholds, so a changed threshold applies)."""
        return Matcher(
            self.pos_iou_thresh,
            self.neg_iou_thresh,
            allow_low_quality_matches=True,
            best_rtol=self.best_iou_rtol,
            max_chunk_elements=self.max_chunk_elements,
        )

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
        labels, matched = self.matcher(anchors, gt_boxes, valid=inside_image(anchors, image_size))  # (A,), (A,)
        labels = subsample_labels(labels, self.n_sample, self.pos_ratio)
        if gt_boxes.numel() == 0:
            return labels, torch.zeros_like(anchors)
        deltas = self.coder.encode(anchors, gt_boxes[matched])
        deltas = torch.where((labels == 1)[:, None], deltas, 0.0)
        return labels, deltas


# ProposalCreator runs nms_topk on the CPU when it keeps under 1 / NMS_TOPK_MAX_SHARE of the
# boxes, or when there are NMS_TOPK_MIN_BOXES or more (both give torchvision's nms(...)[:n],
# tests/test_bench.py): torchvision's one-thread kernel costs about (boxes x kept), and a
# detector trained on mosaics keeps many. On 30 images' proposals of the default run's detector
# (2 threads, ms per image): 6000 -> 2000 for recall@2000 at validation 13 against 36; 2000 -> 500
# on training mosaics 2.3-3.1 against 4.7-6.3, on validation images 2.8-3.1 against 3.3-3.7;
# below about 1000 boxes torchvision's kernel is faster (500 -> 250: 1.0 against 0.6).
NMS_TOPK_MAX_SHARE = 8
NMS_TOPK_MIN_BOXES = 1024


def nms_topk_is_faster(num_boxes: int, n_post: int) -> bool:
    """Whether :func:`~fasterrcnn.boxes.nms_topk` beats torchvision's CPU NMS for keeping
    ``n_post`` of ``num_boxes`` (the rule above)."""
    return n_post * NMS_TOPK_MAX_SHARE < num_boxes or num_boxes >= NMS_TOPK_MIN_BOXES


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
        boxes, scores = self._candidates(deltas, fg_scores, anchors, image_size, scale)
        return self._select(boxes, scores, self.n_pre_nms[mode], n_post_nms or self.n_post_nms[mode])[0]

    @torch.no_grad()
    def both(
        self,
        deltas: Tensor,
        fg_scores: Tensor,
        anchors: Tensor,
        image_size: tuple[int, int],
        scale: float = 1.0,
        n_test_post_nms: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The training and the testing proposals of one image (a validation step needs both):
        exactly ``self(..., training=True)`` and ``self(..., training=False, n_post_nms=
        n_test_post_nms)``, from one decoding and, where that gives the same boxes, one NMS.

        Greedy NMS decides a box from the higher-scored boxes alone, so NMS over the top
        ``n_train_pre_nms`` boxes keeps exactly the boxes of NMS over the top ``n_test_pre_nms``
        that rank among the first ``n_train_pre_nms``. The training proposals are taken from the
        testing NMS when the training count is the smaller, the two top-k orders agree on it
        (ties in the scores may order differently) and the testing NMS decided enough boxes
        (it stops at its kept count); otherwise they are computed on their own. With the CPU
        default's counts (2000 -> 500 and 6000 -> 2000 for recall) 142 of the 200 val images share.

        Returns:
            training rois ``(R_train, 4)`` and testing rois ``(R_test, 4)``, each by decreasing score.
        """
        boxes, scores = self._candidates(deltas, fg_scores, anchors, image_size, scale)
        n_test = n_test_post_nms or self.n_post_nms["testing"]
        testing, order, keep = self._select(boxes, scores, self.n_pre_nms["testing"], n_test)
        n_pre, n_post = min(self.n_pre_nms["training"], scores.numel()), self.n_post_nms["training"]
        if n_pre <= order.numel():
            ranked = keep[keep < n_pre]
            decided = keep.numel() < n_test or ranked.numel() >= n_post or bool(keep[-1] >= n_pre - 1)
            if decided and torch.equal(scores.topk(n_pre).indices, order[:n_pre]):
                return boxes[order[ranked[:n_post]]], testing
        return self._select(boxes, scores, n_pre, n_post)[0], testing

    def _candidates(self, deltas: Tensor, fg_scores: Tensor, anchors: Tensor, image_size: tuple[int, int], scale: float) -> tuple[Tensor, Tensor]:
        """Every anchor decoded and clipped, less the boxes under ``min_size``: ``(M, 4)`` boxes
        and their ``(M,)`` scores."""
        boxes = clip_boxes_to_image(self.coder.decode(anchors, deltas.detach()), image_size)
        keep = remove_small_boxes(boxes, self.min_size * scale)
        return boxes[keep], fg_scores.detach()[keep]

    def _select(self, boxes: Tensor, scores: Tensor, n_pre: int, n_post: int) -> tuple[Tensor, Tensor, Tensor]:
        """The top ``n_pre`` by score, NMS, the first ``n_post``: ``rois (R, 4)``, and the top
        ``n_pre``'s ``order`` (indices into ``boxes``) with the ``keep`` positions in it (rois
        = ``boxes[order[keep]]``)."""
        scores, order = scores.topk(min(n_pre, scores.numel()))
        ranked = boxes[order]
        if ranked.device.type == "cpu" and nms_topk_is_faster(ranked.shape[0], n_post):
            # The same boxes as torchvision's nms(...)[:n_post], without suppressing past the
            # n_post-th kept box: at 6000 -> 300 about 30x faster than the (one-thread) CPU kernel.
            keep = nms_topk(ranked, scores, self.nms_thresh, n_post)
        else:
            keep = nms(ranked, scores, self.nms_thresh)[:n_post]  # nms keeps score order
        return ranked[keep], order, keep


class ProposalTargetCreator:
    """Samples RoIs from the proposals and gives each its targets (Fast R-CNN, Section 2.3).

    The ground-truth boxes are added to the proposals. A RoI with IoU >= ``pos_iou_thresh`` with
    some ground truth is foreground and takes that box's class; one with IoU in
    ``[neg_iou_thresh_lo, neg_iou_thresh_hi)`` is background. ``n_sample`` RoIs are sampled with
    at most ``pos_ratio`` foreground. Each sampled RoI comes with its matched ground-truth box;
    the RoI head's box coder (:attr:`fasterrcnn.heads.RoIHead.box_coder`, configured in the
    ``model`` group) turns those into the normalised regression targets.

    The output always has ``min(n_sample, R + G)`` rows; when too few background RoIs exist the
    filling rows carry label -1 and are ignored by the losses (so shapes stay fixed).

    ``max_chunk_elements``: the ``(R + G, G)`` IoU matrix is computed in blocks of that many IoUs
    (None: whole), so memory grows linearly with G.
    """

    def __init__(
        self,
        n_sample: int = 128,
        pos_ratio: float = 0.25,
        pos_iou_thresh: float = 0.5,
        neg_iou_thresh_hi: float = 0.5,
        neg_iou_thresh_lo: float = 0.0,
        max_chunk_elements: int | None = MAX_CHUNK_ELEMENTS,
    ) -> None:
        self.n_sample = n_sample
        self.pos_ratio = pos_ratio
        self.pos_iou_thresh = pos_iou_thresh
        self.neg_iou_thresh_hi = neg_iou_thresh_hi
        self.neg_iou_thresh_lo = neg_iou_thresh_lo
        self.max_chunk_elements = max_chunk_elements

    @property
    def matcher(self) -> Matcher:
        """The IoU rules above (built from the thresholds, so a changed threshold applies)."""
        return Matcher(self.pos_iou_thresh, (self.neg_iou_thresh_lo, self.neg_iou_thresh_hi), max_chunk_elements=self.max_chunk_elements)

    @torch.no_grad()
    def __call__(self, rois: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            rois: ``(R, 4)`` proposals.
            gt_boxes: ``(G, 4)``; gt_labels: ``(G,)`` in 1..K.
        Returns:
            sample_rois ``(S, 4)``, gt_roi_labels ``(S,)`` (-1 ignored, 0 background, 1..K),
            matched_gt_boxes ``(S, 4)`` the ground truth each RoI is matched to (the RoI
            itself when the image has no objects; only foreground rows are regression targets),
            with ``S = min(n_sample, R + G)``.
        """
        rois = torch.cat((rois, gt_boxes.to(rois.dtype)), dim=0)  # (R+G, 4)
        labels, matched = self.matcher(rois, gt_boxes)  # (R+G,) in {-1, 0, 1}, (R+G,)
        labels = labels.to(gt_labels.dtype)
        if gt_boxes.numel():
            matched_boxes = gt_boxes[matched]
            labels = torch.where(labels == 1, gt_labels[matched], labels)  # foreground takes the class
        else:
            matched_boxes = rois
        labels = subsample_labels(labels, self.n_sample, self.pos_ratio)

        # Take the sampled rows first (foreground, then background, then ignored filler).
        priority = (labels >= 1).float() * 2 + (labels == 0).float() + torch.rand(labels.shape, device=labels.device) * 0.5
        index = priority.topk(min(self.n_sample, labels.numel())).indices
        return rois[index], labels[index], matched_boxes[index]
