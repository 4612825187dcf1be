"""The LightningDataModule: VOC-layout splits -> resized, flipped, normalised batches (size 1).

The batch type is :mod:`fasterrcnn.data.batch`, the dataset with its skip policy
:mod:`fasterrcnn.data.dataset`; the resumable training loader :mod:`fasterrcnn.resume`."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fasterrcnn.data.batch import DetectionBatch, collate
from fasterrcnn.data.check import bad_samples, check_samples, describe
from fasterrcnn.data.dataset import ON_BAD_SAMPLE, DetectionDataset
from fasterrcnn.data.download import download_voc
from fasterrcnn.data.shapes import ensure_dataset
from fasterrcnn.data.voc import MAX_OBJECTS, DatasetError, VOCDetection, read_split, split_path
from fasterrcnn.resume import ResumableLoader

log = logging.getLogger(__name__)


def in_holdout(image_id: str, fraction: float) -> bool:
    """Whether ``image_id`` falls in a ``fraction`` holdout (``data.val_holdout``): the first 8
    bytes of the SHA-1 of the id, read as a number in [0, 1), are below ``fraction``. About
    ``fraction`` of the images; always the same ones, whatever the seed or the split's order."""
    return int.from_bytes(hashlib.sha1(image_id.encode()).digest()[:8], "big") / 2**64 < fraction


def _year_of(root: str) -> str | None:
    match = re.search(r"VOC(\d{4})", os.path.basename(os.path.normpath(root)))
    return match.group(1) if match else None


