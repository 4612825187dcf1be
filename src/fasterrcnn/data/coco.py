"""The reader for COCO-format detection data: an images folder and an ``instances_*.json`` file
(COCO's own layout, and what CVAT, Label Studio and most public datasets export).

A COCO file lists ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations``
(``id``, ``image_id``, ``category_id``, ``bbox`` as ``[x, y, width, height]``, ``iscrowd``) and
``categories`` (``id``, ``name``). The rules, beside VOC's (:mod:`fasterrcnn.data.voc`):

* **Loading**: JSON only (``json.loads``; never pickle), at most :data:`MAX_JSON_BYTES`; every
  entry is checked for COCO's layout before pycocotools' ``COCO`` indexes it (its index crashes
  on, or silently merges, what is wrong). A parsed file is kept for the next reader of the same
  unchanged file (:func:`read_coco_file`), so the class list and the datasets parse it once.
* **Classes**: the file's categories sorted by id (label ``i + 1`` is the ``i``-th), or the
  names chosen in ``classes`` (a subset, in that order): annotations of the other categories are
  left out and their images kept (background where nothing else is in them).
* **Boxes**: COCO's ``[x, y, w, h]`` is already in continuous pixel coordinates:
  :func:`fasterrcnn.boxes.coco_to_boxes` is the one conversion (no 1-pixel offset, unlike VOC).
  Boxes reaching outside the image are clipped to it, as VOC's.
* **Crowds**: ``iscrowd: 1`` is VOC's ``difficult``: kept with the flag, left out of the training
  targets, ignored by the VOC AP and a crowd region for the COCO-style mAP.
* **Paths**: ``<images>/<file_name>``. A ``file_name`` that is empty, absolute, or holds a
  backslash, a NUL byte or a ``..`` component refuses the whole file (``bad_json``), so no name
  reaches outside the images folder; subfolders (``images/abc.jpg``, as Label Studio writes)
  are fine. Symbolic links are followed and reported (``outside_link``).
* **Sample ids** are the image ids as strings (``"397133"``), in increasing id order: an
  evaluation then visits the images in the order pycocotools' ``COCOeval`` does, so score ties
  between images are broken the same way.

What can be wrong is a :class:`fasterrcnn.data.voc.Problem` of the same
:data:`~fasterrcnn.data.voc.PROBLEM_KINDS` as VOC where one applies (``missing_image``,
``unknown_class`` for a ``category_id`` the file does not define, ``bad_box``,
``degenerate_box``, ``box_outside``, ``box_clipped``, ``size_mismatch``, ``no_objects``,
``missing_size``, ``too_many_objects``, ``outside_link``) and three of COCO's own: ``bad_json``
(the file itself: refused under every ``data.on_bad_sample``, like a bad split file),
``duplicate_image_id`` (both images are bad samples) and ``orphan_annotation`` (an annotation of
an image the file does not list: a warning, it is not used). A problem's ``file`` is the JSON
file (the image for image problems), its message names the annotation and image ids.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch.utils.data import Dataset

from fasterrcnn.boxes import boxes_to_coco, coco_to_boxes
from fasterrcnn.data.check import outside_link, read_image_size
from fasterrcnn.data.voc import (
    MAX_OBJECTS,
    DatasetError,
    Problem,
    clip_boxes,
    first_error,
    load_image,
    not_a_file,
)

# COCO's instances_train2017.json is 448 MiB; a file larger than this is not read at all.
MAX_JSON_BYTES = 1 << 30


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unsafe_file_name(name: object) -> str | None:
    """Why ``name`` cannot be an image path under the images folder, or None."""
    if not isinstance(name, str) or not name.strip():
        return "is not a non-empty string"
    if "\0" in name or "\\" in name:
        return "holds a NUL byte or a backslash (use '/' between folders)"
    if os.path.isabs(name) or name.startswith("/"):
        return "is an absolute path (file names are relative to the images folder)"
    if ".." in name.split("/"):
        return "has a '..' component (it would reach outside the images folder)"
    return None


@dataclass
class COCOFile:
    """One checked and indexed annotation file.

    ``coco``: pycocotools' ``COCO`` index of it (``imgs``, ``imgToAnns``, ``cats``);
    ``categories``: id -> name, in increasing id order; ``duplicates``: image id -> its file
    names, for the ids listed more than once; ``warnings``: the file's ``orphan_annotation``\\ s."""

    path: str
    coco: object
    categories: dict[int, str]
    duplicates: dict[int, list[str]] = field(default_factory=dict)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def image_ids(self) -> list[int]:
        """Every image id, each once, in increasing order."""
        return sorted(self.coco.imgs)  # type: ignore[attr-defined]


