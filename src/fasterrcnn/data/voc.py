"""The one reader for the PASCAL VOC layout (real VOC and the built-in data alike).

A VOC-layout folder holds ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml`` and
``ImageSets/Main/<split>.txt`` (UTF-8, a byte-order mark allowed, one image id per line: its
first word). Image paths come from the split's ids, never from the XML's ``filename`` field, so
an annotation cannot point outside the folder. Symbolic links are followed (datasets often live
on another disk); :mod:`fasterrcnn.data.check` reports each file whose real path lies outside
the folder (``outside_link``).
VOC's 1-based inclusive pixel coordinates become continuous boxes in exactly one place:
:func:`fasterrcnn.boxes.voc_to_boxes`.

What can be wrong with a file is a :class:`Problem` of one of the :data:`PROBLEM_KINDS`.
:func:`read_annotation` collects every problem of an annotation without raising (for
:mod:`fasterrcnn.data.check`); the reader itself (:func:`parse_voc_xml`, :class:`VOCDetection`)
raises :class:`DatasetError` naming the file at the first error. Messages escape control
characters (:func:`printable`): an id from a split file cannot rewrite the terminal.
"""

from __future__ import annotations

import codecs
import logging
import math
import os
import stat
import xml.etree.ElementTree as ET
import xml.parsers.expat
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from fasterrcnn.boxes import voc_to_boxes

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

# A VOC annotation is about 1 KB; anything this large is not one (and is never read whole).
MAX_ANNOTATION_BYTES = 4 << 20
# data.max_objects, the default cap on the objects of one annotation (None: no cap). Matching
# A anchors against G objects holds (A, G) IoU matrices: about 20k anchors x 2000 objects is
# 160 MB per matrix, and a legal 4 MiB annotation can list 30k objects (GBs). VOC and COCO
# images have at most about a hundred objects, so 2000 refuses only files that are not real
# annotations or are meant for another kind of task (crowd counting).
MAX_OBJECTS = 2000

# kind -> (severity, what it means). "error": the sample is unusable (training skips it or stops,
# data.on_bad_sample); "warning": the sample is used as documented (clipped boxes, no objects).
PROBLEM_KINDS = {
    "bad_split": ("error", "the split file is missing, empty, not UTF-8 text, or lists an id that is not a plain file name"),
    "missing_xml": ("error", "no annotation file (nothing there, a directory, a broken link)"),
    "unreadable_xml": ("error", "the annotation cannot be read (permissions, too large)"),
    "malformed_xml": ("error", "the annotation is not well-formed XML"),
    "unsafe_xml": ("error", "the annotation declares a DTD or entities (refused, never expanded)"),
    "too_many_objects": ("error", "the annotation has more objects than data.max_objects"),
    "unknown_class": ("error", "an object's class is not in data.classes (COCO: its category_id is not one of the file's categories)"),
    "bad_box": ("error", "an object's bndbox is missing, not numeric or not finite (COCO: bbox is not 4 finite numbers)"),
    "degenerate_box": ("error", "xmax < xmin or ymax < ymin (no area, VOC's inclusive pixels; COCO: width or height <= 0)"),
    "box_outside": ("error", "a box lies entirely outside the image"),
    "missing_image": ("error", "no image file (nothing there, a directory, a broken link)"),
    "unreadable_image": ("error", "the image cannot be opened or decoded"),
    "size_mismatch": ("error", "the annotation's <size> (COCO: the image entry's width and height) is not the image's size (after EXIF rotation)"),
    "bad_json": ("error", "a COCO annotation file is missing, unreadable, too large, not JSON or not COCO's layout, or names an image outside its folder"),
    "duplicate_image_id": ("error", "a COCO file lists two images with the same id: which image its annotations belong to is ambiguous"),
    "box_clipped": ("warning", "a box reaches outside the image; it is clipped to the image"),
    "no_objects": ("warning", "the annotation has no objects (the image trains as background only)"),
    "missing_size": ("warning", "the annotation has no usable <size>; boxes are checked against the image"),
    "duplicate_id": ("warning", "an id is listed more than once in the split file; it is used once"),
    "outside_link": ("warning", "a symbolic link to a file outside the dataset folder; it is followed and read"),
    "orphan_annotation": ("warning", "a COCO annotation names an image id that the file's images do not list; it is not used"),
}


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\x1b``, ``\\ufeff``),
    newlines and tabs kept."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode("ascii") for c in text)


