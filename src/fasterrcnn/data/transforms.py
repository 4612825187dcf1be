"""Image transforms of the reference: rescale (shorter side to ``min_size``, longer at most
``max_size``), horizontal flip, normalisation. Boxes follow the image.

:class:`Preprocess` holds the numbers (the detector keeps one, and checkpoints store it, so a
checkpoint alone can predict); :func:`prepare` is the one function that turns a decoded image
into the network's input, in training, validation, evaluation, prediction and the tools.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from fasterrcnn.boxes import hflip_boxes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network's input: rescaled so the shorter side is ``min_size``
    unless the longer would then exceed ``max_size`` (600 / 1000 in the paper), then normalised
    as ``(image / 255 - mean) / std`` with the backbone's statistics."""

    min_size: int = 600
    max_size: int = 1000
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_dict(cls, spec: Mapping) -> Preprocess:
        """From a config or checkpoint dict (plain numbers only; unknown keys are an error)."""
        unknown = set(spec) - {"min_size", "max_size", "mean", "std"}
        if unknown:
            raise ValueError(f"preprocess: unknown key(s) {sorted(unknown)} (known: min_size, max_size, mean, std)")
        out = cls(
            min_size=int(spec.get("min_size", cls.min_size)),
            max_size=int(spec.get("max_size", cls.max_size)),
            mean=tuple(float(v) for v in spec.get("mean", cls.mean)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in spec.get("std", cls.std)),  # type: ignore[arg-type]
        )
        if out.min_size <= 0 or out.max_size <= 0 or len(out.mean) != 3 or len(out.std) != 3 or min(out.std) <= 0:
            raise ValueError(f"preprocess: {spec} is not a valid rescaling and normalisation")
        return out

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


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


def prepare(image: Tensor, boxes: Tensor | None, spec: Preprocess, flip: bool = False) -> tuple[Tensor, Tensor]:
    """uint8 ``image (3, H, W)`` and its ``boxes (G, 4)`` (None: none) -> the network's input
    ``(3, h, w)`` float32 and the boxes in its coordinates: :func:`resize` by ``spec``, an
    optional :func:`hflip`, :func:`normalize` by ``spec``."""
    if boxes is None:
        boxes = torch.zeros(0, 4, device=image.device)
    image, boxes = resize(image, boxes, spec.min_size, spec.max_size)
    if flip:
        image, boxes = hflip(image, boxes)
    return normalize(image, spec.mean, spec.std), boxes


def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Inverse of :func:`normalize`: float ``(3, H, W)`` -> uint8 ``(3, H, W)``, to show an image
    as the network saw it."""
    mean_t = image.new_tensor(list(mean))[:, None, None]
    std_t = image.new_tensor(list(std))[:, None, None]
    return ((image * std_t + mean_t) * 255.0).round().clamp(0, 255).to(torch.uint8)
