"""An independent VOC scorer for the tests, written from the devkit's ``VOCevaldet.m`` and
``VOCap.m``: it reads the annotation XML and a ``comp4_det_<set>_<class>.txt`` result file and
knows nothing of the project's evaluator (numpy, VOC's 1-based coordinates with the devkit's +1
widths, MATLAB's stable sort and ``0:0.1:1``)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

# MATLAB's 0:0.1:1 (exactly 0.6 and 0.7, unlike numpy.arange)
THRESHOLDS = [0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def read_gt(root: str, image_set: str, class_name: str) -> dict[str, dict]:
    with open(os.path.join(root, "ImageSets", "Main", f"{image_set}.txt")) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    gt = {}
    for image_id in ids:
        tree = ET.parse(os.path.join(root, "Annotations", f"{image_id}.xml"))
        boxes, diff = [], []
        for obj in tree.findall("object"):
            if obj.findtext("name").strip() != class_name:
                continue
            bb = obj.find("bndbox")
            boxes.append([float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
            diff.append(obj.findtext("difficult", "0").strip() == "1")
        gt[image_id] = {"BB": np.array(boxes).reshape(-1, 4), "diff": np.array(diff, dtype=bool), "det": np.zeros(len(boxes), dtype=bool)}
    return gt


def voc_eval(results_file: str, root: str, image_set: str, class_name: str, use_07_metric: bool = True) -> float:
    gt = read_gt(root, image_set, class_name)
    npos = sum(int((~g["diff"]).sum()) for g in gt.values())
    with open(results_file) as f:
        rows = [line.split() for line in f if line.strip()]
    ids = [r[0] for r in rows]
    confidence = np.array([float(r[1]) for r in rows])
    BB = np.array([[float(v) for v in r[2:6]] for r in rows]).reshape(-1, 4)
    order = np.argsort(-confidence, kind="stable")  # MATLAB's sort(...,'descend') is stable
    nd = len(order)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d, i in enumerate(order):
        g = gt[ids[i]]
        bb = BB[i]
        ovmax, jmax = -np.inf, -1
        for j, bbgt in enumerate(g["BB"]):
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
            iw, ih = bi[2] - bi[0] + 1, bi[3] - bi[1] + 1
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (bbgt[2] - bbgt[0] + 1) * (bbgt[3] - bbgt[1] + 1) - iw * ih
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= 0.5:
            if not g["diff"][jmax]:
                if not g["det"][jmax]:
                    tp[d] = 1
                    g["det"][jmax] = True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / npos
    with np.errstate(invalid="ignore"):
        prec = tp / (fp + tp)
    if use_07_metric:
        ap = 0.0
        for t in THRESHOLDS:
            p = prec[rec >= t]
            p = p[~np.isnan(p)]
            ap += (p.max() if p.size else 0.0) / 11
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], np.nan_to_num(prec), [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    i = np.where(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))