class DatasetError(RuntimeError):
    """A dataset file is missing or wrong; the message names the file and the problem, with
    control characters escaped. ``kind``: the :data:`PROBLEM_KINDS` key, when one applies."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(printable(message))
        self.kind = kind


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file: ``kind`` is a key of :data:`PROBLEM_KINDS`; ``image_id``
    is the sample it makes bad (None for a split file)."""

    file: str
    kind: str
    message: str
    image_id: str | None = None

    @property
    def severity(self) -> str:
        return PROBLEM_KINDS[self.kind][0]

    def __str__(self) -> str:
        return printable(f"{self.file}: {self.message}")


def split_path(root: str, split: str) -> str:
    return os.path.join(root, "ImageSets", "Main", f"{split}.txt")


def annotation_path(root: str, image_id: str) -> str:
    return os.path.join(root, "Annotations", f"{image_id}.xml")


def image_path(root: str, image_id: str) -> str:
    return os.path.join(root, "JPEGImages", f"{image_id}.jpg")


def _is_plain_id(image_id: str) -> bool:
    # "/" and "\" on every OS, so a split file refused on Windows is refused here too.
    return not ({"/", "\\", os.sep, "\0"} & set(image_id)) and image_id not in (".", "..")


def split_ids(root: str, split: str) -> tuple[list[str], list[Problem]]:
    """The plain image ids listed in ``ImageSets/Main/<split>.txt`` (each once, in file order)
    and its problems: ``bad_split`` for a missing, unreadable or empty file, for each line that
    is not UTF-8 and each id that is not a plain file name (a path separator, ``..``: no id
    reaches outside the folder); ``duplicate_id`` for each id listed again, with its lines.
    A UTF-8 byte-order mark is dropped (Windows editors write one)."""
    path = split_path(root, split)
    if not os.path.lexists(path):
        return [], [Problem(path, "bad_split", f"not found: no split '{split}' in the VOC-layout folder {root}")]
    why = not_a_file(path, "split")
    if why is not None:
        return [], [Problem(path, "bad_split", why)]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return [], [Problem(path, "bad_split", f"cannot read the split file ({err.strerror or err})")]
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return [], [Problem(path, "bad_split", "is UTF-16 text: save it as UTF-8, one image id a line")]
    first_line: dict[str, int] = {}  # id -> the line it is read from (dicts keep file order)
    again: dict[str, list[int]] = {}
    problems = []
    for number, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).splitlines(), start=1):  # \n, \r\n or \r
        try:
            words = raw.decode("utf-8").split()
        except UnicodeDecodeError as err:
            where = f"line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
            problems.append(Problem(path, "bad_split", f"{where}; save the split file as UTF-8"))
            continue
        if not words:
            continue
        image_id = words[0]
        if not _is_plain_id(image_id):
            why = "ids may not contain path separators or NUL bytes, or be '.' or '..'"
            problems.append(Problem(path, "bad_split", f"line {number}: '{image_id}' is not an image id ({why})"))
        elif image_id in first_line:
            again.setdefault(image_id, [first_line[image_id]]).append(number)
        else:
            first_line[image_id] = number
    if not first_line and not problems:
        problems.append(Problem(path, "bad_split", "lists no image ids: an empty split, nothing to train or evaluate on"))
    for image_id, lines in again.items():
        where = ", ".join(map(str, lines))
        problems.append(Problem(path, "duplicate_id", f"'{image_id}' is listed on lines {where}: read once, from line {lines[0]}", image_id))
    return list(first_line), problems


