"""The built-in dataset: a deterministic generator of VOC-layout detection data.

Written on first use into ``<data_dir>/shapes-<hash>/`` (the hash covers every generator
parameter, so changing one makes a new folder) and read back through the same VOC reader as real
PASCAL VOC. It is meant to be VOC-like, not trivial:

* six classes (circle, square, triangle, diamond, star, cross), each drawn in colours around its
  own hue, stretched to aspect ratios (height / width) from 1:3 to 3:1;
* 1 to 6 objects per image of about 16 px up to most of the image (a fifth of them under 32 px);
* textured backgrounds (a colour gradient, low-frequency blotches, grey distractor blobs) and
  pixel noise over everything;
* objects overlap (later ones occlude earlier ones) and are cut by the image border; the box is
  the visible extent, as VOC annotators draw it, with ``truncated`` set when the border cuts it;
* an object is ``difficult`` when less than 40% of it is visible or its visible box is under
  12 px, so, as in VOC, evaluation ignores it and training leaves it out.

Images are 224 to 320 px by 288 to 400 px (a quarter of them portrait), stored as JPEG.

A shifted split, ``test_shift`` (``num_test_shift`` images, none by default), holds the same
classes drawn in ways no train, val or test image is (:data:`SHIFT_STYLE`), to measure how a
detector generalises beyond its training distribution:

* backgrounds: stripes or checks at a random angle and period, in darker, more saturated colours
  (saturation 0.3 to 0.55, value 0.1 to 0.4; the others are greyish gradients and blotches,
  saturation under 0.3, value 0.3 to 0.9), with thin coloured lines as clutter;
* objects: duller palettes (saturation and value 0.4 to 0.75 instead of 0.55 to 1), 3 to 9 of
  them, smaller (half of them 14 to 32 px, the rest up to half the shorter side) and more
  elongated (half with an aspect ratio of 1:5 to 1:2.5 or 2.5:1 to 5:1);
* a Gaussian blur of sigma 1.2 to 2.5 px over the whole image (the others have none) and pixel
  noise of sigma 14 to 24 (the others: 8).

Its images come after the test images (the same folder, ids numbered on) and from their own
random streams, so adding it leaves every train, val and test file byte-identical; only the
folder's name changes, since ``num_test_shift`` is then a generator parameter.

The same folder holds the data in COCO layout too (``data=shapes_coco``):
``annotations/instances_<split>.json`` for train, val, test (and test_shift), over the same
``JPEGImages/``, written from the VOC annotations when the folder is generated, or on first use
of a folder generated before (:func:`write_coco_annotations`). The VOC files are untouched and
the folder's name is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "star", "cross")
GENERATOR_VERSION = 2
SPLITS = ("train", "val", "test")
# The shifted split, after SPLITS; its image k draws from the random stream [seed, k, SHIFT_STREAM].
SHIFT_SPLIT = "test_shift"
SHIFT_STREAM = 0x5348  # "SH": any constant that no other stream of this module ends with


# ---------------------------------------------------------------------- shapes on a (v, u) grid
def shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape on normalised coordinates ``u`` (right) and ``v`` (down), both in
    [-1, 1] across the object's box."""
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if name == "triangle":  # apex at the top
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if name == "star":  # five points
        r = np.hypot(u, v)
        theta = np.arctan2(v, u) + np.pi / 2
        return r <= 0.62 + 0.38 * np.cos(5 * theta)
    if name == "cross":
        return ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.34) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape '{name}'")


def hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One colour, ``h`` in degrees, ``s`` and ``v`` in [0, 1] -> RGB floats in [0, 255]."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return (np.array(rgb) + (v - c)) * 255.0


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Gradient between two greyish colours, low-frequency blotches and grey distractor blobs."""
    c0 = hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.9))
    c1 = hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.9))
    t = np.linspace(0.0, 1.0, width if rng.random() < 0.5 else height)
    ramp = t[None, :, None] if t.size == width else t[:, None, None]
    image = c0 * (1 - ramp) + c1 * ramp + np.zeros((height, width, 3))
    blotches = rng.normal(0.0, 18.0, (rng.integers(3, 8), rng.integers(3, 8)))
    image += np.asarray(Image.fromarray(blotches.astype(np.float32)).resize((width, height), Image.BILINEAR))[..., None]
    for _ in range(rng.integers(0, 4)):  # grey clutter that is not an object
        w, h = rng.uniform(10, width / 3), rng.uniform(10, height / 3)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        ys, xs = np.ogrid[:height, :width]
        mask = ((xs + 0.5 - cx) / (w / 2)) ** 2 + ((ys + 0.5 - cy) / (h / 2)) ** 2 <= 1.0
        image[mask] = hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.15), rng.uniform(0.2, 0.9))
    return image


def _sample_size(rng: np.random.Generator, height: int, width: int) -> tuple[float, float]:
    """Object width and height: side ``sqrt(w h)`` from 16 px to 80% of the shorter image side,
    aspect ratio h / w log-uniform in [1/3, 3]."""
    largest = 0.8 * min(height, width)
    side = np.exp(rng.uniform(np.log(16), np.log(32))) if rng.random() < 0.2 else np.exp(rng.uniform(np.log(32), np.log(largest)))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))
    w, h = side / np.sqrt(aspect), side * np.sqrt(aspect)
    shrink = min(1.0, 0.95 * width / w, 0.95 * height / h)
    return w * shrink, h * shrink


def _add_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Pixel noise of sigma 8 over the whole image."""
    return image + rng.normal(0.0, 8.0, image.shape)


# ---------------------------------------------------------------------- the shifted split's drawing
def _shifted_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Stripes or checks of two darker, more saturated colours at a random angle and period,
    crossed by a few thin coloured lines."""
    c0 = hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.3, 0.55), rng.uniform(0.1, 0.4))
    c1 = hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.3, 0.55), rng.uniform(0.1, 0.4))
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    ys, xs = np.mgrid[:height, :width] + 0.5
    along = (xs * np.cos(angle) + ys * np.sin(angle)) / period
    pattern = np.floor(along) % 2
    if rng.random() < 0.5:  # checks: stripes crossed by stripes at a right angle
        pattern = (pattern + np.floor((-xs * np.sin(angle) + ys * np.cos(angle)) / period)) % 2
    image = c0 * (1 - pattern[..., None]) + c1 * pattern[..., None]
    for _ in range(rng.integers(2, 6)):  # thin coloured lines
        a, offset = rng.uniform(0, np.pi), rng.uniform(0, max(height, width))
        line = np.abs(xs * np.cos(a) + ys * np.sin(a) - offset) < rng.uniform(1.0, 2.5)
        image[line] = hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.3, 0.55), rng.uniform(0.2, 0.5))
    return image


def _shifted_size(rng: np.random.Generator, height: int, width: int) -> tuple[float, float]:
    """Smaller, more elongated objects than :func:`_sample_size`: half of them 14 to 32 px, the
    rest up to half the shorter side; half with aspect h / w of 2.5 to 5 (or its inverse)."""
    largest = max(0.5 * min(height, width), 33.0)
    side = np.exp(rng.uniform(np.log(14), np.log(32))) if rng.random() < 0.5 else np.exp(rng.uniform(np.log(32), np.log(largest)))
    if rng.random() < 0.5:
        aspect = np.exp(rng.uniform(np.log(2.5), np.log(5)) * rng.choice([-1.0, 1.0]))
    else:
        aspect = np.exp(rng.uniform(np.log(1 / 2.5), np.log(2.5)))
    w, h = side / np.sqrt(aspect), side * np.sqrt(aspect)
    shrink = min(1.0, 0.95 * width / w, 0.95 * height / h)
    return w * shrink, h * shrink


def _blur_and_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A Gaussian blur of sigma 1.2 to 2.5 px, then pixel noise of sigma 14 to 24."""
    sigma, noise = rng.uniform(1.2, 2.5), rng.uniform(14, 24)
    blurred = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(sigma))
    return np.asarray(blurred, dtype=np.float64) + rng.normal(0.0, noise, image.shape)


