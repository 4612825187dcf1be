"""Box conventions and the box coder.

Conventions, written once here and referred to everywhere else:

* Boxes are float tensors ``(..., 4)`` in ``(x1, y1, x2, y2)`` order, in *continuous* pixel
  coordinates: the origin is the top-left corner of the top-left pixel, so a box that covers
  pixel columns ``i..j`` (0-based, inclusive) spans ``x1 = i`` to ``x2 = j + 1`` and its width is
  ``x2 - x1``.
* PASCAL VOC annotations store 1-based, inclusive pixel indices ``xmin..xmax``.
  :func:`voc_to_boxes` and :func:`boxes_to_voc` are the only conversion: ``x1 = xmin - 1``,
  ``x2 = xmax``. Under this mapping the devkit's "+1" widths, areas and IoUs are exactly the plain
  continuous ones, so nothing downstream adds or subtracts 1.
* COCO annotations and results store ``[x, y, width, height]`` in continuous pixel coordinates
  already (the same origin: a box over pixel columns ``i..j`` has ``x = i``, ``width = j - i + 1``).
  :func:`coco_to_boxes` and :func:`boxes_to_coco` are the only conversion: the corner moves, no
  pixel offset.
* Labels: 0 is background, the dataset's classes are ``1..K``; a label of -1 means "ignored"
  in sampled targets.
* Deltas are ``(dx, dy, dw, dh)`` as in the paper:
  ``dx = (gx - px) / pw``, ``dy = (gy - py) / ph``, ``dw = log(gw / pw)``, ``dh = log(gh / ph)``
  with ``(px, py, pw, ph)`` the centre and size of the reference box (anchor or RoI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# exp() of a larger dw/dh would make a box more than 1000/16 times its reference: torchvision's clamp.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def voc_to_boxes(voc: Tensor) -> Tensor:
    """VOC ``(xmin, ymin, xmax, ymax)``, 1-based inclusive -> continuous ``(x1, y1, x2, y2)``.

    >>> voc_to_boxes(torch.tensor([[1., 1., 10., 20.]]))
    tensor([[ 0.,  0., 10., 20.]])
    """
    return voc - voc.new_tensor([1.0, 1.0, 0.0, 0.0])


def boxes_to_voc(boxes: Tensor) -> Tensor:
    """Inverse of :func:`voc_to_boxes`: continuous boxes -> VOC 1-based inclusive coordinates."""
    return boxes + boxes.new_tensor([1.0, 1.0, 0.0, 0.0])


def coco_to_boxes(coco: Tensor) -> Tensor:
    """COCO ``(x, y, width, height)`` -> continuous ``(x1, y1, x2, y2)`` (both continuous: no
    pixel offset, only ``x2 = x + width``, ``y2 = y + height``).

    >>> coco_to_boxes(torch.tensor([[0., 0., 10., 20.]]))
    tensor([[ 0.,  0., 10., 20.]])
    """
    return torch.cat((coco[..., :2], coco[..., :2] + coco[..., 2:]), dim=-1)


def boxes_to_coco(boxes: Tensor) -> Tensor:
    """Inverse of :func:`coco_to_boxes`: continuous ``(x1, y1, x2, y2)`` -> COCO ``(x, y, width,
    height)``, computed in the boxes' own dtype (as torchvision's ``box_convert``, which
    torchmetrics' COCO-style mAP uses, so a results file holds the numbers that mAP saw)."""
    return torch.cat((boxes[..., :2], boxes[..., 2:] - boxes[..., :2]), dim=-1)


