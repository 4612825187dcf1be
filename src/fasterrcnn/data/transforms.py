"""Image transforms of the reference: rescale (shorter side to ``min_size``, longer at most
``max_size``), horizontal flip, normalisation. Boxes follow the image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from fasterrcnn.boxes import hflip_boxes


def rescale_factor(height: int, width: int, min_size: int, max_size: int) -> float:
    """The reference's scale: the shorter side becomes ``min_size`` unless the longer side would
    then exceed ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resize(image: Tensor, boxes: Tensor, min_size: int, max_size: int) -> tuple[Tensor, Tensor]:
    """Resize ``image (3, H, W)`` by :func:`rescale_factor` and scale ``boxes (G, 4)`` to match."""
    h, w = image.shape[-2:]
    scale = rescale_factor(h, w, min_size, max_size)
    out_h, out_w = round(h * scale), round(w * scale)
    if (out_h, out_w) == (h, w):
        return image, boxes
    image = TF.resize(image, [out_h, out_w], antialias=True)
    return image, boxes * boxes.new_tensor([out_w / w, out_h / h, out_w / w, out_h / h])


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror ``image (3, H, W)`` and its ``boxes (G, 4)`` left to right."""
    return image.flip(-1), hflip_boxes(boxes, image.shape[-1])


def normalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(3, H, W)`` -> float32 ``(image / 255 - mean) / std``."""
    image = image.float().div_(255.0)
    return TF.normalize(image, list(mean), list(std))


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Inverse of :func:`normalize`: float ``(3, H, W)`` -> uint8 ``(3, H, W)``, to show an image
    as the network saw it."""
    mean_t = image.new_tensor(list(mean))[:, None, None]
    std_t = image.new_tensor(list(std))[:, None, None]
    return ((image * std_t + mean_t) * 255.0).round().clamp(0, 255).to(torch.uint8)