def read_split(root: str, split: str) -> list[str]:
    """:func:`split_ids`, raising DatasetError at the first error (a bad id is refused, never
    skipped: a split file pointing outside its folder is not a data glitch). Ids listed twice are
    read once, with one warning in the log naming them and their lines."""
    ids, problems = split_ids(root, split)
    error = first_error(problems)
    if error is not None:
        raise DatasetError(str(error), kind=error.kind)
    again = [p for p in problems if p.kind == "duplicate_id"]
    if again:
        listing = "".join(f"\n  {p.message}" for p in again[:5]) + (f"\n  ... and {len(again) - 5} more" if len(again) > 5 else "")
        log.warning("%s: %d ids are listed more than once; each is read once:%s", printable(split_path(root, split)), len(again), printable(listing))
    return ids


def not_a_file(path: str, what: str) -> str | None:
    """None when ``path`` is a regular file (or a link to one), else why it is no ``what`` file
    ("image", "annotation"): not found, a broken link, a directory, a FIFO or device (never
    opened: reading one could block forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"{what} not found: a symbolic link to {os.readlink(path)}, which does not exist"
        return f"{what} not found"
    except OSError:
        return None  # e.g. permissions: opening it says what is wrong
    article = "an" if what[0] in "aeiou" else "a"
    if stat.S_ISDIR(mode):
        return f"is a directory, not {article} {what} file"
    if not stat.S_ISREG(mode):
        return f"is not a regular file (a FIFO, socket or device), not {article} {what} file"
    return None


def _refuse_dtd(*_args) -> None:
    raise DatasetError("DTD or entity declarations are not allowed in an annotation")


def _parse_xml(data: bytes) -> ET.Element:
    """``data`` -> its root element, refusing any DTD before anything in it is expanded.

    Expat reports the DOCTYPE whatever the file's encoding (a byte search for ``<!DOCTYPE``
    misses UTF-16), so a billion-laughs file stops at its first declaration. Raises
    DatasetError (DTD) or ``xml.parsers.expat.ExpatError`` (malformed)."""
    parser = xml.parsers.expat.ParserCreate()
    builder = ET.TreeBuilder()
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.Parse(data, True)
    return builder.close()


def _xml_size(root: ET.Element) -> tuple[int, int] | None:
    """``(height, width)`` from ``<size>``, None when missing, not an integer or zero."""
    w, h = (root.findtext("size/width") or "").strip(), (root.findtext("size/height") or "").strip()
    if w.isdecimal() and h.isdecimal() and int(w) > 0 and int(h) > 0:
        return int(h), int(w)
    return None


def read_annotation(
    path: str, class_to_index: dict[str, int], image_id: str | None = None, max_objects: int | None = None
) -> tuple[dict | None, list[Problem]]:
    """One annotation file -> (target, every problem found), never raising.

    ``target``: ``boxes (G, 4)`` in VOC's 1-based inclusive coordinates as written, ``labels (G,)``
    in 1..K (0 for an unknown class), ``difficult (G,)`` bool, ``size`` (height, width) or None;
    None when the file cannot be parsed at all or has more than ``max_objects`` objects
    (``too_many_objects``; None: no cap). Box extents are checked against ``size`` (see
    :func:`box_problems`)."""

    def problem(kind: str, message: str) -> Problem:
        return Problem(path, kind, message, image_id)

    why = not_a_file(path, "annotation")
    if why is not None:
        return None, [problem("missing_xml", why)]
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ANNOTATION_BYTES + 1)
    except FileNotFoundError:
        return None, [problem("missing_xml", "annotation not found")]
    except OSError as err:
        return None, [problem("unreadable_xml", f"cannot read the annotation ({err.strerror or err})")]
    if len(data) > MAX_ANNOTATION_BYTES:
        return None, [problem("unreadable_xml", f"larger than {MAX_ANNOTATION_BYTES >> 20} MiB: not an annotation")]
    try:
        root = _parse_xml(data)
    except DatasetError as err:
        return None, [problem("unsafe_xml", str(err))]
    except xml.parsers.expat.ExpatError as err:
        return None, [problem("malformed_xml", f"malformed XML ({err})")]
    objects = list(root.iter("object"))
    if max_objects is not None and len(objects) > max_objects:
        return None, [
            problem(
                "too_many_objects",
                f"{len(objects)} objects, more than data.max_objects={max_objects} (memory grows with the objects of one "
                f"image; raise data.max_objects, or set it to null for no cap, to use this file)",
            )
        ]
    problems = []
    boxes, labels, difficult = [], [], []
    for i, obj in enumerate(objects):
        name = (obj.findtext("name") or "").strip()
        if name not in class_to_index:
            problems.append(problem("unknown_class", f"object {i} has unknown class '{name}' (known: {', '.join(class_to_index)})"))
        try:
            box = [float((obj.findtext(f"bndbox/{k}") or "").strip()) for k in ("xmin", "ymin", "xmax", "ymax")]
            if not all(math.isfinite(v) for v in box):
                raise ValueError
        except ValueError:
            problems.append(problem("bad_box", f"object {i} ('{name}') has a missing, non-numeric or non-finite bndbox coordinate"))
            continue
        if box[2] < box[0] or box[3] < box[1]:
            problems.append(problem("degenerate_box", f"object {i} ('{name}') has xmax < xmin or ymax < ymin: {box}"))
        boxes.append(box)
        labels.append(class_to_index.get(name, 0))
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    size = _xml_size(root)
    if not boxes and not problems:
        problems.append(problem("no_objects", "no objects"))
    if size is None:
        problems.append(problem("missing_size", "no usable <size> (width and height, positive integers)"))
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
        "difficult": torch.tensor(difficult, dtype=torch.bool),
        "size": size,
    }
    if size is not None:
        problems += box_problems(target["boxes"], size, path, image_id)
    return target, problems


def box_problems(voc_boxes: Tensor, size: tuple[int, int], path: str, image_id: str | None = None) -> list[Problem]:
    """Boxes ``(G, 4)`` in VOC coordinates against an image of ``size`` (height, width): a box
    reaching outside ``[1, width] x [1, height]`` is ``box_clipped`` (the reader clips it), one
    with nothing inside is ``box_outside``. Boxes touching the border are fine (VOC has many)."""
    height, width = size
    problems = []
    for i, (x0, y0, x1, y1) in enumerate(voc_boxes.tolist()):
        if x1 <= 0 or y1 <= 0 or x0 - 1 >= width or y0 - 1 >= height:
            problems.append(Problem(path, "box_outside", f"box {i} {[x0, y0, x1, y1]} lies outside the {width}x{height} image", image_id))
        elif x0 < 1 or y0 < 1 or x1 > width or y1 > height:
            problems.append(Problem(path, "box_clipped", f"box {i} {[x0, y0, x1, y1]} reaches outside the {width}x{height} image", image_id))
    return problems


def first_error(problems: Sequence[Problem]) -> Problem | None:
    return next((p for p in problems if p.severity == "error"), None)


def parse_voc_xml(path: str, class_to_index: dict[str, int], max_objects: int | None = None) -> dict[str, Tensor]:
    """One annotation file -> ``boxes (G, 4)`` (continuous coordinates), ``labels (G,)`` in 1..K,
    ``difficult (G,)`` bool, ``size`` (height, width) or None.

    Refuses DTDs and entity declarations (an XML bomb never gets expanded) and more than
    ``max_objects`` objects; raises :class:`DatasetError` naming the file at its first error
    (:func:`read_annotation`).
    """
    target, problems = read_annotation(path, class_to_index, max_objects=max_objects)
    error = first_error(problems)
    if error is not None:
        raise DatasetError(str(error), kind=error.kind)
    assert target is not None
    return {**target, "boxes": voc_to_boxes(target["boxes"])}


def image_size(path: str) -> tuple[int, int]:
    """``(height, width)`` of the image as displayed (after its EXIF rotation), from the file's
    header only (no decoding). Raises DatasetError."""
    why = not_a_file(path, "image")
    if why is not None:
        raise DatasetError(f"{path}: {why}", kind="missing_image")
    try:
        with Image.open(path) as img:
            width, height = img.size
            # EXIF orientations 5-8 turn the image by 90 degrees (ImageOps.exif_transpose)
            if img.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: image not found", kind="missing_image") from err
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot open the image ({err})", kind="unreadable_image") from err
    return height, width


def load_image(path: str) -> Tensor:
    """``(3, H, W)`` uint8 RGB, whatever the file's mode (grey, RGBA, CMYK, palette, 16-bit),
    with its EXIF rotation applied: annotation tools label the image as displayed."""
    why = not_a_file(path, "image")
    if why is not None:
        raise DatasetError(f"{path}: {why}", kind="missing_image")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16"):  # 16-bit grey: 0..65535 -> 0..255, not stretched
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).round().astype(np.uint8))
            elif img.mode in ("I", "F"):  # 32-bit: 16-bit PNGs open as "I" in some Pillows
                arr = np.asarray(img, dtype=np.float64)
                scale = 1.0 if arr.max() <= 255 else 1.0 / 257.0 if arr.max() <= 65535 else 255.0 / arr.max()
                img = Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8))
            rgb = np.asarray(img.convert("RGB"))
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: image not found", kind="missing_image") from err
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot decode the image ({err})", kind="unreadable_image") from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Continuous ``boxes (G, 4)`` clipped to an image of ``size`` (height, width)."""
    height, width = size
    return torch.stack((boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height), boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)), dim=1)