def _layout_error(data: object) -> str | None:
    """What makes ``data`` (parsed JSON) not COCO's layout, or None. Categories, images and
    annotations need integer ids (the index is built on them), annotations an integer
    ``category_id``; boxes and unknown categories are checked per sample."""
    if not isinstance(data, dict):
        return "the top level is not an object with images, annotations and categories"
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            return f"no '{key}' list"
    if not isinstance(data.get("annotations", []), list):
        return "'annotations' is not a list"
    names: Counter = Counter()
    cat_ids: Counter = Counter()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str) or not cat["name"].strip():
            return f"categories[{i}] has no integer 'id' and non-empty 'name'"
        names[cat["name"]] += 1
        cat_ids[cat["id"]] += 1
    for what, counts in (("id", cat_ids), ("name", names)):
        again = [k for k, n in counts.items() if n > 1]
        if again:
            return f"two categories have the {what} {again[0]!r} (each category needs its own id and name)"
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            return f"images[{i}] has no integer 'id'"
        why = _unsafe_file_name(img.get("file_name"))
        if why is not None:
            return f"images[{i}] (id {img['id']}): file_name {img.get('file_name')!r} {why}"
    for i, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict):
            return f"annotations[{i}] is not an object"
        for key in ("id", "image_id", "category_id"):
            if not _is_int(ann.get(key)):
                return f"annotations[{i}] has no integer '{key}'"
        if ann.get("iscrowd", 0) not in (0, 1):  # True and False compare equal to 1 and 0
            return f"annotations[{i}] (id {ann['id']}): iscrowd is {ann.get('iscrowd')!r}, not 0 or 1"
    return None


def _parse(path: str) -> tuple[COCOFile | None, list[Problem]]:
    def refused(message: str) -> tuple[None, list[Problem]]:
        return None, [Problem(path, "bad_json", message)]

    why = not_a_file(path, "annotation")
    if why is not None:
        return refused(why)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        return refused(f"cannot read the annotation file ({err.strerror or err})")
    if len(data) > MAX_JSON_BYTES:
        return refused(f"larger than {MAX_JSON_BYTES >> 20} MiB (fasterrcnn.data.coco.MAX_JSON_BYTES): not read")
    try:
        content = json.loads(data)  # bytes: UTF-8 (a byte-order mark allowed), UTF-16 or UTF-32
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return refused(f"not JSON ({err})")
    error = _layout_error(content)
    if error is not None:
        return refused(f"not a COCO annotation file: {error}")
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": content["images"], "annotations": content.get("annotations", []), "categories": content["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):  # its "creating index..." lines
        coco.createIndex()
    names: dict[int, list[str]] = {}
    for img in content["images"]:
        names.setdefault(img["id"], []).append(img["file_name"])
    duplicates = {i: files for i, files in names.items() if len(files) > 1}
    warnings = [
        Problem(path, "orphan_annotation", f"annotation {ann['id']}: image_id {ann['image_id']} is not one of the file's images; not used")
        for ann in coco.dataset["annotations"]
        if ann["image_id"] not in names
    ]
    categories = {c["id"]: c["name"] for c in sorted(content["categories"], key=lambda c: c["id"])}
    return COCOFile(path, coco, categories, duplicates, warnings), []


