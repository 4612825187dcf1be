"""IoU matching of ground-truth boxes to boxes (anchors or RoIs), written once for both creators.

Shape legend: A boxes to label (anchors, or RoIs and the ground truth appended to them),
G ground-truth boxes. Box conventions are those of :mod:`fasterrcnn.boxes`.

In the spirit of torchvision's ``Matcher`` (``models/detection/_utils.py``) and mmdetection's
``MaxIoUAssigner``: :func:`match_iou` reduces the IoU matrix to what the rules need (each box's
best ground truth and IoU, each ground truth's best IoU, and which boxes are the best of some
ground truth); :class:`Matcher` turns that into labels with thresholds.
:class:`~fasterrcnn.creators.AnchorTargetCreator` and
:class:`~fasterrcnn.creators.ProposalTargetCreator` compose it.

Memory: the ``(A, G)`` IoU matrix is never held whole when it is large. It is computed in
blocks of ground truths of at most ``max_elements`` IoUs each (at least one ground truth), into
three block buffers reused from block to block, so the peak memory is ``O(A + G)`` plus about 4
blocks, instead of growing with ``A * G``: with the ground truth appended to the RoIs that was
``(R + G) * G``, 4.7 GB at 24,000 objects. Each IoU is computed with the operations of
``torchvision.ops.box_iou`` in the same order, so it is the same number, and the block results
combine as ``torch.max`` does over the whole matrix (the first maximum on ties, NaN above
everything): the result does not depend on the block size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fasterrcnn.boxes import column_iou

# IoUs per block: 16 MiB of float32 per buffer. Reusing the buffers matters as much as their
# size: fresh blocks of 16-32 MiB per step fragmented glibc's heap (+500 MB kept at 30k objects).
MAX_CHUNK_ELEMENTS = 2**22

# "The best anchor of a ground truth, ties included" compares with this relative tolerance, not
# with float equality. Anchors that overlap a ground truth in the same geometry (shifted copies,
# or every large anchor that contains a small box) get IoUs that differ in the last bits,
# because their float32 corners (irrational sides for ratios 0.5 and 2) round differently at
# each position: 8 anchors tied at IoU 0.40614 kept only 2 under equality, 210 tied ones 70.
# Measured on 20,000 random boxes each (the paper's anchors on 600 x 1000 px, the small ones on
# 300 x 400): equality split the ties of 12-18 % of the boxes; within a tie the float32 IoUs
# differ by at most 2.4e-6 relative, so 1e-5 keeps every tie. An anchor whose IoU truly lies
# within 1e-5 of the best (0.499996 against 0.5) is then kept too: about 1 box in 10,000.
BEST_IOU_RTOL = 1e-5


def _box_area(boxes: Tensor) -> Tensor:
    """``(N,)`` areas of ``(N, 4)`` boxes, as ``torchvision.ops.box_area``."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou_block(gt_boxes: Tensor, gt_area: Tensor, columns: Tensor, area: Tensor, out: Tensor, tmp: Tensor, tmp2: Tensor) -> Tensor:
    """``box_iou(boxes, gt_boxes (g, 4)).T`` written into ``out (g, A)``, using ``tmp`` and
    ``tmp2 (g, A)``: :func:`~fasterrcnn.boxes.column_iou` (box_iou's numbers, without its
    ``(A, g, 2)`` temporaries) with the boxes as ``columns (4, A)``, their x1, y1, x2, y2 rows
    contiguous. Ground truths are the rows so that every broadcast runs along the A boxes: with
    ``(A, g)`` and a few ground truths each op ran along rows of g strided values, about twice
    as slow."""
    return column_iou(gt_boxes[:, :, None].unbind(1), gt_area[:, None], columns, area, out, tmp, tmp2)


class IoUMatch(NamedTuple):
    """What the labelling rules need from the ``(A, G)`` IoU matrix.

    Boxes outside ``valid`` have IoU -1 with every ground truth (they never win anything).
    """

    max_iou: Tensor  # (A,) best IoU of each box over the ground truths (0 when G == 0; -1 invalid)
    matched: Tensor  # (A,) int64: the ground truth of that IoU, the first on ties (0 when G == 0)
    gt_max_iou: Tensor  # (G,) best IoU of each ground truth over the valid boxes (-1: none valid)
    best_of_gt: Tensor | None  # (A,) bool: within best_rtol of a ground truth's best IoU > 0