@dataclass(frozen=True)
class Style:
    """How a split's images are drawn: each hook draws from the image's random stream."""

    background: Callable[[np.random.Generator, int, int], np.ndarray]  # (H, W, 3) float
    object_size: Callable[[np.random.Generator, int, int], tuple[float, float]]  # width, height
    num_objects: tuple[int, int]  # drawn from [low, high)
    saturation: tuple[float, float]  # of the object colours
    value: tuple[float, float]
    finish: Callable[[np.random.Generator, np.ndarray], np.ndarray]  # blur, noise


# train, val and test
STYLE = Style(_background, _sample_size, (1, 7), (0.55, 1.0), (0.55, 1.0), _add_noise)
# test_shift (module docstring)
SHIFT_STYLE = Style(_shifted_background, _shifted_size, (3, 10), (0.4, 0.75), (0.4, 0.75), _blur_and_noise)


def render_image(rng: np.random.Generator, classes: Sequence[str] = SHAPE_CLASSES, style: Style = STYLE) -> tuple[np.ndarray, list[dict]]:
    """One image ``(H, W, 3)`` uint8 and its objects: ``name``, ``bbox`` (VOC 1-based inclusive
    ``xmin, ymin, xmax, ymax`` of the visible part), ``truncated``, ``difficult``, drawn in
    ``style`` (:data:`STYLE`, or :data:`SHIFT_STYLE` for the shifted split)."""
    height, width = int(rng.integers(224, 321)), int(rng.integers(288, 401))
    if rng.random() < 0.25:
        height, width = width, height
    image = style.background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int16)  # which object each pixel shows
    hue_step = 360.0 / len(classes)
    placed: list[tuple[str, float, np.ndarray]] = []  # name, full area, box
    for _ in range(int(rng.integers(*style.num_objects))):
        label = int(rng.integers(len(classes)))
        w, h = style.object_size(rng, height, width)
        for _attempt in range(10):  # avoid heavy overlap with earlier objects
            cx = rng.uniform(0.3 * w, width - 0.3 * w)
            cy = rng.uniform(0.3 * h, height - 0.3 * h)
            box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            if all(_iou(box, other) < 0.4 for _, _, other in placed):
                break
        x0, y0 = int(np.floor(box[0])), int(np.floor(box[1]))
        x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
        xs = (np.arange(x0, x1) + 0.5 - cx) / (w / 2)
        ys = (np.arange(y0, y1) + 0.5 - cy) / (h / 2)
        mask = shape_mask(classes[label], xs[None, :], ys[:, None])
        area = float(mask.sum())
        # paste the part inside the image
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
        mask = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        colour = hsv_to_rgb(label * hue_step + rng.normal(0, hue_step / 6), rng.uniform(*style.saturation), rng.uniform(*style.value))
        shade = 1.0 + rng.uniform(-0.15, 0.15) * ys[cy0 - y0 : cy1 - y0, None, None]  # a little shading
        region = image[cy0:cy1, cx0:cx1]
        region[mask] = (colour * shade * np.ones_like(region))[mask]
        owner[cy0:cy1, cx0:cx1][mask] = len(placed)
        placed.append((classes[label], area, box))
    image = np.clip(style.finish(rng, image), 0, 255).astype(np.uint8)

    objects = []
    for index, (name, area, box) in enumerate(placed):
        ys, xs = np.nonzero(owner == index)
        if xs.size == 0:
            continue  # fully hidden
        xmin, xmax, ymin, ymax = int(xs.min()) + 1, int(xs.max()) + 1, int(ys.min()) + 1, int(ys.max()) + 1
        visible = xs.size / max(area, 1.0)
        side = np.sqrt((xmax - xmin + 1) * (ymax - ymin + 1))
        truncated = box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height
        objects.append(
            {"name": name, "bbox": (xmin, ymin, xmax, ymax), "truncated": bool(truncated), "difficult": bool(visible < 0.4 or side < 12)}
        )
    return image, objects


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def annotation_xml(image_id: str, height: int, width: int, objects: list[dict]) -> str:
    """A VOC annotation file's text."""
    objs = "".join(
        f"  <object>\n    <name>{o['name']}</name>\n    <pose>Unspecified</pose>\n"
        f"    <truncated>{int(o['truncated'])}</truncated>\n    <difficult>{int(o['difficult'])}</difficult>\n"
        f"    <bndbox><xmin>{o['bbox'][0]}</xmin><ymin>{o['bbox'][1]}</ymin><xmax>{o['bbox'][2]}</xmax><ymax>{o['bbox'][3]}</ymax></bndbox>\n"
        "  </object>\n"
        for o in objects
    )
    return (
        f"<annotation>\n  <folder>shapes</folder>\n  <filename>{image_id}.jpg</filename>\n"
        f"  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>\n{objs}</annotation>\n"
    )