def inside_image(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(N,)`` bool: the boxes ``(N, 4)`` lying fully inside an image of ``(height, width)``
    (touching the border counts as inside): the anchors AnchorTargetCreator labels.

    >>> inside_image(torch.tensor([[0., 0., 10., 10.], [-1., 0., 9., 10.]]), (10, 10))
    tensor([ True, False])
    """
    height, width = image_size
    return (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= width) & (boxes[:, 3] <= height)


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror ``(N, 4)`` boxes in an image ``width`` pixels wide (continuous coordinates)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((width - x2, y1, width - x1, y2), dim=-1)


class BoxCoder:
    """Encodes boxes as deltas relative to reference boxes, and decodes them back.

    Holds only the normalisation and the clamp. Targets are normalised as
    ``(delta - mean) / std``: the RPN uses mean 0 and std 1; the RoI head uses the paper
    recipe's std ``(0.1, 0.1, 0.2, 0.2)``, which is torchvision's weights ``(10, 10, 5, 5)``.

    Shapes broadcast: ``reference (..., 4)`` against ``boxes``/``deltas (..., 4)``, so a
    class-specific decode is ``decode(rois[:, None], deltas.view(R, K + 1, 4))``.

    >>> coder = BoxCoder(std=(0.1, 0.1, 0.2, 0.2))
    >>> ref = torch.tensor([[0., 0., 10., 10.]])
    >>> coder.encode(ref, torch.tensor([[1., 0., 11., 10.]]))
    tensor([[1., 0., 0., 0.]])
    """

    def __init__(
        self,
        mean: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        scale_clamp: float = DEFAULT_SCALE_CLAMP,
    ) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale_clamp = float(scale_clamp)
        self._constants: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_constants": {}}  # copies and pickles make their own

    def _mean_std(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``mean`` and ``std`` as ``(4,)`` tensors of ``like``'s dtype and device, made once for
        each: ``new_tensor`` at every call was a blocking host-to-device copy (a host sync) on a GPU."""
        key = (like.device, like.dtype)
        if key not in self._constants:
            with torch.inference_mode(False):  # plain tensors, usable outside inference mode too
                self._constants[key] = (like.new_tensor(self.mean), like.new_tensor(self.std))
        return self._constants[key]

    def __repr__(self) -> str:
        return f"BoxCoder(mean={self.mean}, std={self.std})"

    def encode(self, reference: Tensor, boxes: Tensor) -> Tensor:
        """Deltas ``(..., 4)`` that move ``reference (..., 4)`` onto ``boxes (..., 4)``."""
        pw = reference[..., 2] - reference[..., 0]
        ph = reference[..., 3] - reference[..., 1]
        px = reference[..., 0] + 0.5 * pw
        py = reference[..., 1] + 0.5 * ph
        gw = boxes[..., 2] - boxes[..., 0]
        gh = boxes[..., 3] - boxes[..., 1]
        gx = boxes[..., 0] + 0.5 * gw
        gy = boxes[..., 1] + 0.5 * gh
        deltas = torch.stack(((gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)), dim=-1)
        mean, std = self._mean_std(deltas)
        return (deltas - mean) / std

    def decode(self, reference: Tensor, deltas: Tensor) -> Tensor:
        """Boxes ``(..., 4)`` obtained by applying normalised ``deltas`` to ``reference``."""
        mean, std = self._mean_std(deltas)
        deltas = deltas * std + mean
        reference = reference.to(deltas.dtype)
        pw = reference[..., 2] - reference[..., 0]
        ph = reference[..., 3] - reference[..., 1]
        px = reference[..., 0] + 0.5 * pw
        py = reference[..., 1] + 0.5 * ph
        dx, dy, dw, dh = deltas.unbind(-1)
        cx = px + dx * pw
        cy = py + dy * ph
        w = pw * torch.exp(dw.clamp(max=self.scale_clamp))
        h = ph * torch.exp(dh.clamp(max=self.scale_clamp))
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def column_iou(
    a: Sequence[Tensor], area_a: Tensor, b: Sequence[Tensor], area_b: Tensor, out: Tensor | None = None, tmp: Tensor | None = None, tmp2: Tensor | None = None
) -> Tensor:
    """``(P, Q)`` IoU of boxes given as coordinate columns that broadcast: ``a`` is
    ``(x1, y1, x2, y2)`` of shape ``(P, 1)`` each with ``area_a (P, 1)``, ``b`` the same of shape
    ``(Q,)`` each with ``area_b (Q,)``. The arithmetic of ``torchvision.ops.box_iou`` and of its
    CPU NMS kernel (width and height clamped at 0, ``inter = w * h``, ``inter / (area_a + area_b -
    inter)``; min, max and the sum of the areas commute), so each IoU is their number bit for bit.
    With ``b``'s rows contiguous every broadcast runs along contiguous memory (``(Q, 4)`` boxes'
    columns are strided views, about twice as slow). ``out``, ``tmp``, ``tmp2``: ``(P, Q)``
    buffers to reuse (None: new ones); the result is ``out``."""
    w = torch.minimum(a[2], b[2], out=out)
    w.sub_(torch.maximum(a[0], b[0], out=tmp)).clamp_(min=0)
    h = torch.minimum(a[3], b[3], out=tmp)
    h.sub_(torch.maximum(a[1], b[1], out=tmp2)).clamp_(min=0)
    inter = w.mul_(h)
    return inter.div_(torch.add(area_a, area_b, out=tmp).sub_(inter))


def _iou_above(a: Sequence[Tensor], area_a: Tensor, b: Sequence[Tensor], area_b: Tensor, thresh: float) -> Tensor:
    """``(P, Q)`` bool: :func:`column_iou` of ``a`` and ``b`` above ``thresh``, deciding exactly as
    torchvision's CPU NMS kernel does (``thresh`` is :func:`_kernel_thresh`'s)."""
    iou = column_iou(a, area_a, b, area_b)
    return (iou if iou.dtype in (torch.float32, torch.float64) else iou.double()) > thresh


def _kernel_thresh(iou_thresh: float, dtype: torch.dtype) -> float:
    """The threshold that makes ``iou > t`` in ``dtype`` decide as torchvision's kernel, which
    compares the ``dtype`` IoU with the double ``iou_thresh``: a float32 IoU is above it exactly
    when it is above the largest float32 not above it (torch compares a float32 tensor with a
    Python float in float32, and float32(0.3) is above 0.3, so 0.3 itself would not do). Float64
    compares exactly, and other dtypes' IoUs are compared in float64 (:func:`_iou_above`)."""
    if dtype != torch.float32:
        return iou_thresh
    t = torch.tensor(iou_thresh, dtype=torch.float32)
    if t.item() > iou_thresh:
        t = torch.nextafter(t, torch.tensor(-math.inf))
    return t.item()


def nms_topk(boxes: Tensor, scores: Tensor, iou_thresh: float, max_keep: int, block: int = 128) -> Tensor:
    """``torchvision.ops.nms(boxes, scores, iou_thresh)[:max_keep]``, stopping once ``max_keep``
    boxes are kept: ProposalCreator keeps 300 of 6000 boxes at test time, and NMS over the
    rest is wasted work.

    Greedy NMS in score order (a stable descending sort, as torchvision's), ``block`` candidates
    at a time: a candidate dies if a box kept in an earlier block overlaps it by more than
    ``iou_thresh``; inside the block, greedy order is resolved by iterating
    ``keep_i = alive_i and no kept j < i overlaps i`` to its fixed point (the greedy result is
    the only solution, and the iteration reaches it in at most ``block`` rounds; overlapping
    chains of proposals need more, which is why blocks are small: 128 was the fastest of 16-2048
    on RPN proposals of a 600 x 1000 image, 12000 -> 2000 and 6000 -> 300, and of 64-512 on the
    CPU default's, 2000 -> 500 and 6000 -> 2000). The kept boxes' coordinates are columns of one
    preallocated buffer (:func:`_iou_above`).

    Args:
        boxes: ``(N, 4)``; scores: ``(N,)``.
    Returns:
        ``(K,)`` int64 indices into ``boxes``, by decreasing score, ``K <= max_keep``.
    """
    order = scores.sort(descending=True, stable=True).indices
    cols = boxes[order].t().contiguous()  # (4, N): x1, y1, x2, y2 in score order
    thresh = _kernel_thresh(iou_thresh, cols.dtype)
    areas = (cols[2] - cols[0]) * (cols[3] - cols[1])
    num_boxes = cols.shape[1]
    # x1, y1, x2, y2 and area of the kept boxes, in the order they were kept
    kept_cols = cols.new_empty(5, min(num_boxes, max_keep + block))
    kept: list[Tensor] = []  # positions in score order
    num_kept = 0
    for start in range(0, num_boxes, block):
        cand, cand_areas = cols[:, start : start + block], areas[start : start + block]
        cand_rows, cand_areas_col = tuple(c[:, None] for c in cand), cand_areas[:, None]
        if num_kept:
            prior = kept_cols[:, :num_kept]
            alive = ~_iou_above(cand_rows, cand_areas_col, tuple(prior[:4]), prior[4], thresh).any(dim=1)
        else:
            alive = torch.ones(cand.shape[1], dtype=torch.bool, device=cols.device)
        # suppresses[j, i]: candidate j (earlier) would suppress candidate i (later)
        suppresses = _iou_above(cand_rows, cand_areas_col, tuple(cand), cand_areas, thresh).triu_(diagonal=1)
        keep = alive
        while True:
            new = alive & ~(suppresses & keep[:, None]).any(dim=0)
            if torch.equal(new, keep):
                break
            keep = new
        index = keep.nonzero().squeeze(1)
        count = index.numel()
        kept.append(index + start)
        kept_cols[:4, num_kept : num_kept + count] = cand[:, index]
        kept_cols[4, num_kept : num_kept + count] = cand_areas[index]
        num_kept += count
        if num_kept >= max_keep:
            break
    return order[torch.cat(kept)[:max_keep]] if kept else order[:0]