def match_iou(
    boxes: Tensor,
    gt_boxes: Tensor,
    valid: Tensor | None = None,
    best_rtol: float | None = None,
    max_elements: int | None = MAX_CHUNK_ELEMENTS,
) -> IoUMatch:
    """Reduce the IoU matrix of ``boxes (A, 4)`` and ``gt_boxes (G, 4)`` in blocks of ground truths.

    Args:
        valid: ``(A,)`` bool, the boxes that may match (None: all).
        best_rtol: also compute ``best_of_gt``: the valid boxes whose IoU with some ground truth
            is at least ``(1 - best_rtol)`` times that ground truth's best IoU, when that best
            IoU is above 0 (a ground truth that overlaps no valid box claims none). None: skip it.
        max_elements: IoUs per block; None computes the whole matrix at once.

    >>> m = match_iou(torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 20.]]),
    ...               torch.tensor([[0., 0., 10., 10.], [0., 5., 10., 25.]]), best_rtol=1e-5)
    >>> m.max_iou, m.matched, m.gt_max_iou, m.best_of_gt
    (tensor([1.0000, 0.6000]), tensor([0, 1]), tensor([1.0000, 0.6000]), tensor([True, True]))
    """
    num_boxes, num_gt = boxes.shape[0], gt_boxes.shape[0]
    if num_gt == 0 or num_boxes == 0:
        max_iou = boxes.new_zeros(num_boxes) if valid is None else torch.where(valid, 0.0, -1.0).to(boxes.dtype)
        best = torch.zeros(num_boxes, dtype=torch.bool, device=boxes.device) if best_rtol is not None else None
        matched = torch.zeros(num_boxes, dtype=torch.long, device=boxes.device)
        return IoUMatch(max_iou, matched, gt_boxes.new_full((num_gt,), -1.0), best)

    # As box_iou: each set's areas in its own dtype, the rest in the wider one (float32 at least;
    # for float32 and float64 boxes these are box_iou's numbers bit for bit).
    boxes, gt_boxes = (b if b.dtype in (torch.float32, torch.float64) else b.float() for b in (boxes, gt_boxes))
    area, gt_area = _box_area(boxes), _box_area(gt_boxes)
    dtype = torch.promote_types(boxes.dtype, gt_boxes.dtype)
    boxes, gt_boxes, area, gt_area = (t.to(dtype) for t in (boxes, gt_boxes, area, gt_area))
    step = num_gt if max_elements is None else max(1, min(num_gt, max_elements // num_boxes))
    buffers = [boxes.new_empty(num_boxes * step) for _ in range(3)]
    flags = torch.empty(num_boxes * step, dtype=torch.bool, device=boxes.device) if best_rtol is not None else None
    columns = boxes.t().contiguous()  # (4, A)
    invalid = None if valid is None else ~valid[None, :]
    max_iou = matched = best = None
    gt_max = []
    for start in range(0, num_gt, step):
        g = min(step, num_gt - start)
        block = [b[: num_boxes * g].view(g, num_boxes) for b in buffers]
        iou = _iou_block(gt_boxes[start : start + g], gt_area[start : start + g], columns, area, *block)  # (g, A)
        if invalid is not None:
            iou.masked_fill_(invalid, -1.0)
        value, index = iou.max(dim=0)  # (A,)
        row_max = iou.max(dim=1).values  # (g,): complete, every box is in the block
        gt_max.append(row_max)
        if best_rtol is not None:
            # (iou >= row_max * (1 - best_rtol)) & (row_max > 0), in place
            near = torch.ge(iou, (row_max * (1 - best_rtol))[:, None], out=flags[: num_boxes * g].view(g, num_boxes))
            is_best = near.logical_and_((row_max > 0)[:, None]).any(dim=0)
            best = is_best if best is None else best.logical_or_(is_best)
        if max_iou is None:
            max_iou, matched = value, index
        else:
            # torch.max over the whole row: a later block wins only with a larger value (so ties
            # keep the first index), or with a NaN where the running maximum is not one.
            later = (value > max_iou) | (value.isnan() & ~max_iou.isnan())
            max_iou = torch.where(later, value, max_iou)
            matched = torch.where(later, index + start, matched)
    return IoUMatch(max_iou, matched, torch.cat(gt_max), best)


class Matcher:
    """Labels boxes from their IoU with the ground truth: 1 positive, 0 negative, -1 ignored.

    * a box whose best IoU is ``>= pos_iou_thresh`` is positive;
    * with ``allow_low_quality_matches``, the best box(es) of each ground truth are positive too,
      ties within :data:`BEST_IOU_RTOL` included (a ground truth overlapping no valid box claims
      none): the paper's "anchor with the highest IoU with a ground-truth box";
    * a box whose best IoU lies in ``[lo, hi)`` of ``neg_iou_thresh`` is negative, unless positive;
      a single number ``hi`` means ``[0, hi)``;
    * boxes outside ``valid``, and all others, are ignored (-1).

    With no ground truth every valid box has IoU 0, so it is negative when ``lo <= 0 < hi``.

    Args:
        max_chunk_elements: IoUs per block of :func:`match_iou` (None: the whole matrix).

    >>> matcher = Matcher(0.7, 0.3, allow_low_quality_matches=True)
    >>> boxes = torch.tensor([[0., 0., 10., 10.], [0., 15., 10., 35.], [50., 50., 60., 60.]])
    >>> matcher(boxes, torch.tensor([[0., 0., 10., 12.], [0., 20., 10., 40.]]))  # IoUs 0.83, 0.43, 0
    (tensor([1, 1, 0]), tensor([0, 1, 0]))
    """

    def __init__(
        self,
        pos_iou_thresh: float,
        neg_iou_thresh: float | tuple[float, float],
        allow_low_quality_matches: bool = False,
        best_rtol: float = BEST_IOU_RTOL,
        max_chunk_elements: int | None = MAX_CHUNK_ELEMENTS,
    ) -> None:
        lo, hi = (0.0, neg_iou_thresh) if isinstance(neg_iou_thresh, (int, float)) else neg_iou_thresh
        self.pos_iou_thresh = float(pos_iou_thresh)
        self.neg_iou_thresh = (float(lo), float(hi))
        self.allow_low_quality_matches = allow_low_quality_matches
        self.best_rtol = best_rtol
        self.max_chunk_elements = max_chunk_elements

    def __repr__(self) -> str:
        return (
            f"Matcher(pos_iou_thresh={self.pos_iou_thresh}, neg_iou_thresh={self.neg_iou_thresh}, "
            f"allow_low_quality_matches={self.allow_low_quality_matches})"
        )

    def match(self, boxes: Tensor, gt_boxes: Tensor, valid: Tensor | None = None) -> IoUMatch:
        """:func:`match_iou` with this matcher's settings."""
        rtol = self.best_rtol if self.allow_low_quality_matches else None
        return match_iou(boxes, gt_boxes, valid, best_rtol=rtol, max_elements=self.max_chunk_elements)

    def label(self, match: IoUMatch, valid: Tensor | None = None) -> Tensor:
        """``(A,)`` int64 labels in {-1, 0, 1} from :meth:`match`'s result."""
        lo, hi = self.neg_iou_thresh
        max_iou = match.max_iou
        negative = (max_iou >= lo) & (max_iou < hi)
        positive = max_iou >= self.pos_iou_thresh
        if match.best_of_gt is not None:
            positive = positive | match.best_of_gt
        if valid is not None:
            negative, positive = negative & valid, positive & valid
        labels = torch.full(max_iou.shape, -1, dtype=torch.long, device=max_iou.device)
        labels = torch.where(negative, 0, labels)
        return torch.where(positive, 1, labels)

    @torch.no_grad()
    def __call__(self, boxes: Tensor, gt_boxes: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """
        Args:
            boxes: ``(A, 4)``; gt_boxes: ``(G, 4)``, G may be 0; valid: ``(A,)`` bool or None.
        Returns:
            labels ``(A,)`` int64 in {-1, 0, 1} and matched ``(A,)`` int64, the index of each box's
            best ground truth (meaningful where the label is 1, and only when G > 0).
        """
        match = self.match(boxes, gt_boxes, valid)
        return self.label(match, valid), match.matched
