"""Helpers for tests: small VOC-layout folders written on the fly."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def write_voc(tmp_path, images: dict, classes, size=(40, 50), split="trainval") -> str:
    """Write a VOC-layout folder. ``images``: id -> list of (name, (xmin, ymin, xmax, ymax), difficult)."""
    root = os.path.join(str(tmp_path), "VOC")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    h, w = size
    rng = np.random.default_rng(0)
    for image_id, objects in images.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"))
        objs = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for n, b, d in objects
        )
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>")
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("".join(f"{i}\n" for i in images))
    return root