# ---------------------------------------------------------------------- the dataset on disk
def dataset_params(num_train: int = 1000, num_val: int = 200, num_test: int = 200, seed: int = 0, num_test_shift: int = 0) -> dict:
    """Everything that determines the generated files (its hash names the folder).
    ``num_test_shift`` is listed only when non-zero, so a dataset without the shifted split
    keeps the folder it always had."""
    params = {
        "version": GENERATOR_VERSION,
        "classes": list(SHAPE_CLASSES),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "seed": int(seed),
    }
    if int(num_test_shift) < 0:
        raise ValueError(f"num_test_shift must be >= 0, not {num_test_shift!r}")
    if num_test_shift:
        params["num_test_shift"] = int(num_test_shift)
    return params


def params_hash(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def _split_sizes(params: dict) -> dict[str, int]:
    """The number of images of each split, in the order of their ids."""
    return {**{s: params[f"num_{s}"] for s in SPLITS}, SHIFT_SPLIT: params.get(f"num_{SHIFT_SPLIT}", 0)}


def _write_image(root: str, params: dict, index: int) -> None:
    """Render image ``index`` and write its JPEG and XML: train, val and test image ``i`` from
    the random stream ``[seed, i]``, image ``k`` of the shifted split from
    ``[seed, k, SHIFT_STREAM]`` (in :data:`SHIFT_STYLE`)."""
    image_id = f"{index:06d}"
    regular = sum(params[f"num_{s}"] for s in SPLITS)
    if index < regular:
        image, objects = render_image(np.random.default_rng([params["seed"], index]), params["classes"])
    else:
        rng = np.random.default_rng([params["seed"], index - regular, SHIFT_STREAM])
        image, objects = render_image(rng, params["classes"], SHIFT_STYLE)
    Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=90)
    with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w", encoding="utf-8") as f:
        f.write(annotation_xml(image_id, image.shape[0], image.shape[1], objects))


# ---------------------------------------------------------------------- the COCO copy
def coco_path(root: str, split: str) -> str:
    """``annotations/instances_<split>.json``: the COCO file of one split (images: ``JPEGImages/``)."""
    return os.path.join(root, "annotations", f"instances_{split}.json")


def _coco_splits(root: str) -> list[str]:
    return [s for s in (*SPLITS, SHIFT_SPLIT) if os.path.isfile(os.path.join(root, "ImageSets", "Main", f"{s}.txt"))]


