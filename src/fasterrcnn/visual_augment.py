"""What training sees: one image under several draws of the augmentation, with its boxes, as a
grid (``python scripts/show_augment.py``).

The first tile is the image as annotated; tile ``k`` (1-based) is the draw of epoch ``k - 1``
for that image, :func:`fasterrcnn.data.augment.item_generator` ``(seed, k - 1, index)``, made by
the training dataset itself (:meth:`fasterrcnn.data.dataset.DetectionDataset.augmented`: the
mosaic, the augmentation and the training size drawn from ``data.min_size``), so a tile is what
that epoch of a run trains on. Under
``rng: global`` (``augment=paper``) training draws from torch's global generator instead, so
the tiles show the same kind of draws, not the very ones of a run. Boxes are drawn in their
class's colour, difficult ones in grey.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from fasterrcnn import build
from fasterrcnn.data.augment import build_augment
from fasterrcnn.data.dataset import DetectionDataset
from fasterrcnn.data.transforms import hflip, resize
from fasterrcnn.data.voc import VOCDetection

# One colour a class (tab10 without grey, which marks difficult objects).
CLASS_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
DIFFICULT_COLOR = "#7f7f7f"


def draw_boxes(image: Tensor, boxes: Tensor, labels: Tensor, difficult: Tensor, class_names: Sequence[str] | None = None) -> Tensor:
    """uint8 ``image (3, H, W)`` with ``boxes (G, 4)`` drawn, named by class (label ``i`` is
    ``class_names[i - 1]``)."""
    if len(boxes) == 0:
        return image
    names = [class_names[int(label) - 1] if class_names else str(int(label)) for label in labels]
    colors = [DIFFICULT_COLOR if bool(d) else CLASS_COLORS[(int(label) - 1) % len(CLASS_COLORS)] for label, d in zip(labels, difficult)]
    return draw_bounding_boxes(image, boxes, labels=names, colors=colors, width=2)


def augment_grid(dataset: DetectionDataset, index: int = 0, num: int = 8, class_names: Sequence[str] | None = None, columns: int = 3) -> Tensor:
    """A uint8 ``(3, H, W)`` grid: image ``index`` of the training ``dataset`` as annotated, then
    as training draws it in epochs ``0 .. num - 1`` (:meth:`DetectionDataset.augmented`: the
    augmentation, a mosaic when ``augment.mosaic`` draws one, the training size), tiles padded to
    the largest."""
    item = dataset.voc[index]
    tiles = [draw_boxes(item["image"], item["boxes"], item["labels"], item["difficult"], class_names)]
    for epoch in range(num):
        drawn = dataset.augmented(epoch, index)
        out, out_boxes = resize(drawn["image"], drawn["boxes"], drawn["spec"].min_size, drawn["spec"].max_size)
        if drawn["flip"]:
            out, out_boxes = hflip(out, out_boxes)
        tiles.append(draw_boxes(out, out_boxes, drawn["labels"], drawn["difficult"], class_names))
    height, width = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    canvas = torch.full((len(tiles), 3, height, width), 255, dtype=torch.uint8)
    for i, tile in enumerate(tiles):
        canvas[i, :, : tile.shape[1], : tile.shape[2]] = tile
    return make_grid(canvas, nrow=columns, padding=6, pad_value=255)


def save_png(image: Tensor, path: str | Path) -> str:
    """Write uint8 ``image (3, H, W)`` as a PNG (folders made as needed); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)
    return str(path)


def compose_config(overrides: Sequence[str], output_dir: str | Path) -> DictConfig:
    """``conf/train.yaml`` with ``overrides`` and an ``augment`` node (``augment=paper`` unless an
    override chooses). Until ``conf/train.yaml`` lists the ``augment`` group, ``augment=light``
    is turned into ``+augment=light``."""
    overrides = list(overrides)
    try:
        cfg = build.compose_config(overrides, output_dir, pretrained=False)
    except ConfigCompositionException:
        overrides = ["+" + o if o.startswith("augment=") else o for o in overrides]
        cfg = build.compose_config(overrides, output_dir, pretrained=False)
    if "augment" not in cfg:
        cfg = build.compose_config([*overrides, "+augment=paper"], output_dir, pretrained=False)
    return cfg


def show_augment(cfg: DictConfig, out: str | Path, split: str = "train", index: int = 0, num: int = 8, seed: int | None = None, columns: int = 3) -> str:
    """Image ``index`` of the first set of ``split`` (``train``, ``val``, ``test``) of
    ``cfg.data`` under ``num`` draws of ``cfg.augment``, as a PNG at ``out`` (returned);
    ``seed`` defaults to the run's."""
    datamodule = build.build_datamodule(cfg)
    datamodule.prepare_data()
    root, split_name = datamodule.splits(split)[0]
    voc = VOCDetection(root, split_name, datamodule.classes)
    if not 0 <= index < len(voc):
        raise ValueError(f"--index {index} is out of range: {root} {split_name} has {len(voc)} images")
    dataset = DetectionDataset(
        voc, build.to_value(cfg.data.min_size), int(cfg.data.max_size), datamodule.mean, datamodule.std,
        augment=build_augment(cfg.augment), seed=int(cfg.seed if seed is None else seed),
    )
    grid = augment_grid(dataset, index=index, num=num, class_names=datamodule.classes, columns=columns)
    return save_png(grid, out)
