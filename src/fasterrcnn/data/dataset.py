"""The training/evaluation dataset: a VOC-layout reader's samples resized, flipped and
normalised, with the skip policy for a sample that cannot be read (``data.on_bad_sample``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from fasterrcnn.data.transforms import Preprocess, prepare
from fasterrcnn.data.voc import DatasetError

log = logging.getLogger(__name__)

# data.on_bad_sample: "skip" drops a bad sample with a warning and a count, "error" stops naming it.
ON_BAD_SAMPLE = ("skip", "error")
# Under "skip", a read that fails this many samples in a row stops: the data is broken, not a file.
MAX_CONSECUTIVE_BAD = 16


class DetectionDataset(Dataset):
    """Wraps a :class:`VOCDetection`: :func:`fasterrcnn.data.transforms.prepare` (resize: shorter
    side ``min_size``, longer at most ``max_size``; flip with probability ``flip_prob``;
    normalise with the backbone's mean/std).

    A sample the reader cannot read (:class:`DatasetError`, e.g. an image that fails to decode)
    raises under ``on_bad_sample="error"``; under ``"skip"`` the next good sample is returned
    instead, with a warning, listed in the item's ``"skipped"`` (which the DataModule counts)."""

    def __init__(
        self,
        voc: Dataset,
        min_size: int,
        max_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        flip_prob: float = 0.0,
        on_bad_sample: str = "error",
        stage: str = "",
    ) -> None:
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, not {on_bad_sample!r}")
        self.voc = voc
        self.preprocess = Preprocess.from_dict({"min_size": min_size, "max_size": max_size, "mean": mean, "std": std})
        self.flip_prob = flip_prob
        self.on_bad_sample = on_bad_sample
        self.stage = stage

    def __len__(self) -> int:
        return len(self.voc)  # type: ignore[arg-type]

    def _read(self, index: int) -> tuple[dict, list[tuple[str, str, str]]]:
        """The item at ``index``, or under "skip" the next good one, and what was skipped
        (``(stage, kind, message)``)."""
        skipped: list[tuple[str, str, str]] = []
        for step in range(min(len(self), MAX_CONSECUTIVE_BAD)):
            try:
                return self.voc[(index + step) % len(self)], skipped
            except DatasetError as err:
                if self.on_bad_sample == "error":
                    raise
                log.warning("data.on_bad_sample=skip: skipping a bad %s sample: %s", self.stage or "data", err)
                skipped.append((self.stage, getattr(err, "kind", None) or "other", str(err)))
        raise DatasetError(f"{len(skipped)} samples in a row cannot be read (data.on_bad_sample=skip); the last: {skipped[-1][2]}")

    def __getitem__(self, index: int) -> dict:
        item, skipped = self._read(index)
        image, boxes = item["image"], item["boxes"]
        original_size = tuple(image.shape[-2:])
        flip = self.flip_prob > 0 and bool(torch.rand(()) < self.flip_prob)
        image, boxes = prepare(image, boxes, self.preprocess, flip=flip)
        return {
            "image": image,
            "boxes": boxes,
            "labels": item["labels"],
            "difficult": item["difficult"],
            "original_boxes": item["boxes"],
            "original_size": original_size,
            "image_id": item["image_id"],
            "skipped": skipped,
        }