def coco_annotations(root: str, split: str, classes: Sequence[str]) -> dict:
    """The COCO file of one split of the generated folder ``root``, from its VOC annotations
    (the generator's boxes): image id = the VOC id as a number (``000123.jpg`` is image 123),
    ``file_name`` relative to ``JPEGImages/``, one annotation per object with ids from 1 (COCOeval
    takes id 0 for "unmatched"), ``bbox`` = :func:`fasterrcnn.boxes.boxes_to_coco` of
    :func:`~fasterrcnn.boxes.voc_to_boxes` (``x = xmin - 1``, ``w = xmax - xmin + 1``), ``area``
    its ``w * h``, ``iscrowd`` the object's difficult flag; categories 1..K in class order."""
    from fasterrcnn.boxes import boxes_to_coco, voc_to_boxes
    from fasterrcnn.data.voc import annotation_path, first_error, read_annotation, read_split

    class_to_index = {name: i + 1 for i, name in enumerate(classes)}
    images, annotations = [], []
    for image_id in read_split(root, split):
        target, problems = read_annotation(annotation_path(root, image_id), class_to_index, image_id)
        error = first_error(problems)
        if target is None or error is not None or target["size"] is None:
            raise RuntimeError(f"the generated annotation {annotation_path(root, image_id)} is broken: {error}")
        (height, width), number = target["size"], int(image_id)
        images.append({"id": number, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        bboxes = boxes_to_coco(voc_to_boxes(target["boxes"].double())).tolist()
        for bbox, label, crowd in zip(bboxes, target["labels"].tolist(), target["difficult"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": label, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": int(crowd)})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    info = {"description": f"the built-in shapes data, {split} split, COCO layout (fasterrcnn.data.shapes)", "version": str(GENERATOR_VERSION)}
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def write_coco_annotations(root: str, classes: Sequence[str]) -> list[str]:
    """Write ``annotations/instances_<split>.json`` (:func:`coco_annotations`) for each of the
    train, val, test and test_shift splits of ``root``, each file atomically; the VOC files are
    not touched. Returns the paths."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    paths = []
    for split in _coco_splits(root):
        path = coco_path(root, split)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(coco_annotations(root, split, classes), f)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def generate(root: str, params: dict, progress: bool = True, workers: int | None = None) -> None:
    """Write the dataset described by ``params`` into ``root`` (VOC layout). Image ``i`` uses
    the random stream ``[seed, i]``, so every image is reproducible on its own and the result
    does not depend on ``workers`` (processes; default: one per CPU core for large datasets)."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from tqdm.auto import tqdm

    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    sizes = _split_sizes(params)
    offsets = np.cumsum([0] + list(sizes.values()))
    total = int(offsets[-1])
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if total >= 200 else 1
    write = partial(_write_image, root, params)
    bar = tqdm(total=total, desc=f"generating the built-in dataset in {root}", disable=not progress, unit="img")
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(write, range(total), chunksize=16):
                bar.update()
    else:
        for i in range(total):
            write(i)
            bar.update()
    bar.close()
    ids = {split: [f"{i:06d}" for i in range(int(offsets[k]), int(offsets[k + 1]))] for k, split in enumerate(sizes)}
    if not ids[SHIFT_SPLIT]:
        del ids[SHIFT_SPLIT]  # no split file for an empty split
    ids["trainval"] = ids["train"] + ids["val"]
    for split, split_ids in ids.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(f"{i}\n" for i in split_ids))
    write_coco_annotations(root, params["classes"])  # the same data in COCO layout, beside the VOC files
    with open(os.path.join(root, "generator.json"), "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)


def ensure_dataset(
    data_dir: str, num_train: int = 1000, num_val: int = 200, num_test: int = 200, seed: int = 0, progress: bool = True, num_test_shift: int = 0
) -> str:
    """The folder of the built-in dataset with these parameters, generated on first use;
    ``num_test_shift`` > 0 adds the shifted split ``test_shift`` (module docstring).

    Generation writes into a temporary folder that is renamed when complete, so an interrupted
    run or two runs at once never leave a half-written dataset behind.
    """
    params = dataset_params(num_train, num_val, num_test, seed, num_test_shift)
    root = os.path.join(data_dir, f"shapes-{params_hash(params)}")
    if os.path.isfile(os.path.join(root, "generator.json")):
        if not all(os.path.isfile(coco_path(root, s)) for s in _coco_splits(root)):  # generated before the COCO copy
            write_coco_annotations(root, params["classes"])
        return root
    os.makedirs(data_dir, exist_ok=True)
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, params, progress=progress)
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(root, "generator.json")):
            raise
    return root
