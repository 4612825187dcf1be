"""PASCAL VOC detection AP, following the official devkit (``VOCevaldet.m``, ``VOCap.m``).

The devkit's rules, each kept here (and tested):

* detections of a class are taken over all images in decreasing score; ties keep the order in
  which the detections were given (MATLAB's ``sort`` is stable);
* a detection matches the ground truth of its image and class with the highest IoU; IoU uses
  the devkit's "+1" pixel areas, which in this project's continuous coordinates
  (:mod:`fasterrcnn.boxes`) are the plain areas; a match needs IoU >= 0.5 and a positive
  intersection in both directions;
* a detection matched to a *difficult* object is neither a true nor a false positive, and
  difficult objects do not count in recall;
* a detection matched to an object that an earlier detection already took is a false positive;
* VOC2007's 11-point AP uses recall thresholds ``0:0.1:1`` as MATLAB makes them (see
  :func:`matlab_colon`); the VOC2010+ AP is the area under the monotone precision envelope;
* a class without (non-difficult) ground truth has AP NaN and is left out of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


def matlab_colon(start: float, step: float, stop: float) -> list[float]:
    """MATLAB's ``start:step:stop``: the first half counted up from ``start``, the second half
    down from ``stop``, so ``0:0.1:1`` has 0.6 and 0.7 exactly (``numpy.arange`` has neither)."""
    n = int(math.floor((stop - start) / step + 1e-10))
    values = [0.0] * (n + 1)
    for k in range(n // 2 + 1):
        values[k] = start + k * step
        values[n - k] = stop - k * step
    if n % 2 == 0:
        values[n // 2] = (start + stop) / 2
    return values


VOC07_RECALL_THRESHOLDS = matlab_colon(0.0, 0.1, 1.0)


def voc_ap(recall: Tensor, precision: Tensor, use_07_metric: bool = True) -> float:
    """AP from the recall and precision of the detections in score order (``VOCap.m``, or the
    VOC2007 11-point average of ``VOCevaldet.m``)."""
    recall = recall.double()
    # 0/0 precision before the first counted detection (one on a difficult object) is NaN in the
    # devkit too, where MATLAB's max() skips it; 0 has the same effect on both metrics.
    precision = torch.nan_to_num(precision.double(), nan=0.0)
    if use_07_metric:
        ap = 0.0
        for t in VOC07_RECALL_THRESHOLDS:
            above = precision[recall >= t]
            ap += (above.max().item() if above.numel() else 0.0) / 11
        return ap
    mrec = torch.cat((recall.new_zeros(1), recall, recall.new_ones(1)))
    mpre = torch.cat((precision.new_zeros(1), precision, precision.new_zeros(1)))
    mpre = mpre.flip(0).cummax(0).values.flip(0)  # precision envelope, right to left
    changes = torch.nonzero(mrec[1:] != mrec[:-1]).squeeze(1) + 1
    return float(((mrec[changes] - mrec[changes - 1]) * mpre[changes]).sum())


def _iou_plain(boxes: Tensor, gt: Tensor) -> Tensor:
    """``(D, 4) x (G, 4) -> (D, G)`` IoU, 0 unless the intersection is positive in x and y."""
    iw = torch.minimum(boxes[:, None, 2], gt[None, :, 2]) - torch.maximum(boxes[:, None, 0], gt[None, :, 0])
    ih = torch.minimum(boxes[:, None, 3], gt[None, :, 3]) - torch.maximum(boxes[:, None, 1], gt[None, :, 1])
    inter = iw * ih
    area_d = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_g = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    iou = inter / (area_d[:, None] + area_g[None, :] - inter)
    return torch.where((iw > 0) & (ih > 0), iou, 0.0)


@dataclass
class _ImageRecord:
    pred_boxes: Tensor
    pred_scores: Tensor
    pred_labels: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    gt_difficult: Tensor


@dataclass
class VOCEvaluator:
    """Accumulates detections and ground truth image by image; :meth:`compute` gives the APs.

    Args:
        class_names: names of classes 1..K.
        iou_thresh: the devkit's ``minoverlap`` (0.5).
    """

    class_names: Sequence[str]
    iou_thresh: float = 0.5
    images: list[_ImageRecord] = field(default_factory=list)
    # class_pr's results for the images as they are: both VOC metrics, the per-class table and
    # the PR curves of one validation match the detections once (reset, update and set_images
    # clear it).
    _pr_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def reset(self) -> None:
        self.images.clear()
        self._pr_cache.clear()

    def set_images(self, images: list[_ImageRecord]) -> None:
        """Replace the accumulated images (all ranks' after a DDP gather)."""
        self.images = images
        self._pr_cache.clear()

    def update(
        self,
        pred_boxes: Tensor,
        pred_scores: Tensor,
        pred_labels: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_difficult: Tensor | None = None,
    ) -> None:
        """Add one image: predictions ``(D, 4), (D,), (D,)`` and ground truth ``(G, 4), (G,), (G,)``
        in the same (original image) coordinates, labels in 1..K."""
        if gt_difficult is None:
            gt_difficult = torch.zeros(gt_labels.shape, dtype=torch.bool)
        self._pr_cache.clear()
        cpu = lambda t: t.detach().to("cpu")  # noqa: E731
        self.images.append(
            _ImageRecord(
                cpu(pred_boxes).double(),
                cpu(pred_scores).double(),
                cpu(pred_labels).long(),
                cpu(gt_boxes).double(),
                cpu(gt_labels).long(),
                cpu(gt_difficult).bool(),
            )
        )

    def class_pr(self, label: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """Scores, true positives and false positives of class ``label`` in devkit order, and the
        number of non-difficult ground-truth objects (computed once for the current images)."""
        key = (label, len(self.images))
        if key not in self._pr_cache:
            self._pr_cache[key] = self._class_pr(label)
        return self._pr_cache[key]

    def _class_pr(self, label: int) -> tuple[Tensor, Tensor, Tensor, int]:
        scores, tps, fps, order_keys = [], [], [], []
        npos = 0
        offset = 0
        for rec in self.images:
            gt_mask = rec.gt_labels == label
            gt_boxes, gt_difficult = rec.gt_boxes[gt_mask], rec.gt_difficult[gt_mask]
            npos += int((~gt_difficult).sum())
            det_mask = rec.pred_labels == label
            det_boxes, det_scores = rec.pred_boxes[det_mask], rec.pred_scores[det_mask]
            d = det_scores.numel()
            if d == 0:
                continue
            # Within an image the devkit's global order is the image's own order by score.
            order = torch.sort(-det_scores, stable=True).indices
            det_boxes, det_scores = det_boxes[order], det_scores[order]
            tp = torch.zeros(d, dtype=torch.bool)
            fp = torch.zeros(d, dtype=torch.bool)
            if gt_boxes.numel():
                ovmax, jmax = _iou_plain(det_boxes, gt_boxes).max(dim=1)
                taken = torch.zeros(gt_boxes.shape[0], dtype=torch.bool)
                for i in range(d):  # greedy in score order, as the devkit
                    if ovmax[i] >= self.iou_thresh:
                        j = int(jmax[i])
                        if gt_difficult[j]:
                            continue
                        if not taken[j]:
                            tp[i] = True
                            taken[j] = True
                        else:
                            fp[i] = True
                    else:
                        fp[i] = True
            else:
                fp[:] = True
            scores.append(det_scores)
            tps.append(tp)
            fps.append(fp)
            order_keys.append(order + offset)  # position in the given order, for stable ties
            offset += d
        if not scores:
            empty = torch.zeros(0, dtype=torch.double)
            return empty, empty.bool(), empty.bool(), npos
        scores_t, tp_t, fp_t, keys = torch.cat(scores), torch.cat(tps), torch.cat(fps), torch.cat(order_keys)
        # Global order: decreasing score, ties in the order the detections were given.
        order = torch.argsort(keys)
        order = order[torch.sort(-scores_t[order], stable=True).indices]
        return scores_t[order], tp_t[order], fp_t[order], npos

    def compute(self, use_07_metric: bool = True) -> dict:
        """``{"map": float, "ap": {class: AP}, "num_gt": {class: n}}``; NaN AP for a class without
        non-difficult ground truth, left out of ``map``."""
        aps: dict[str, float] = {}
        num_gt: dict[str, int] = {}
        for label, name in enumerate(self.class_names, start=1):
            _, tp, fp, npos = self.class_pr(label)
            num_gt[name] = npos
            if npos == 0:
                aps[name] = float("nan")
                continue
            tp_c = tp.double().cumsum(0)
            fp_c = fp.double().cumsum(0)
            recall = tp_c / npos
            precision = tp_c / (tp_c + fp_c)
            aps[name] = voc_ap(recall, precision, use_07_metric)
        valid = [v for v in aps.values() if not math.isnan(v)]
        return {"map": sum(valid) / len(valid) if valid else float("nan"), "ap": aps, "num_gt": num_gt}
