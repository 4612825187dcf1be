"""What an evaluation writes: the devkit's result files, a per-class table, PR curves.

Result files follow the VOC devkit (``VOCevaldet.m`` reads them): one file per class,
``results/comp4_det_<split>_<class>.txt``, one line per detection::

    <image_id> <score> <xmin> <ymin> <xmax> <ymax>

with VOC's 1-based pixel coordinates (:func:`fasterrcnn.boxes.boxes_to_voc`), so any external
VOC tool scores them. ``comp4`` is the devkit's name for "trained on any data".

Beside them, COCO's results format (:func:`write_coco_files`): ``results/coco_<split>_bbox.json``,
a list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` (continuous
coordinates, :func:`fasterrcnn.boxes.boxes_to_coco`, the float32 numbers the COCO-style mAP
saw), which ``pycocotools``' ``COCO.loadRes`` and ``COCOeval`` read against a ground-truth file:

* data read from **one COCO file**: its own image and category ids; the ground truth is that file;
* **any other data** (VOC layout, several sets): image ``k`` of the evaluation (1-based, in the
  order evaluated) is image id ``k``, label ``i`` is category id ``i`` (the classes in order),
  and ``results/coco_<split>_gt.json`` is written as the ground truth they refer to: the boxes as
  evaluated (continuous, clipped to the image), difficult objects as ``iscrowd: 1``, each image's
  ``file_name`` its id + ``.jpg``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from torch import Tensor

from fasterrcnn.boxes import boxes_to_coco, boxes_to_voc


def results_path(folder: str, split: str, class_name: str) -> str:
    return os.path.join(folder, f"comp4_det_{split}_{class_name}.txt")


def write_voc_results(folder: str, split: str, class_names: Sequence[str], image_ids: Sequence[str], detections: Sequence[dict[str, Tensor]]) -> list[str]:
    """Write one devkit result file per class (an empty file for a class never detected).

    Args:
        image_ids: the id of each image; detections: per image ``boxes (D, 4)`` (continuous,
            original image coordinates), ``scores (D,)``, ``labels (D,)`` in 1..K.
    Returns:
        the paths written, in class order.
    """
    os.makedirs(folder, exist_ok=True)
    lines: list[list[str]] = [[] for _ in class_names]
    for image_id, det in zip(image_ids, detections):
        voc = boxes_to_voc(det["boxes"].detach().double().cpu()).tolist()
        for (x1, y1, x2, y2), score, label in zip(voc, det["scores"].tolist(), det["labels"].tolist()):
            # 6 decimals keep the score order and the IoUs of the in-memory evaluation.
            lines[label - 1].append(f"{image_id} {score:.6f} {x1:.3f} {y1:.3f} {x2:.3f} {y2:.3f}\n")
    paths = []
    for name, rows in zip(class_names, lines):
        path = results_path(folder, split, name)
        with open(path, "w") as f:
            f.writelines(rows)
        paths.append(path)
    return paths


def coco_results(coco_image_ids: Sequence[int], detections: Sequence[dict[str, Tensor]], category_ids: Sequence[int]) -> list[dict]:
    """COCO's results format: one ``{"image_id", "category_id", "bbox", "score"}`` per detection,
    image by image in the order given. ``category_ids[i]`` is the category id of label ``i + 1``.
    Boxes and scores are the detections' float32 values, written in full (Python's float repr
    reads back exactly), converted as torchmetrics' COCO-style mAP converts them."""
    out = []
    for image_id, det in zip(coco_image_ids, detections):
        bboxes = boxes_to_coco(det["boxes"].detach().cpu().float()).tolist()
        for bbox, score, label in zip(bboxes, det["scores"].detach().cpu().float().tolist(), det["labels"].tolist()):
            out.append({"image_id": int(image_id), "category_id": int(category_ids[label - 1]), "bbox": bbox, "score": score})
    return out


