"""The training/evaluation dataset: a VOC-layout reader's samples augmented (training only),
resized and normalised, with the skip policy for a sample that cannot be read
(``data.on_bad_sample``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch.utils.data import Dataset

from fasterrcnn.data.augment import Augment, draw_min_size, eval_min_size, item_generator, mosaic
from fasterrcnn.data.transforms import Preprocess, prepare
from fasterrcnn.data.voc import DatasetError

log = logging.getLogger(__name__)

# data.on_bad_sample: "skip" drops a bad sample with a warning and a count, "error" stops naming it.
ON_BAD_SAMPLE = ("skip", "error")
# Under "skip", a read that fails this many samples in a row stops: the data is broken, not a file.
MAX_CONSECUTIVE_BAD = 16


class SampleCache:
    """Decoded samples of a reader kept in memory (``data.cache_mb``), up to ``max_bytes`` of
    tensors in this process: once that is reached, further samples are read from the files
    each time and nothing is evicted. A cached sample is given out as copies of its tensors, so
    what an augmentation does to an image never reaches the cache. A read that raises (a bad
    sample) is not cached.

    Training reads every image once per epoch, four times under ``augment.mosaic``; decoding
    and parsing a built-in sample costs about 1.5 ms, a copy from here about 0.05 ms.
    """

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"the sample cache's size must be a non-negative number of bytes, not {max_bytes!r}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.samples: dict[int, dict] = {}

    @staticmethod
    def _size(item: dict) -> int:
        return sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))

    def read(self, index: int, read: Callable[[int], dict]) -> dict:
        """Sample ``index``: from the cache, or ``read(index)`` (kept while there is room)."""
        item = self.samples.get(index)
        if item is None:
            item = read(index)
            size = self._size(item)
            if self.bytes + size > self.max_bytes:
                return item
            self.samples[index] = item
            self.bytes += size
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in item.items()}


class DetectionDataset(Dataset):
    """Wraps a :class:`VOCDetection`: each sample is read, augmented by ``augment`` (None: not
    at all; :class:`fasterrcnn.data.augment.Augment`) on the decoded image, then
    :func:`fasterrcnn.data.transforms.prepare` (resize: shorter side ``min_size``, longer at most
    ``max_size``; normalise with the backbone's mean/std).

    ``min_size`` may be a list (multi-scale training): each image draws one of them
    (:func:`fasterrcnn.data.augment.draw_min_size`) after the augmentation, from the same
    generator. :attr:`preprocess` holds one size, the largest (what the tools show).

    Keys: an index, or an ``(epoch, index)`` pair (what :class:`fasterrcnn.resume.ResumableSampler`
    yields for training). Under ``rng: item`` every draw of image ``index`` in ``epoch`` comes
    from :func:`~fasterrcnn.data.augment.item_generator` ``(seed, epoch, index)``, so the main
    process, every DataLoader worker (persistent or not) and a resumed run draw the same; a plain
    index reads as epoch :attr:`epoch` (0 unless set). Under ``rng: global`` (``augment=paper``)
    the draws come from torch's global generator (one ``torch.rand`` per image for the flip), as
    the training flip always has.

    ``original_size`` / ``original_boxes`` of an item are those of the augmented image, before
    the resize (the same as the file's without augmentation, or with flips only).

    A sample the reader cannot read (:class:`DatasetError`, e.g. an image that fails to decode)
    raises under ``on_bad_sample="error"``; under ``"skip"`` the next good sample is returned
    instead, with a warning, listed in the item's ``"skipped"`` (which the DataModule counts).

    ``cache_mb``: keep up to that many MiB of decoded samples in memory (:class:`SampleCache`;
    0: none), so later epochs do not decode the files again."""

    def __init__(
        self,
        voc: Dataset,
        min_size: int | Sequence[int],
        max_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: Augment | None = None,
        seed: int = 0,
        on_bad_sample: str = "error",
        stage: str = "",
        cache_mb: float = 0,
    ) -> None:
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, not {on_bad_sample!r}")
        self.voc = voc
        self.min_size = min_size if isinstance(min_size, int) else [int(s) for s in min_size]
        self.preprocess = Preprocess.from_dict({"min_size": eval_min_size(self.min_size), "max_size": max_size, "mean": mean, "std": std})
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self.on_bad_sample = on_bad_sample
        self.stage = stage
        if isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, float)) or not cache_mb >= 0:
            raise ValueError(f"data.cache_mb is a size in MiB, 0 or more (0: no cache), not {cache_mb!r}")
        self.cache = SampleCache(int(cache_mb * 2**20)) if cache_mb > 0 else None

    @property
    def flip_prob(self) -> float:
        """The probability of a horizontal flip (``augment.hflip``; 0 without augmentation)."""
        return self.augment.hflip if self.augment is not None else 0.0

    @property
    def draws_per_item(self) -> bool:
        """True when each item's draws come from ``(seed, epoch, index)`` (``rng: item``), so
        the loader must pass the epoch with the index."""
        return self.augment is not None and self.augment.draws_per_item

    def __len__(self) -> int:
        return len(self.voc)  # type: ignore[arg-type]

    def _read(self, index: int) -> tuple[dict, list[tuple[str, str, str]]]:
        """The item at ``index``, or under "skip" the next good one, and what was skipped
        (``(stage, kind, message)``)."""
        skipped: list[tuple[str, str, str]] = []
        for step in range(min(len(self), MAX_CONSECUTIVE_BAD)):
            try:
                position = (index + step) % len(self)
                return (self.cache.read(position, self.voc.__getitem__) if self.cache else self.voc[position]), skipped
            except DatasetError as err:
                if self.on_bad_sample == "error":
                    raise
                log.warning("data.on_bad_sample=skip: skipping a bad %s sample: %s", self.stage or "data", err)
                skipped.append((self.stage, getattr(err, "kind", None) or "other", str(err)))
        raise DatasetError(f"{len(skipped)} samples in a row cannot be read (data.on_bad_sample=skip); the last: {skipped[-1][2]}")

    def augmented(self, epoch: int, index: int) -> dict:
        """Image ``index`` as training draws it in ``epoch``, before :func:`prepare`: ``image``
        (uint8 ``(3, H, W)``, augmented), ``boxes``, ``labels``, ``difficult``, ``flip`` (the
        paper's flip, done after the resize), ``spec`` (the :class:`Preprocess` with this image's
        size), ``image_id`` and ``skipped``. What ``scripts/show_augment.py`` draws."""
        item, skipped = self._read(index)
        image, boxes, labels, difficult = item["image"], item["boxes"], item["labels"], item["difficult"]
        # rng: item: one stream per (seed, epoch, index), whatever process reads it; otherwise
        # (None) torch's global generator, as the reference's flip.
        generator = item_generator(self.seed, epoch, index) if self.draws_per_item else None
        flip = False
        if self.augment is not None and self.augment.is_reference_flip:
            # augment=paper: the reference's resize-then-flip, the same one draw as torch.rand(1)
            flip = self.augment.hflip > 0 and bool(torch.rand(()) < self.augment.hflip)
        elif self.augment is not None:
            partners = self.augment.draw_mosaic(len(self), generator)
            if partners is not None:  # augment.mosaic: tiled with three other images, then augmented
                pieces = [(image, boxes, labels, difficult)]
                for other in partners:
                    read, more = self._read(other)
                    pieces.append((read["image"], read["boxes"], read["labels"], read["difficult"]))
                    skipped += more
                image, boxes, labels, difficult = mosaic(pieces, self.augment.mosaic_centre(generator), self.augment.fill)
            image, boxes, labels, difficult = self.augment(image, boxes, labels, difficult, generator)
        spec = self.preprocess if isinstance(self.min_size, int) else replace(self.preprocess, min_size=draw_min_size(self.min_size, generator))
        return {"image": image, "boxes": boxes, "labels": labels, "difficult": difficult, "flip": flip, "spec": spec,
                "image_id": item["image_id"], "skipped": skipped}  # fmt: skip

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        item = self.augmented(epoch, index)
        image, boxes = prepare(item["image"], item["boxes"], item["spec"], flip=item["flip"])
        return {
            "image": image,
            "boxes": boxes,
            "labels": item["labels"],
            "difficult": item["difficult"],
            "original_boxes": item["boxes"],
            "original_size": tuple(item["image"].shape[-2:]),
            "image_id": item["image_id"],
            "skipped": item["skipped"],
        }