class VOCDetection(torch.utils.data.Dataset):
    """Images and annotations of one split of one VOC-layout folder.

    Args:
        root: the folder holding ``JPEGImages``, ``Annotations`` and ``ImageSets``.
        split: a file name in ``ImageSets/Main`` without ``.txt`` (``trainval``, ``test``...).
        classes: the class names; label ``i + 1`` is ``classes[i]`` (0 is background).
        ids: the image ids to read (default: the split's, :func:`read_split`); the DataModule
            passes the split's ids less the bad samples under ``data.on_bad_sample=skip``.
        max_objects: refuse an annotation with more objects (``data.max_objects``; None: no cap).

    Items: ``image (3, H, W)`` uint8, ``boxes (G, 4)`` continuous coordinates clipped to the
    image, ``labels (G,)``, ``difficult (G,)`` and ``image_id``. Difficult objects are kept,
    flagged. Raises :class:`DatasetError` naming the file for a sample that is bad (an error of
    :data:`PROBLEM_KINDS`), so a wrong label is never returned.
    """

    def __init__(self, root: str, split: str, classes: Sequence[str], ids: Sequence[str] | None = None, max_objects: int | None = None) -> None:
        self.root = root
        self.split = split
        self.classes = tuple(classes)
        self.class_to_index = {name: i + 1 for i, name in enumerate(self.classes)}
        self.max_objects = max_objects
        self.ids = read_split(root, split) if ids is None else list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: str) -> str:
        return image_path(self.root, image_id)

    def annotation_path(self, image_id: str) -> str:
        return annotation_path(self.root, image_id)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        target = parse_voc_xml(self.annotation_path(image_id), self.class_to_index, self.max_objects)
        image = load_image(self.image_path(image_id))
        size = tuple(image.shape[-2:])
        if target["size"] is not None and target["size"] != size:
            raise DatasetError(
                f"{self.annotation_path(image_id)}: <size> says {target['size'][1]}x{target['size'][0]} but the image "
                f"{self.image_path(image_id)} is {size[1]}x{size[0]} (after EXIF rotation): the boxes may not match it",
                kind="size_mismatch",
            )
        boxes = clip_boxes(target["boxes"], size)  # type: ignore[arg-type]
        if bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
            raise DatasetError(f"{self.annotation_path(image_id)}: a box lies outside the {size[1]}x{size[0]} image", kind="box_outside")
        return {"image": image, "boxes": boxes, "labels": target["labels"], "difficult": target["difficult"], "image_id": image_id}
