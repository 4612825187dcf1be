"""Proposal recall: how many ground-truth objects the RPN's top proposals cover.

The RPN alone decides what the RoI head can find, so anchor and sampler sweeps are compared on
this number too: the share of (non-difficult) ground-truth boxes whose best IoU with the top
``n`` proposals of their image is at least ``t``, for ``n`` in 300 / 1000 / 2000 and ``t`` in
0.5 / 0.7. Proposals are the testing ones (``n_test_pre_nms`` before NMS), in score order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou


def best_iou_at_counts(proposals: Tensor, gt_boxes: Tensor, counts: Sequence[int]) -> Tensor:
    """``(R, 4)`` proposals by decreasing score, ``(G, 4)`` boxes -> ``(G, len(counts))``: each
    box's best IoU among the first ``n`` proposals, for each ``n`` of ``counts``.

    >>> best_iou_at_counts(torch.tensor([[0., 0, 10, 10], [0, 0, 10, 20]]), torch.tensor([[0., 0, 10, 20]]), [1, 2])
    tensor([[0.5000, 1.0000]])
    """
    if proposals.numel() == 0 or gt_boxes.numel() == 0:
        return gt_boxes.new_zeros(gt_boxes.shape[0], len(counts))
    running_best = box_iou(proposals, gt_boxes).cummax(dim=0).values  # (R, G): best of the first r+1
    rows = torch.tensor([min(n, proposals.shape[0]) - 1 for n in counts], device=proposals.device)
    return running_best[rows].T


class ProposalRecall:
    """Accumulates :func:`best_iou_at_counts` image by image.

    Args:
        counts: numbers of top proposals (300, 1000, 2000).
        iou_thresholds: IoU needed to count a box as covered (0.5, 0.7).
    """

    def __init__(self, counts: Sequence[int] = (300, 1000, 2000), iou_thresholds: Sequence[float] = (0.5, 0.7)) -> None:
        self.counts = tuple(int(n) for n in counts)
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self.best: list[Tensor] = []

    def reset(self) -> None:
        self.best.clear()

    def update(self, proposals: Tensor, gt_boxes: Tensor, gt_difficult: Tensor | None = None) -> None:
        """One image: proposals ``(R, 4)`` by score, ground truth ``(G, 4)`` in the same coordinates;
        difficult objects do not count (as in the VOC evaluation)."""
        if gt_difficult is not None:
            gt_boxes = gt_boxes[~gt_difficult]
        self.best.append(best_iou_at_counts(proposals.detach().float(), gt_boxes.float(), self.counts).cpu())

    @property
    def num_boxes(self) -> int:
        return sum(b.shape[0] for b in self.best)

    def compute(self) -> dict[str, float]:
        """``{"<n>@<t>": recall}``, e.g. ``"300@0.5"``; NaN without ground truth."""
        best = torch.cat(self.best) if self.best else torch.zeros(0, len(self.counts))
        out = {}
        for j, n in enumerate(self.counts):
            for t in self.iou_thresholds:
                out[f"{n}@{t:g}"] = float((best[:, j] >= t).float().mean()) if best.shape[0] else float("nan")
        return out