@lru_cache(maxsize=4)
def _parse_cached(path: str, _stat: tuple[int, int, int, int]) -> tuple[COCOFile | None, list[Problem]]:
    return _parse(path)


def read_coco_file(path: str) -> tuple[COCOFile | None, list[Problem]]:
    """The checked, indexed file at ``path``, or None and its ``bad_json`` problem; never
    raises. An unchanged file (the same inode, size and modification and change times) is
    parsed once per process (the last 4 files are kept)."""
    try:
        st = os.stat(path)
    except OSError:
        return _parse(os.path.abspath(path))
    return _parse_cached(os.path.abspath(path), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))


def resolve_classes(file: COCOFile, classes: Sequence[str] | None) -> tuple[tuple[str, ...], list[Problem]]:
    """The class list: the file's category names in increasing id order, or ``classes``; a
    chosen name that is no category of the file is an ``unknown_class`` error."""
    if classes is None:
        return tuple(file.categories.values()), []
    known = set(file.categories.values())
    missing = [c for c in classes if c not in known]
    if missing:
        listing = ", ".join(file.categories.values())
        return tuple(classes), [Problem(file.path, "unknown_class", f"data.classes names {', '.join(map(repr, missing))}, not a category of this file (its categories: {listing})")]
    return tuple(classes), []


def coco_categories(path: str) -> list[str]:
    """The category names of the COCO file at ``path`` in increasing id order (the default
    ``data.classes`` of ``data=coco``); raises DatasetError naming the file."""
    file, problems = read_coco_file(path)
    if file is None:
        raise DatasetError(str(problems[0]), kind=problems[0].kind)
    return list(file.categories.values())


def _box_problems(xywh: list[float], size: tuple[int, int], path: str, where: str, image_id: str) -> list[Problem]:
    """A COCO box against an image of ``size`` (height, width), in continuous coordinates: nothing
    inside is ``box_outside``, reaching outside ``[0, width] x [0, height]`` is ``box_clipped``."""
    height, width = size
    x, y, w, h = xywh
    if x + w <= 0 or y + h <= 0 or x >= width or y >= height:
        return [Problem(path, "box_outside", f"{where}: bbox {xywh} lies outside the {width}x{height} image", image_id)]
    if x < 0 or y < 0 or x + w > width or y + h > height:
        return [Problem(path, "box_clipped", f"{where}: bbox {xywh} reaches outside the {width}x{height} image", image_id)]
    return []


