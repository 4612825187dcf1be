"""The one reader for the PASCAL VOC layout (real VOC and the built-in data alike).

A VOC-layout folder holds ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and
``ImageSets/Main/<split>.txt`` (one image id per line). Image paths come from the split's ids,
never from the XML's ``filename`` field, so an annotation cannot point outside the folder.
VOC's 1-based inclusive pixel coordinates become continuous boxes in exactly one place:
:func:`fasterrcnn.boxes.voc_to_boxes`.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import torch
from torch import Tensor
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fasterrcnn.boxes import voc_to_boxes

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


class DatasetError(RuntimeError):
    """A dataset file is missing or wrong; the message names the file and the problem."""


def split_path(root: str, split: str) -> str:
    return os.path.join(root, "ImageSets", "Main", f"{split}.txt")


def read_split(root: str, split: str) -> list[str]:
    """The image ids listed in ``ImageSets/Main/<split>.txt``."""
    path = split_path(root, split)
    if not os.path.isfile(path):
        raise DatasetError(f"{path} not found: no split '{split}' in the VOC-layout folder {root}")
    with open(path, encoding="utf-8") as f:
        ids = [line.split()[0] for line in f if line.strip()]
    for image_id in ids:
        if os.sep in image_id or "/" in image_id or image_id in (".", ".."):
            raise DatasetError(f"{path}: '{image_id}' is not an image id (ids may not contain path separators)")
    return ids


def parse_voc_xml(path: str, class_to_index: dict[str, int]) -> dict[str, Tensor]:
    """One annotation file -> ``boxes (G, 4)`` (continuous coordinates), ``labels (G,)`` in 1..K,
    ``difficult (G,)`` bool, ``size`` (height, width) or None.

    Refuses DTDs and entity declarations (an XML bomb never gets expanded) and reports every
    problem with the file's path.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the annotation ({err.strerror or err})") from err
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise DatasetError(f"{path}: DTD or entity declarations are not allowed in an annotation")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise DatasetError(f"{path}: malformed XML ({err})") from err
    boxes, labels, difficult = [], [], []
    for i, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if name not in class_to_index:
            raise DatasetError(f"{path}: object {i} has unknown class '{name}' (known: {', '.join(class_to_index)})")
        bb = obj.find("bndbox")
        try:
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr, arg-type]
        except (AttributeError, TypeError, ValueError) as err:
            raise DatasetError(f"{path}: object {i} ('{name}') has a missing or non-numeric bndbox") from err
        if box[2] < box[0] or box[3] < box[1]:
            raise DatasetError(f"{path}: object {i} ('{name}') has xmax < xmin or ymax < ymin: {box}")
        boxes.append(box)
        labels.append(class_to_index[name])
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    size = None
    w, h = root.findtext("size/width"), root.findtext("size/height")
    if w and h and w.strip().isdigit() and h.strip().isdigit():
        size = (int(h), int(w))
    return {
        "boxes": voc_to_boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        "labels": torch.tensor(labels, dtype=torch.long),
        "difficult": torch.tensor(difficult, dtype=torch.bool),
        "size": size,  # type: ignore[dict-item]
    }


def load_image(path: str) -> Tensor:
    """``(3, H, W)`` uint8 RGB, whatever the file's mode (grey, RGBA, CMYK, palette), with its
    EXIF rotation applied."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
                arr = np.asarray(img, dtype=np.float64)
                img = Image.fromarray((arr * (255.0 / max(arr.max(), 1.0))).astype(np.uint8))
            rgb = np.asarray(img.convert("RGB"))
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: image not found") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot decode the image ({err})") from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


class VOCDetection(torch.utils.data.Dataset):
    """Images and annotations of one split of one VOC-layout folder.

    Args:
        root: the folder holding ``JPEGImages``, ``Annotations`` and ``ImageSets``.
        split: a file name in ``ImageSets/Main`` without ``.txt`` (``trainval``, ``test``...).
        classes: the class names; label ``i + 1`` is ``classes[i]`` (0 is background).

    Items: ``image (3, H, W)`` uint8, ``boxes (G, 4)`` continuous coordinates, ``labels (G,)``,
    ``difficult (G,)`` and ``image_id``. Difficult objects are kept, flagged.
    """

    def __init__(self, root: str, split: str, classes: Sequence[str]) -> None:
        self.root = root
        self.split = split
        self.classes = tuple(classes)
        self.class_to_index = {name: i + 1 for i, name in enumerate(self.classes)}
        self.ids = read_split(root, split)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: str) -> str:
        return os.path.join(self.root, "JPEGImages", f"{image_id}.jpg")

    def annotation_path(self, image_id: str) -> str:
        return os.path.join(self.root, "Annotations", f"{image_id}.xml")

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        target = parse_voc_xml(self.annotation_path(image_id), self.class_to_index)
        image = load_image(self.image_path(image_id))
        return {"image": image, "boxes": target["boxes"], "labels": target["labels"], "difficult": target["difficult"], "image_id": image_id}
