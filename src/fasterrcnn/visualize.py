"""Detections drawn on an image: class-coloured boxes labelled ``"name 0.93"``.

Drawing is torchvision's :func:`torchvision.utils.draw_bounding_boxes`; this module only picks
the colours, the label text, the line width and the font. Boxes are continuous ``(x1, y1, x2, y2)``
coordinates (:mod:`fasterrcnn.boxes`); labels are 1..K (0 is background).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

# Class colours: matplotlib's tab10 without its green, red and grey, as in scripts/explain.py
# (there those three mean positive, negative and background); label k gets CLASS_COLORS[(k-1) % 7].
CLASS_COLORS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def class_color(label: int) -> str:
    """The colour of class ``label`` (1..K)."""
    return CLASS_COLORS[(label - 1) % len(CLASS_COLORS)]


@functools.cache
def default_font() -> str | None:
    """DejaVu Sans as shipped with matplotlib (a dependency), so labels can scale with the image;
    None (PIL's small fixed-size font) when it is not there."""
    try:
        import matplotlib

        path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    except ImportError:
        return None
    return path if os.path.isfile(path) else None


@functools.cache
def _has_fill_labels() -> bool:
    # Filled label backgrounds (readable on any image) arrived in a later torchvision than our minimum.
    return "fill_labels" in inspect.signature(draw_bounding_boxes).parameters


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    class_names: Sequence[str],
    line_width: int | None = None,
    font: str | None = None,
    font_size: int | None = None,
) -> Tensor:
    """Draw detections on one image.

    Args:
        image: ``(3, H, W)`` uint8 RGB.
        boxes: ``(D, 4)`` continuous ``(x1, y1, x2, y2)`` in this image's coordinates.
        labels: ``(D,)`` in 1..K; ``class_names[k - 1]`` names label k.
        scores: ``(D,)`` shown with two decimals.
        line_width: box outline in pixels (None: ~1/250 of the shorter side, at least 1).
        font: a TrueType file (None: :func:`default_font`); font_size: points (None: ~1/40 of
            the shorter side, at least 10).
    Returns:
        ``(3, H, W)`` uint8, a new tensor (``image`` is not modified).

    >>> img = torch.zeros(3, 20, 30, dtype=torch.uint8)
    >>> out = draw_detections(img, torch.tensor([[2., 3., 12., 15.]]), torch.tensor([1]), torch.tensor([0.9]), ["cat"])
    >>> out.shape, out[:, 3, 2].tolist()   # the top-left corner pixel takes class 1's colour
    (torch.Size([3, 20, 30]), [31, 119, 180])
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"draw_detections: image must be (3, H, W) uint8, not {tuple(image.shape)} {image.dtype}")
    image = image.detach().cpu()
    if boxes.shape[0] == 0:
        return image.clone()
    height, width = image.shape[-2:]
    short = min(height, width)
    line_width = max(1, round(short / 250)) if line_width is None else line_width
    font = default_font() if font is None else font
    font_size = max(10, round(short / 40)) if font_size is None else font_size

    labels_list = [int(k) for k in labels.tolist()]
    for k in labels_list:
        if not 1 <= k <= len(class_names):
            raise ValueError(f"draw_detections: label {k} is outside 1..{len(class_names)} ({len(class_names)} class names)")
    texts = [f"{class_names[k - 1]} {s:.2f}" for k, s in zip(labels_list, scores.tolist())]
    # Continuous box [x1, x2) covers pixel columns floor(x1)..ceil(x2) - 1; PIL's rectangle
    # includes both of its end pixels, so it gets exactly those.
    pixels = boxes.detach().float().cpu()
    lo = pixels[:, :2].floor()
    hi = torch.maximum(pixels[:, 2:].ceil() - 1, lo)
    pixels = torch.cat((lo, hi), dim=1)
    kwargs = {"fill_labels": True, "label_colors": "white"} if _has_fill_labels() else {}
    return draw_bounding_boxes(
        image,
        pixels,
        labels=texts,
        colors=[class_color(k) for k in labels_list],
        width=line_width,
        font=font,
        font_size=font_size if font is not None else None,
        **kwargs,
    )
