"""A batch of detection samples: the padded images and, per image, its sizes, boxes, labels and
"difficult" flags; :func:`collate` makes one from :class:`fasterrcnn.data.dataset.DetectionDataset`
items."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

Size = tuple[int, int]


@dataclass
class DetectionBatch:
    """A collated batch. ``images (N, 3, H, W)`` are zero-padded to the largest image;
    ``image_sizes`` are the sizes before padding, ``original_sizes`` before resizing. ``boxes``
    are in input (resized) coordinates, ``original_boxes`` in original image coordinates.
    ``skipped``: ``(stage, kind, message)`` of each bad sample replaced by the next good one while
    reading this batch (``data.on_bad_sample=skip``), so the count reaches the main process
    from DataLoader workers."""

    images: Tensor
    image_sizes: list[Size]
    original_sizes: list[Size]
    boxes: list[Tensor]
    labels: list[Tensor]
    difficult: list[Tensor]
    original_boxes: list[Tensor]
    image_ids: list[str]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_sizes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DetectionBatch:
        """The batch with its tensors on ``device`` (itself when they are already there)."""
        if self.images.device == torch.device(device):
            return self

        def move(tensors: list[Tensor]) -> list[Tensor]:
            return [t.to(device, non_blocking=non_blocking) for t in tensors]

        return DetectionBatch(
            self.images.to(device, non_blocking=non_blocking),
            self.image_sizes,
            self.original_sizes,
            move(self.boxes),
            move(self.labels),
            move(self.difficult),
            move(self.original_boxes),
            self.image_ids,
            self.skipped,
        )


def collate(items: Sequence[dict]) -> DetectionBatch:
    """Stack items of :class:`DetectionDataset` into a :class:`DetectionBatch`."""
    sizes = [tuple(item["image"].shape[-2:]) for item in items]
    height, width = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = items[0]["image"].new_zeros(len(items), 3, height, width)
    for i, item in enumerate(items):
        images[i, :, : sizes[i][0], : sizes[i][1]] = item["image"]
    return DetectionBatch(
        images=images,
        image_sizes=sizes,  # type: ignore[arg-type]
        original_sizes=[tuple(item["original_size"]) for item in items],  # type: ignore[misc]
        boxes=[item["boxes"] for item in items],
        labels=[item["labels"] for item in items],
        difficult=[item["difficult"] for item in items],
        original_boxes=[item["original_boxes"] for item in items],
        image_ids=[item["image_id"] for item in items],
        skipped=[s for item in items for s in item.get("skipped", ())],
    )