def coco_ground_truth(coco_image_ids: Sequence[int], names: Sequence[str], ground_truth: Sequence[dict], class_names: Sequence[str]) -> dict:
    """A COCO ground-truth file of what was evaluated: per image ``boxes (G, 4)`` (continuous,
    original coordinates), ``labels`` 1..K, ``difficult`` (``iscrowd: 1``) and ``size``
    (height, width); ``names[k]`` gives image ``k``'s ``file_name`` (``<name>.jpg``). Categories
    are 1..K in class order, annotation ids run from 1 (COCOeval takes id 0 for "unmatched"),
    ``area`` is the box's ``w * h`` (what the COCO-style mAP uses for small/medium/large)."""
    images, annotations = [], []
    for image_id, name, gt in zip(coco_image_ids, names, ground_truth):
        height, width = gt["size"]
        images.append({"id": int(image_id), "file_name": f"{name}.jpg", "width": int(width), "height": int(height)})
        bboxes = boxes_to_coco(gt["boxes"].detach().cpu().float()).tolist()
        for bbox, label, crowd in zip(bboxes, gt["labels"].tolist(), gt["difficult"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id), "category_id": int(label), "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": int(crowd)})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(class_names)]
    return {"info": {"description": "ground truth as evaluated (fasterrcnn.evaluation.results)"}, "images": images, "annotations": annotations, "categories": categories}


def write_coco_files(
    folder: str,
    split: str,
    class_names: Sequence[str],
    image_ids: Sequence[str],
    detections: Sequence[dict[str, Tensor]],
    ground_truth: Sequence[dict],
    coco=None,
) -> dict[str, str]:
    """Write ``coco_<split>_bbox.json`` (:func:`coco_results`) and, unless the data is one COCO
    file, ``coco_<split>_gt.json`` (:func:`coco_ground_truth`): the module docstring's rules.

    Args:
        image_ids: the sample ids in evaluation order; detections, ground_truth: per image.
        coco: the :class:`fasterrcnn.data.coco.COCODetection` the images came from (its
            ``category_ids`` and ``annotations`` file), or None.
    Returns:
        ``{"coco_results": path, "coco_gt": path}``: the results and the ground truth they
        refer to.
    """
    os.makedirs(folder, exist_ok=True)
    if coco is not None:
        coco_ids, category_ids, gt_path = [int(i) for i in image_ids], list(coco.category_ids), os.path.abspath(coco.annotations)
    else:
        coco_ids, category_ids = list(range(1, len(image_ids) + 1)), list(range(1, len(class_names) + 1))
        gt_path = os.path.join(folder, f"coco_{split}_gt.json")
        with open(gt_path, "w") as f:
            json.dump(coco_ground_truth(coco_ids, image_ids, ground_truth, class_names), f)
    path = os.path.join(folder, f"coco_{split}_bbox.json")
    with open(path, "w") as f:
        json.dump(coco_results(coco_ids, detections, category_ids), f)
    return {"coco_results": path, "coco_gt": gt_path}


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def per_class_table(per_class: dict[str, dict], summary: dict[str, float]) -> str:
    """A markdown table: per class both VOC APs and the counts, then the means."""
    rows = ["| class | AP (VOC07 11-point) | AP (VOC10 all-point) | objects | detections |", "|---|---:|---:|---:|---:|"]
    for name, c in per_class.items():
        rows.append(f"| {name} | {_fmt(c['ap_voc07'])} | {_fmt(c['ap_voc10'])} | {c['num_gt']} | {c['num_det']} |")
    rows.append(f"| **mean** | **{_fmt(summary.get('map_voc07'))}** | **{_fmt(summary.get('map_voc10'))}** | | |")
    return "\n".join(rows) + "\n"


def plot_pr_curves(curves: dict[str, tuple[Tensor, Tensor]], aps: dict[str, float], path: str | None = None, title: str = ""):
    """One precision-recall curve per class (legend with its AP); saved to ``path`` when given.
    Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, (recall, precision) in curves.items():
        ap = aps.get(name, float("nan"))
        ax.plot(recall.numpy(), precision.numpy(), label=f"{name} ({ap:.3f})", linewidth=1.4)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title or "precision-recall per class (AP)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2 if len(curves) > 10 else 1)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
    return fig