class COCODetection(Dataset):
    """The images of one COCO annotation file.

    Args:
        images: the folder the file's ``file_name``\\ s are relative to.
        annotations: the COCO JSON file.
        classes: the class names, label ``i + 1`` is ``classes[i]``; None: the file's categories
            in increasing id order. Annotations of other categories are left out.
        ids: the sample ids to read (image ids as strings; default: every image of the file, in
            increasing id order); the DataModule passes them less the bad samples under
            ``data.on_bad_sample=skip``.
        max_objects: refuse an image with more annotations (``data.max_objects``; None: no cap).

    Items are VOCDetection's: ``image (3, H, W)`` uint8, ``boxes (G, 4)`` continuous
    coordinates clipped to the image, ``labels (G,)``, ``difficult (G,)`` (``iscrowd``) and
    ``image_id``. Raises :class:`DatasetError` naming the file for a bad file (``bad_json``, when
    constructed) or a bad sample (when read), so a wrong label is never returned.

    ``category_ids[i]`` is the COCO category id of label ``i + 1`` (for results files).
    """

    def __init__(
        self,
        images: str,
        annotations: str,
        classes: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        max_objects: int | None = MAX_OBJECTS,
    ) -> None:
        self.images = images
        self.annotations = os.path.abspath(annotations)  # as in the file's own problems
        self.max_objects = max_objects
        file, problems = read_coco_file(annotations)
        if file is None:
            raise DatasetError(str(problems[0]), kind=problems[0].kind)
        self.file = file
        self.classes, problems = resolve_classes(file, classes)
        if problems:
            raise DatasetError(str(problems[0]), kind=problems[0].kind)
        self.class_to_index = {name: i + 1 for i, name in enumerate(self.classes)}
        by_name = {name: cat_id for cat_id, name in file.categories.items()}
        self.category_ids = [by_name[name] for name in self.classes]
        self.category_to_label = {cat_id: i + 1 for i, cat_id in enumerate(self.category_ids)}
        if ids is None:
            self.ids = [str(i) for i in file.image_ids]
        else:
            self.ids = list(ids)
            unknown = [i for i in self.ids if not i.lstrip("-").isdecimal() or int(i) not in file.coco.imgs]  # type: ignore[attr-defined]
            if unknown:
                raise DatasetError(f"{self.annotations}: no image with id {unknown[0]!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def with_ids(self, ids: Sequence[str]) -> COCODetection:
        """The same file (not parsed again) with only the samples ``ids``."""
        other = copy.copy(self)
        other.ids = list(ids)
        return other

    def entry(self, image_id: str) -> dict:
        return self.file.coco.imgs[int(image_id)]  # type: ignore[attr-defined]

    def image_path(self, image_id: str) -> str:
        return os.path.join(self.images, self.entry(image_id)["file_name"])

    def target(self, image_id: str) -> tuple[dict | None, list[Problem]]:
        """One image's annotations -> (target, every problem found), never raising; reads no file.

        ``target``: ``boxes (G, 4)`` continuous (not yet clipped), ``labels (G,)`` in 1..K,
        ``difficult (G,)`` (``iscrowd``), ``size`` (height, width) from the image entry or None;
        None with more than ``max_objects`` annotations. Annotations of categories outside
        ``classes`` are left out (after the check that the file defines their category)."""
        path, entry = self.annotations, self.entry(image_id)
        where_image = f"image {image_id} ('{entry['file_name']}')"

        def problem(kind: str, message: str) -> Problem:
            return Problem(path, kind, message, image_id)

        problems = []
        files = self.file.duplicates.get(int(image_id))
        if files is not None:
            listing = ", ".join(repr(f) for f in files)
            problems.append(problem("duplicate_image_id", f"{where_image}: its id is listed {len(files)} times in images ({listing}): which image its annotations belong to is ambiguous"))
        anns = self.file.coco.imgToAnns.get(int(image_id), [])  # type: ignore[attr-defined]
        if self.max_objects is not None and len(anns) > self.max_objects:
            message = (
                f"{where_image} has {len(anns)} annotations, more than data.max_objects={self.max_objects} (memory grows with the "
                f"objects of one image; raise data.max_objects, or set it to null for no cap, to use this image)"
            )
            return None, [*problems, problem("too_many_objects", message)]
        w, h = entry.get("width"), entry.get("height")
        size = (h, w) if _is_int(w) and _is_int(h) and w > 0 and h > 0 else None
        boxes, labels, crowd = [], [], []
        for ann in anns:
            where = f"annotation {ann['id']} of {where_image}"
            cat = ann["category_id"]
            if cat not in self.file.categories:
                known = ", ".join(f"{i} {n}" for i, n in self.file.categories.items())
                problems.append(problem("unknown_class", f"{where}: category_id {cat} is not one of the file's categories ({known})"))
                continue
            if cat not in self.category_to_label:
                continue  # a category outside data.classes: left out
            bbox = ann.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) and math.isfinite(v) for v in bbox):
                problems.append(problem("bad_box", f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, width, height]"))
                continue
            if bbox[2] <= 0 or bbox[3] <= 0:
                problems.append(problem("degenerate_box", f"{where}: bbox {bbox} has width or height <= 0 (no area)"))
            elif size is not None:
                problems += _box_problems([float(v) for v in bbox], size, path, where, image_id)
            boxes.append([float(v) for v in bbox])
            labels.append(self.category_to_label[cat])
            crowd.append(bool(ann.get("iscrowd", 0)))
        if not anns and not problems:
            problems.append(problem("no_objects", f"{where_image} has no annotations"))
        if size is None:
            problems.append(problem("missing_size", f"{where_image} has no usable width and height (positive integers)"))
        target = {
            # float64 first: x + w is then rounded once, into float32
            "boxes": coco_to_boxes(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)).float(),
            "labels": torch.tensor(labels, dtype=torch.long),
            "difficult": torch.tensor(crowd, dtype=torch.bool),
            "size": size,
        }
        return target, problems

    def check(self, decode: bool = False) -> list[Problem]:
        """Every problem of the file's samples ``ids`` (:meth:`check_sample`) and its
        ``orphan_annotation`` warnings, never raising."""
        return list(self.file.warnings) + [p for image_id in self.ids for p in self.check_sample(image_id, decode)]

    def check_sample(self, image_id: str, decode: bool = False) -> list[Problem]:
        """Every problem of one sample: its annotations (:meth:`target`), its image (there, a file,
        readable; fully decoded when ``decode``; a link leading outside the images folder) and
        whether the entry's width and height are the image's (after EXIF rotation)."""
        target, problems = self.target(image_id)
        img = self.image_path(image_id)
        link = outside_link(self.images, img, image_id)
        if link is not None:
            problems.append(link)
        size, image_problem = read_image_size(img, image_id, decode)
        if image_problem is not None:
            return problems + [image_problem]
        if target is None:
            return problems
        if target["size"] is None:  # no width/height: the boxes can only be checked against the image
            for k, box in enumerate(boxes_to_coco(target["boxes"]).tolist()):
                problems += _box_problems(box, size, self.annotations, f"box {k} of image {image_id}", image_id)  # type: ignore[arg-type]
        elif target["size"] != size:
            (json_h, json_w), (h, w) = target["size"], size
            hint = " (width and height swapped: labelled before its EXIF rotation?)" if (json_h, json_w) == (w, h) else ""
            problems.append(Problem(self.annotations, "size_mismatch", f"image {image_id}: the file says {json_w}x{json_h} but the image {img} is {w}x{h}{hint}", image_id))
        return problems

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        target, problems = self.target(image_id)
        error = first_error(problems)
        if error is not None:
            raise DatasetError(str(error), kind=error.kind)
        assert target is not None
        path = self.image_path(image_id)
        image = load_image(path)
        size = tuple(image.shape[-2:])
        if target["size"] is not None and target["size"] != size:
            raise DatasetError(
                f"{self.annotations}: image {image_id} is {target['size'][1]}x{target['size'][0]} in the file but {path} is "
                f"{size[1]}x{size[0]} (after EXIF rotation): the boxes may not match it",
                kind="size_mismatch",
            )
        boxes = clip_boxes(target["boxes"], size)  # type: ignore[arg-type]
        if bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
            raise DatasetError(f"{self.annotations}: a box of image {image_id} lies outside the {size[1]}x{size[0]} image {path}", kind="box_outside")
        return {"image": image, "boxes": boxes, "labels": target["labels"], "difficult": target["difficult"], "image_id": image_id}


def check_coco(images: str, annotations: str, classes: Sequence[str] | None, decode: bool = False, max_objects: int | None = MAX_OBJECTS) -> tuple[int, list[Problem]]:
    """The sample count and every problem of one COCO file and its images, never raising: a file
    that cannot be used at all is one ``bad_json`` (or ``unknown_class``, for a ``classes`` name
    it lacks) problem and no samples."""
    file, problems = read_coco_file(annotations)
    if file is not None:
        problems = resolve_classes(file, classes)[1]
    if problems:
        return 0, problems
    dataset = COCODetection(images, annotations, classes, max_objects=max_objects)
    return len(dataset), dataset.check(decode)