class VOCDataModule(L.LightningDataModule):
    """PASCAL VOC (2007, 2012, 07+12), any VOC-layout folder with its own classes, or the
    built-in dataset, with batch size 1 as in the paper.

    Args:
        name: a label for logs (``shapes``, ``voc2007``...).
        classes: the class names (label i + 1 is ``classes[i]``).
        root: the default VOC-layout folder of every set.
        train_sets, val_sets, test_sets: lists of ``{split: ..., root: ...}``; several sets are
            concatenated (07+12); ``root`` defaults to ``root`` above.
        min_size, max_size: the rescaling rule (600 / 1000 in the paper).
        mean, std: the normalisation the backbone expects (the config takes the backbone's).
        flip_prob: horizontal flip probability in training (0.5).
        batch_size, num_workers: the DataLoader's.
        builtin: parameters of the built-in dataset (``num_train``, ``num_val``, ``num_test``,
            ``seed``); when set, ``root`` is the generated folder under ``data_dir``.
        download: download missing VOC years (needs internet) instead of failing.
        data_dir: where the built-in data is generated and VOC is downloaded.
        val_holdout: a fraction (0 < f < 1) of the training sets held out to be the validation
            set instead of ``val_sets``, so model selection never sees the test split: an image
            is held out when the SHA-1 of its id, read as a number in [0, 1), is below ``f``
            (:func:`in_holdout`; the same images whatever the seed or the order of the split
            file). 0 (default): validate on ``val_sets``.
        on_bad_sample: what a bad sample does, ``"error"`` (default) or ``"skip"``. ``setup``
            checks every annotation and image header of each split up front
            (:mod:`fasterrcnn.data.check`, about 0.3 ms a sample), so a bad annotation, a
            missing or unreadable image or a ``<size>`` that is not the image's stops the run at
            once, naming the files ("error"), or is dropped with one warning ("skip"; val/test
            images are then decoded in full too). A training image that fails to decode later,
            in a DataLoader, raises naming it ("error") or is replaced by the next good sample
            with a warning ("skip"). ``skipped`` counts the dropped samples per stage,
            ``skipped_by_kind`` per stage and problem kind (``{"train": {"missing_image": 2}}``,
            written to ``metrics.json`` as ``skipped_samples``), ``problems`` lists them. Boxes
            reaching outside their image are clipped to it and images without objects train as
            background under both. An empty or unreadable split file stops ``setup`` under both.
        max_objects: an annotation with more objects is a bad sample (``too_many_objects``:
            memory grows with the objects of one image); None: no cap.
    """

    def __init__(
        self,
        name: str,
        classes: Sequence[str],
        root: str | None = None,
        train_sets: Sequence[Mapping] = ({"split": "trainval"},),
        val_sets: Sequence[Mapping] = ({"split": "test"},),
        test_sets: Sequence[Mapping] | None = None,
        min_size: int = 600,
        max_size: int = 1000,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        flip_prob: float = 0.5,
        batch_size: int = 1,
        num_workers: int = 2,
        builtin: Mapping | None = None,
        download: bool = False,
        data_dir: str = "data",
        on_bad_sample: str = "error",
        val_holdout: float = 0.0,
        max_objects: int | None = MAX_OBJECTS,
    ) -> None:
        super().__init__()
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"data.on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}, not {on_bad_sample!r}")
        if max_objects is not None and (isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1):
            raise ValueError(f"data.max_objects must be a positive integer or null (no cap), not {max_objects!r}")
        self.max_objects = max_objects
        if not 0.0 <= val_holdout < 1.0:
            raise ValueError(f"data.val_holdout is a fraction of the training images in [0, 1), not {val_holdout!r}")
        self.val_holdout = float(val_holdout)
        self.name = name
        self.classes = tuple(classes)
        self.root = root
        self.sets = {"train": list(train_sets), "val": list(val_sets), "test": list(test_sets or val_sets)}
        self.min_size, self.max_size = min_size, max_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.flip_prob = flip_prob
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.builtin = dict(builtin) if builtin else None
        self.download = download
        self.data_dir = data_dir
        self.on_bad_sample = on_bad_sample
        self.datasets: dict[str, Dataset] = {}
        # the bad samples dropped (setup) or replaced (while reading), per stage
        self.skipped: dict[str, int] = {"train": 0, "val": 0, "test": 0}
        self.skipped_by_kind: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
        # Set by training (fasterrcnn.resume.ExactResume, the run's seed): the training loader
        # then resumes mid-epoch exactly (fasterrcnn.resume.ResumableLoader).
        self.resume_position = None
        self.resume_seed = 0
        self.problems: dict[str, list[str]] = {"train": [], "val": [], "test": []}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prepare_data(self) -> None:
        """Generate the built-in data, or download missing VOC years when ``download`` is set."""
        if self.builtin is not None:
            ensure_dataset(self.data_dir, **self.builtin)
        elif self.download:
            for stage_sets in self.sets.values():
                for spec in stage_sets:
                    root = spec.get("root", self.root)
                    year = _year_of(root)
                    if year and not os.path.isfile(split_path(root, spec["split"])):
                        download_voc(year, os.path.dirname(os.path.dirname(os.path.normpath(root))))

    def splits(self, stage: str) -> list[tuple[str, str]]:
        """``(root, split)`` of each set of ``stage`` ("train", "val", "test"), each split file
        there (DatasetError with a hint otherwise)."""
        root_default = ensure_dataset(self.data_dir, progress=False, **self.builtin) if self.builtin is not None else self.root
        out = []
        for spec in self.sets[stage]:
            root = spec.get("root") or root_default
            if root is None:
                raise DatasetError(f"data.{stage}_sets: no root given for split '{spec['split']}' (set data.root)")
            path = split_path(root, spec["split"])
            if not os.path.isfile(path):
                year = _year_of(root)
                hint = (
                    f"; get VOC{year} with: python scripts/download_voc.py --year {year} --dest {self.data_dir}"
                    f" (or set data.root / paths.data_dir to where VOCdevkit is)"
                    if year
                    else "; check data.root and the split names"
                )
                raise DatasetError(f"{path} not found: the {stage} split '{spec['split']}' is missing{hint}")
            out.append((root, spec["split"]))
        return out

    def set_names(self, stage: str) -> list[str]:
        """``<folder>/<split>`` of each set of ``stage`` (``shapes/val``, ``VOC2007/test``); the
        validation holdout as ``holdout 5% of VOC2007/trainval``. Reads no files."""
        if stage == "val" and self.val_holdout:
            return [f"holdout {100 * self.val_holdout:g}% of {name}" for name in self.set_names("train")]
        return [f"{os.path.basename(os.path.normpath(spec.get('root') or self.root or self.name))}/{spec['split']}" for spec in self.sets[stage]]

    @property
    def val_is_test(self) -> bool:
        """True when the validation sets are the test sets (VOC2007 test under data=voc2007), so
        that choosing on validation chooses on test."""
        if self.val_holdout:
            return False
        resolved = {stage: [(spec.get("root") or self.root, spec["split"]) for spec in self.sets[stage]] for stage in ("val", "test")}
        return resolved["val"] == resolved["test"]

    def _sets(self, stage: str) -> list[VOCDetection]:
        """The VOC sets of ``stage``; under ``val_holdout`` "val" is the held-out part of the
        training sets and "train" the rest."""
        if not self.val_holdout or stage not in ("train", "val"):
            return [VOCDetection(root, split, self.classes, max_objects=self.max_objects) for root, split in self.splits(stage)]
        out = []
        for root, split in self.splits("train"):
            ids = [i for i in read_split(root, split) if in_holdout(i, self.val_holdout) == (stage == "val")]
            if not ids:
                raise DatasetError(f"data.val_holdout={self.val_holdout}: no {stage} image left of the {split_path(root, split)} split; change the fraction")
            out.append(VOCDetection(root, split, self.classes, ids=ids, max_objects=self.max_objects))
        return out

    def _dataset(self, stage: str) -> Dataset:
        parts = [self._checked(stage, voc) for voc in self._sets(stage)]
        voc = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        flip = self.flip_prob if stage == "train" else 0.0
        # Only training replaces a sample that fails to decode: in evaluation the replacement
        # would count one image twice in the mAP, so "skip" decodes val/test fully in setup.
        policy = self.on_bad_sample if stage == "train" else "error"
        return DetectionDataset(voc, self.min_size, self.max_size, self.mean, self.std, flip_prob=flip, on_bad_sample=policy, stage=stage)

    def _checked(self, stage: str, voc: VOCDetection) -> VOCDetection:
        """``voc`` after checking every sample up front: under "skip" without its bad samples
        (one warning), under "error" a DatasetError naming them. Under "skip" the val/test
        images are decoded in full (about 5 ms each), so the evaluated set is fixed here."""
        split = split_path(voc.root, voc.split)
        decode = self.on_bad_sample == "skip" and stage != "train"
        problems = check_samples(voc.root, voc.ids, voc.class_to_index, decode=decode, max_objects=voc.max_objects)
        clipped = [p for p in problems if p.kind == "box_clipped"]
        if clipped:
            log.warning("%s: %d boxes reach outside their image and are clipped to it:\n%s", split, len(clipped), describe(clipped, 3))
        bad = bad_samples(problems)
        if not bad:
            return voc
        listing = describe(list(bad.values()))
        if self.on_bad_sample == "error":
            raise DatasetError(
                f"{split}: {len(bad)} of {len(voc)} {stage} samples are bad (data.on_bad_sample=error):\n{listing}\n"
                f"Fix them, or set data.on_bad_sample=skip to train without them; "
                f"python scripts/check_dataset.py data=<this data> lists every problem."
            )
        note = "" if stage == "train" else f"; the {stage} metrics are over the other {len(voc) - len(bad)}"
        log.warning("%s: skipping %d of %d %s samples that are bad (data.on_bad_sample=skip%s):\n%s", split, len(bad), len(voc), stage, note, listing)
        for p in bad.values():
            self._count_skip(stage, p.kind, str(p))
        ids = [i for i in voc.ids if i not in bad]
        if not ids:
            raise DatasetError(f"{split}: every {stage} sample is bad, nothing left to use:\n{listing}")
        return VOCDetection(voc.root, voc.split, voc.classes, ids=ids, max_objects=voc.max_objects)

    def _count_skip(self, stage: str, kind: str, message: str) -> None:
        self.skipped[stage] = self.skipped.get(stage, 0) + 1
        kinds = self.skipped_by_kind.setdefault(stage, {})
        kinds[kind] = kinds.get(kind, 0) + 1
        self.problems.setdefault(stage, []).append(message)

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for name in wanted.get(stage or "fit", ("train", "val", "test")):
            if name not in self.datasets:
                self.datasets[name] = self._dataset(name)

    def _loader(self, stage: str, shuffle: bool) -> DataLoader:
        if stage not in self.datasets:
            self.datasets[stage] = self._dataset(stage)
        return DataLoader(
            self.datasets[stage],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
        )

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """:meth:`DetectionBatch.to` (Lightning's generic recursion over the dataclass cost
        about 5 ms a step on CPU)."""
        if isinstance(batch, DetectionBatch):
            # samples replaced while reading (data.on_bad_sample=skip), counted here in the main
            # process because DataLoader workers' own counts never come back
            for stage, kind, message in batch.skipped:
                self._count_skip(stage, kind, message)
            return batch.to(device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", shuffle=True)
        if self.resume_position is None:
            return loader
        return ResumableLoader.wrap(loader, self.resume_position, self.resume_seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
