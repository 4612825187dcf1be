"""What an evaluation writes: the devkit's result files, a per-class table, PR curves.

Result files follow the VOC devkit (``VOCevaldet.m`` reads them): one file per class,
``results/comp4_det_<split>_<class>.txt``, one line per detection::

    <image_id> <score> <xmin> <ymin> <xmax> <ymax>

with VOC's 1-based pixel coordinates (:func:`fasterrcnn.boxes.boxes_to_voc`), so any external
VOC tool scores them. ``comp4`` is the devkit's name for "trained on any data".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from torch import Tensor

from fasterrcnn.boxes import boxes_to_voc


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
