"""Every number a validation or an evaluation reports, from one accumulator.

:class:`DetectionMetrics` takes each image's detections, proposals and ground truth once and
computes, under flat keys (the training logs put ``val/`` in front, ``src/eval.py`` the split):

* ``map``: VOC mAP by the run's metric (VOC2007 11-point unless ``use_07_metric=false``), and
  ``ap/<class>``; both VOC metrics always as ``map_voc07`` and ``map_voc10`` (all-point);
* ``recall/<n>@<t>``: proposal recall (:mod:`fasterrcnn.evaluation.recall`);
* ``coco/map`` (mAP@[.5:.95]), ``coco/map_50``, ``coco/map_75``, ``coco/map_small|medium|large``,
  ``coco/mar_100``: COCO-style numbers from torchmetrics' ``MeanAveragePrecision`` (pycocotools),
  with difficult objects as crowd regions. They are labelled ``coco/`` because they are not the
  VOC protocol: 101 recall points, 10 IoU thresholds, at most 100 detections per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fasterrcnn.evaluation.recall import ProposalRecall
from fasterrcnn.evaluation.voc import VOCEvaluator

COCO_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


class DetectionMetrics:
    """VOC AP, COCO-style AP and proposal recall over a set of images.

    Args:
        class_names: names of classes 1..K.
        use_07_metric: which VOC AP is ``map`` and ``ap/<class>``.
        recall_counts, recall_ious: proposal recall settings (empty ``recall_counts``: none).
        coco: also compute the COCO-style numbers (needs pycocotools; ~1 s per 200 images).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        use_07_metric: bool = True,
        recall_counts: Sequence[int] = (300, 1000, 2000),
        recall_ious: Sequence[float] = (0.5, 0.7),
        coco: bool = True,
    ) -> None:
        self.class_names = list(class_names)
        self.use_07_metric = use_07_metric
        self.voc = VOCEvaluator(self.class_names)
        self.recall = ProposalRecall(recall_counts, recall_ious) if recall_counts else None
        self.coco = coco

    @property
    def max_proposals(self) -> int | None:
        """How many proposals :meth:`update` wants per image (None: none)."""
        return max(self.recall.counts) if self.recall else None

    def reset(self) -> None:
        self.voc.reset()
        if self.recall:
            self.recall.reset()

    def update(self, detection: dict[str, Tensor], gt_boxes: Tensor, gt_labels: Tensor, gt_difficult: Tensor) -> None:
        """One image. ``detection``: :meth:`FasterRCNN.predict`'s dict (``boxes (D, 4)``,
        ``scores``, ``labels`` and, for recall, ``proposals (R, 4)``), all in original image
        coordinates like the ground truth ``(G, 4), (G,), (G,)``."""
        self.voc.update(detection["boxes"], detection["scores"], detection["labels"], gt_boxes, gt_labels, gt_difficult)
        if self.recall is not None and "proposals" in detection:
            self.recall.update(detection["proposals"], gt_boxes, gt_difficult)

    def update_batch(self, detections: Sequence[dict[str, Tensor]], batch) -> None:
        """Every image of ``batch`` (a :class:`fasterrcnn.data.DetectionBatch`) with its
        ``detections`` (:meth:`update`), against the original-coordinate ground truth."""
        for det, gt_boxes, gt_labels, gt_difficult in zip(detections, batch.original_boxes, batch.labels, batch.difficult):
            self.update(det, gt_boxes, gt_labels, gt_difficult)

    def compute(self) -> dict[str, float]:
        """The flat dict described in the module docstring (NaN where a value is undefined)."""
        out: dict[str, float] = {}
        voc07 = self.voc.compute(use_07_metric=True)
        voc10 = self.voc.compute(use_07_metric=False)
        main = voc07 if self.use_07_metric else voc10
        out["map"] = main["map"]
        out["map_voc07"] = voc07["map"]
        out["map_voc10"] = voc10["map"]
        for name, ap in main["ap"].items():
            out[f"ap/{name}"] = ap
        if self.recall is not None and self.recall.best:
            for key, value in self.recall.compute().items():
                out[f"recall/{key}"] = value
        if self.coco and self.voc.images:
            coco = self.coco_metrics()
            for key in COCO_KEYS:
                value = float(coco[key])
                out[f"coco/{key}"] = math.nan if value == -1 else value  # -1: no such objects
        return out

    def coco_metrics(self) -> dict[str, Tensor]:
        """torchmetrics' ``MeanAveragePrecision`` over the stored images (every rank holds all of
        them after :meth:`sync`, so it does not gather again)."""
        from torchmetrics.detection import MeanAveragePrecision

        coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools", sync_on_compute=False)
        for rec in self.voc.images:
            coco.update(
                [{"boxes": rec.pred_boxes.float(), "scores": rec.pred_scores.float(), "labels": rec.pred_labels}],
                [{"boxes": rec.gt_boxes.float(), "labels": rec.gt_labels, "iscrowd": rec.gt_difficult.long()}],
            )
        return coco.compute()

    def per_class(self) -> dict[str, dict[str, float]]:
        """Per class: both VOC APs, the number of non-difficult objects and of detections."""
        voc07 = self.voc.compute(use_07_metric=True)
        voc10 = self.voc.compute(use_07_metric=False)
        num_det = torch.zeros(len(self.class_names) + 1, dtype=torch.long)
        for rec in self.voc.images:
            num_det += torch.bincount(rec.pred_labels, minlength=len(self.class_names) + 1)[: len(self.class_names) + 1]
        return {
            name: {"ap_voc07": voc07["ap"][name], "ap_voc10": voc10["ap"][name], "num_gt": voc07["num_gt"][name], "num_det": int(num_det[i + 1])}
            for i, name in enumerate(self.class_names)
        }

    def pr_curves(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per class with ground truth: ``(recall, precision)`` of the detections in score order."""
        curves = {}
        for label, name in enumerate(self.class_names, start=1):
            _, tp, fp, npos = self.voc.class_pr(label)
            if npos == 0:
                continue
            tp_c, fp_c = tp.double().cumsum(0), fp.double().cumsum(0)
            curves[name] = (tp_c / npos, torch.nan_to_num(tp_c / (tp_c + fp_c), nan=0.0))
        return curves

    def sync(self, num_images: int | None = None) -> None:
        """Under DDP, give every rank the images of all ranks (each validated its own share), so
        all compute the same numbers over the whole split. A no-op in a single process.

        Lightning's ``DistributedSampler`` (no shuffling) gives rank ``r`` the images
        ``r, r + W, r + 2W, ...`` and pads the split with its first images so that every rank
        has as many: interleaving the ranks restores the dataset order, and cutting at
        ``num_images`` (the split's size) drops the padding, so no image counts twice.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
            return
        world = torch.distributed.get_world_size()
        gathered: list = [None] * world
        recall_best = self.recall.best if self.recall is not None else []
        torch.distributed.all_gather_object(gathered, (self.voc.images, recall_best))
        per_rank = max(len(images) for images, _ in gathered)
        order = [(k, r) for k in range(per_rank) for r in range(world) if k < len(gathered[r][0])]
        order = order[:num_images] if num_images is not None else order
        self.voc.set_images([gathered[r][0][k] for k, r in order])
        if self.recall is not None:
            self.recall.best = [gathered[r][1][k] for k, r in order if k < len(gathered[r][1])]

    @property
    def num_images(self) -> int:
        return len(self.voc.images)
