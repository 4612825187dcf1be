"""The LightningDataModule: VOC-layout splits -> augmented (training), resized, normalised batches (size 1).

The batch type is :mod:`fasterrcnn.data.batch`, the dataset with its skip policy
:mod:`fasterrcnn.data.dataset`; the resumable training loader :mod:`fasterrcnn.resume`."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from fasterrcnn.data.augment import Augment, eval_min_size
from fasterrcnn.data.batch import DetectionBatch, collate
from fasterrcnn.data.check import bad_samples, describe
from fasterrcnn.data.dataset import ON_BAD_SAMPLE, DetectionDataset
from fasterrcnn.data.download import download_voc
from fasterrcnn.data.shapes import ensure_dataset
from fasterrcnn.data.sources import dataset_problems, default_classes, is_coco, make_split_dataset, normalize_spec, source_file, with_ids
from fasterrcnn.data.voc import MAX_OBJECTS, DatasetError, VOCDetection, split_path
from fasterrcnn.resume import ResumableLoader

log = logging.getLogger(__name__)

# The stage (and eval.py split) of data.shift_sets: the built-in data's shifted split.
SHIFT = "test_shift"


def pinned(batch: DetectionBatch) -> DetectionBatch:
    """``batch`` with its tensors in page-locked (pinned) memory, for a GPU: a copy from pageable
    memory waits for everything queued on the GPU (CUDA synchronises the stream first), a
    ``non_blocking`` copy from pinned memory is queued behind it and the host goes on. Done at
    the transfer, in the main process: the DataLoader's own ``pin_memory`` passes a
    :class:`DetectionBatch` through untouched (it pins tensors, mappings, sequences, and
    objects with a ``pin_memory`` method)."""
    if batch.images.is_pinned():
        return batch
    import dataclasses

    pin = lambda tensors: [t.pin_memory() for t in tensors]  # noqa: E731
    return dataclasses.replace(
        batch,
        images=batch.images.pin_memory(),
        boxes=pin(batch.boxes),
        labels=pin(batch.labels),
        difficult=pin(batch.difficult),
        original_boxes=pin(batch.original_boxes),
    )


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
            concatenated (07+12); ``root`` defaults to ``root`` above. A COCO file is
            ``{format: coco, images: ..., annotations: ...}`` (:mod:`fasterrcnn.data.sources`).
            ``classes`` None: the first COCO file's categories.
        min_size, max_size: the rescaling rule (600 / 1000 in the paper). ``min_size`` may be a
            list: multi-scale training, one size drawn per training image
            (:func:`fasterrcnn.data.augment.draw_min_size`, detectron2's ResizeShortestEdge).
        test_min_size: the one size of validation and testing (and of the checkpoint's
            preprocessing); None: the largest of ``min_size``
            (:func:`fasterrcnn.data.augment.eval_min_size`).
        mean, std: the normalisation the backbone expects (the config takes the backbone's).
        augment: the training augmentation (:class:`fasterrcnn.data.augment.Augment`, the
            config's ``augment`` group, built by :func:`fasterrcnn.build.build_datamodule`);
            None: none. Validation and test images are never augmented.
        seed: the run's seed: the ``(seed, epoch, index)`` streams of ``rng: item``
            augmentation and the training order.
        flip_prob: deprecated, the flip is ``augment.hflip``: a value (not None) warns and is
            taken as ``augment.hflip``.
        shift_sets: the sets of the shifted split (``test_shift`` of the built-in data), read
            by ``split=test_shift`` of ``src/eval.py``; empty: none.
        val_shift: also validate on ``shift_sets`` (a second validation loader, logged as
            ``val_shift/...``; selection stays on ``val/map``).
        batch_size, num_workers: the DataLoader's.
        cache_mb: keep up to that many MiB of each split's decoded samples in memory
            (:class:`fasterrcnn.data.dataset.SampleCache`, per process: each DataLoader worker
            holds its own), so epochs after the first do not decode the files again; 0 (the
            default, and VOC's and COCO's): read the files every time.
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
        classes: Sequence[str] | None,
        root: str | None = None,
        train_sets: Sequence[Mapping] = ({"split": "trainval"},),
        val_sets: Sequence[Mapping] = ({"split": "test"},),
        test_sets: Sequence[Mapping] | None = None,
        min_size: int | Sequence[int] = 600,
        max_size: int = 1000,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        flip_prob: float | None = None,
        test_min_size: int | None = None,
        augment: Augment | None = None,
        seed: int = 0,
        shift_sets: Sequence[Mapping] = (),
        val_shift: bool = False,
        batch_size: int = 1,
        num_workers: int = 2,
        builtin: Mapping | None = None,
        download: bool = False,
        data_dir: str = "data",
        on_bad_sample: str = "error",
        val_holdout: float = 0.0,
        max_objects: int | None = MAX_OBJECTS,
        cache_mb: float = 0,
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
        self.root = root
        self.sets = {"train": list(train_sets), "val": list(val_sets), "test": list(test_sets or val_sets), SHIFT: list(shift_sets or ())}
        self.sets = {stage: [normalize_spec(spec) for spec in specs] for stage, specs in self.sets.items()}  # VOC splits, COCO files
        self.classes = tuple(classes) if classes is not None else default_classes(self.sets, root)
        if val_shift and not self.sets[SHIFT]:
            raise ValueError("data.val_shift=true needs data.shift_sets (the built-in data's test_shift: data.builtin.num_test_shift > 0)")
        self.val_shift = bool(val_shift)
        self.min_size, self.max_size = min_size, max_size
        self.test_min_size = eval_min_size(min_size, test_min_size)  # validates both
        self.mean, self.std = tuple(mean), tuple(std)
        if flip_prob is not None:
            warnings.warn(
                f"data.flip_prob is deprecated: the training flip is augment.hflip (augment=paper: 0.5); "
                f"data.flip_prob={flip_prob} is taken as augment.hflip={flip_prob}",
                FutureWarning,
                stacklevel=2,
            )
            augment = Augment(hflip=flip_prob) if augment is None else augment.replace(hflip=flip_prob)
        self.augment = augment
        self.seed = int(seed)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_mb = cache_mb
        self.builtin = dict(builtin) if builtin else None
        self.download = download
        self.data_dir = data_dir
        self.on_bad_sample = on_bad_sample
        self.datasets: dict[str, Dataset] = {}
        # the bad samples dropped (setup) or replaced (while reading), per stage
        # (the shifted split only where there is one, so metrics.json lists the stages the data has)
        stages = ("train", "val", "test", SHIFT) if self.sets[SHIFT] else ("train", "val", "test")
        self.skipped: dict[str, int] = {stage: 0 for stage in stages}
        self.skipped_by_kind: dict[str, dict[str, int]] = {stage: {} for stage in stages}
        # Set by training (fasterrcnn.resume.ExactResume, the run's seed): the training loader
        # then resumes mid-epoch exactly (fasterrcnn.resume.ResumableLoader).
        self.resume_position = None
        self.resume_seed = self.seed
        self.problems: dict[str, list[str]] = {stage: [] for stage in stages}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prepare_data(self) -> None:
        """Generate the built-in data, or download missing VOC years when ``download`` is set."""
        if self.builtin is not None:
            ensure_dataset(self.data_dir, **self.builtin)
        elif self.download:
            for stage_sets in self.sets.values():
                for spec in (s for s in stage_sets if not is_coco(s)):  # only VOC is downloaded
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
            if is_coco(spec):  # (root, the set's name); its reader says when the file is missing
                out.append((root, spec["split"]))
                continue
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
        """The sets of ``stage`` (VOC splits, COCO files: :func:`make_split_dataset`); under
        ``val_holdout`` "val" is the held-out part of the training sets and "train" the rest."""
        if not self.val_holdout or stage not in ("train", "val"):
            return [make_split_dataset(spec, root, self.classes, self.max_objects) for spec, (root, _) in zip(self.sets[stage], self.splits(stage))]
        out = []
        for spec, (root, _) in zip(self.sets["train"], self.splits("train")):
            reader = make_split_dataset(spec, root, self.classes, self.max_objects)
            ids = [i for i in reader.ids if in_holdout(i, self.val_holdout) == (stage == "val")]
            if not ids:
                raise DatasetError(f"data.val_holdout={self.val_holdout}: no {stage} image left of the {source_file(reader)} split; change the fraction")
            out.append(with_ids(reader, ids))
        return out

    def _dataset(self, stage: str) -> Dataset:
        parts = [self._checked(stage, voc) for voc in self._sets(stage)]
        voc = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        train = stage == "train"
        # Only training replaces a sample that fails to decode: in evaluation the replacement
        # would count one image twice in the mAP, so "skip" decodes val/test fully in setup.
        policy = self.on_bad_sample if train else "error"
        # Training: augmented, at the (multi-scale) training sizes; the rest at the test size.
        min_size = self.min_size if train else self.test_min_size
        augment = self.augment if train else None
        return DetectionDataset(voc, min_size, self.max_size, self.mean, self.std, augment=augment, seed=self.seed, on_bad_sample=policy, stage=stage, cache_mb=self.cache_mb)

    def _checked(self, stage: str, voc: VOCDetection) -> VOCDetection:
        """``voc`` after checking every sample up front: under "skip" without its bad samples
        (one warning), under "error" a DatasetError naming them. Under "skip" the val/test
        images are decoded in full (about 5 ms each), so the evaluated set is fixed here."""
        split = source_file(voc)
        decode = self.on_bad_sample == "skip" and stage != "train"
        problems = dataset_problems(voc, decode=decode)
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
        return with_ids(voc, ids)

    def _count_skip(self, stage: str, kind: str, message: str) -> None:
        self.skipped[stage] = self.skipped.get(stage, 0) + 1
        kinds = self.skipped_by_kind.setdefault(stage, {})
        kinds[kind] = kinds.get(kind, 0) + 1
        self.problems.setdefault(stage, []).append(message)

    def setup(self, stage: str | None = None) -> None:
        val = ("val", SHIFT) if self.val_shift else ("val",)
        wanted = {"fit": ("train", *val), "validate": val, "test": ("test",), "predict": ("test",)}
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
            if device.type == "cuda":
                batch = pinned(batch)
            return batch.to(device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", shuffle=True)
        # rng: item augmentation needs each image's epoch: the resumable loader's sampler passes
        # (epoch, index) pairs, with or without a position to resume from.
        if self.resume_position is None and not self.datasets["train"].draws_per_item:
            return loader
        return ResumableLoader.wrap(loader, self.resume_position, self.resume_seed)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation loader; under ``val_shift`` a list: it, then the shifted split's
        (Lightning's dataloader_idx 0 and 1)."""
        if self.val_shift:
            return [self._loader("val", shuffle=False), self._loader(SHIFT, shuffle=False)]
        return self._loader("val", shuffle=False)

    def eval_dataloader(self, split: str) -> DataLoader:
        """The one loader of ``split``: "val", "test" or "test_shift" (``data.shift_sets``), in
        order, at the test size, not augmented (``src/eval.py``)."""
        if split not in ("val", "test", SHIFT):
            raise ValueError(f"split must be one of val, test, {SHIFT}, not {split!r}")
        if not self.sets[split]:
            raise DatasetError(f"data={self.name} has no {split} split (data.shift_sets is empty; the built-in data has one with data.builtin.num_test_shift > 0)")
        return self._loader(split, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
