"""Where a set's samples come from: a VOC-layout split or a COCO annotation file.

Each entry of ``data.train_sets``, ``data.val_sets`` and ``data.test_sets`` is a *set spec*:

* ``{split: trainval, root: ...}``: a split of a VOC-layout folder
  (:class:`fasterrcnn.data.voc.VOCDetection`); ``root`` defaults to ``data.root``;
* ``{format: coco, images: <folder>, annotations: <file.json>, root: ..., name: ...}``: a COCO
  file and the folder its ``file_name``\\ s are relative to
  (:class:`fasterrcnn.data.coco.COCODetection`); relative ``images`` and ``annotations`` are
  under ``root`` (default ``data.root``); ``name`` names the set in logs, ``metrics.json`` and
  eval's result files, where a VOC split's name goes (default: the file's name without
  ``instances_`` and ``.json``: ``instances_val2017.json`` is ``val2017``).

The DataModule builds each set with :func:`make_split_dataset` and checks it with
:func:`dataset_problems`; ``scripts/check_dataset.py`` reports it with :func:`check_set`. Both
readers give the same items and the same :class:`~fasterrcnn.data.voc.Problem`\\ s, so
everything after them (the skip policy, the transforms, the metrics) is the same for both.

``data.classes`` of ``data=coco`` is ``${coco_categories:}``, an OmegaConf resolver registered
here: the categories of the first COCO file of the train, val and test sets that exists, in
increasing id order (:func:`default_classes`). It is resolved when the config is, so the
checkpoint, ``config.yaml`` and eval all see the list.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from omegaconf import OmegaConf
from torch.utils.data import ConcatDataset, Dataset

from fasterrcnn.data.check import SplitReport, check_samples, check_split
from fasterrcnn.data.coco import COCODetection, check_coco, coco_categories
from fasterrcnn.data.voc import DatasetError, Problem, VOCDetection, split_ids, split_path

FORMATS = ("voc", "coco")
Reader = VOCDetection | COCODetection


def is_coco(spec: Mapping) -> bool:
    return spec.get("format", "voc") == "coco"


def normalize_spec(spec: Mapping) -> dict:
    """``spec`` as a plain dict, checked; a COCO spec gets its ``split`` (the set's name, where
    a VOC spec has its split), so naming a set is the same for both formats."""
    spec = dict(spec)
    fmt = spec.get("format", "voc")
    if fmt not in FORMATS:
        raise ValueError(f"data sets: format must be one of {', '.join(FORMATS)}, not {fmt!r} (in {spec})")
    if fmt == "voc":
        if "split" not in spec:
            raise ValueError(f"data sets: a VOC set needs a split, e.g. {{split: trainval}} (got {spec})")
        return spec
    for key in ("images", "annotations"):
        if not spec.get(key):
            raise ValueError(f"data sets: a COCO set needs images and annotations, e.g. {{format: coco, images: val2017, annotations: annotations/instances_val2017.json}} (got {spec})")
    stem = os.path.splitext(os.path.basename(str(spec["annotations"])))[0]
    spec["split"] = str(spec.get("name") or stem.removeprefix("instances_") or stem)
    return spec


def coco_paths(spec: Mapping, root: str | None) -> tuple[str, str]:
    """``(images folder, annotation file)`` of a COCO spec, relative paths under ``root``."""
    out = []
    for key in ("images", "annotations"):
        path = os.path.expanduser(str(spec[key]))
        if not os.path.isabs(path):
            if root is None:
                raise DatasetError(f"data sets: {key} '{path}' of the COCO set '{spec.get('split')}' is relative but no root is given (set data.root)")
            path = os.path.join(root, path)
        out.append(path)
    return out[0], out[1]


def make_split_dataset(spec: Mapping, root: str | None, classes: Sequence[str] | None, max_objects: int | None, ids: Sequence[str] | None = None) -> Reader:
    """The reader of one set spec (``root``: the spec's, or ``data.root``)."""
    if is_coco(spec):
        images, annotations = coco_paths(spec, root)
        return COCODetection(images, annotations, classes, ids=ids, max_objects=max_objects)
    if root is None:
        raise DatasetError(f"data sets: no root given for split '{spec['split']}' (set data.root)")
    return VOCDetection(root, spec["split"], classes, ids=ids, max_objects=max_objects)  # type: ignore[arg-type]


def dataset_problems(dataset: Reader, decode: bool = False) -> list[Problem]:
    """Every problem of the reader's samples (its ids), never raising."""
    if isinstance(dataset, COCODetection):
        return dataset.check(decode)
    return check_samples(dataset.root, dataset.ids, dataset.class_to_index, decode=decode, max_objects=dataset.max_objects)


def with_ids(dataset: Reader, ids: Sequence[str]) -> Reader:
    """The same set with only the samples ``ids``."""
    if isinstance(dataset, COCODetection):
        return dataset.with_ids(ids)
    return VOCDetection(dataset.root, dataset.split, dataset.classes, ids=ids, max_objects=dataset.max_objects)


def source_file(dataset: Reader) -> str:
    """The file that lists the set's samples: the split file, or the COCO file."""
    if isinstance(dataset, COCODetection):
        return dataset.annotations
    return split_path(dataset.root, dataset.split)


class COCOSetReport(SplitReport):
    """A :class:`SplitReport` of a COCO set: ``root`` is the images folder, ``split`` the
    annotation file, which names it."""

    @property
    def name(self) -> str:
        return self.split


def set_key(spec: Mapping, root: str | None) -> tuple[str, str]:
    """What identifies a set (a set used by several stages is checked once)."""
    if is_coco(spec):
        return coco_paths(spec, root)
    return (root or "", spec["split"])


def check_set(spec: Mapping, root: str | None, classes: Sequence[str], decode: bool = False, max_objects: int | None = None) -> SplitReport:
    """Every problem of one set, never raising (``scripts/check_dataset.py``)."""
    if not is_coco(spec):
        assert root is not None
        return SplitReport(root, spec["split"], len(split_ids(root, spec["split"])[0]), check_split(root, spec["split"], classes, decode=decode, max_objects=max_objects))
    images, annotations = coco_paths(spec, root)
    samples, problems = check_coco(images, annotations, classes, decode=decode, max_objects=max_objects)
    return COCOSetReport(images, annotations, samples, problems)


def default_classes(sets: Mapping[str, Sequence[Mapping]], root: str | None) -> tuple[str, ...]:
    """The class list when ``data.classes`` is not given: the categories of the first COCO file
    of the ``train``, ``val`` and ``test`` sets that exists (the first COCO file, which then says
    it is missing, when none does). Raises DatasetError when there is no COCO set."""
    specs = [normalize_spec(s) for stage in ("train", "val", "test") for s in sets.get(stage) or ()]
    files = [coco_paths(s, root)[1] for s in specs if is_coco(s)]
    if not files:
        raise DatasetError("data.classes is not given: a VOC-layout dataset needs its class names (data.classes=[cat,dog])")
    return tuple(coco_categories(next((f for f in files if os.path.isfile(f)), files[0])))


def _coco_categories_resolver(*, _parent_) -> list[str]:
    """``${coco_categories:}`` in a data config: :func:`default_classes` of that config."""
    data = OmegaConf.to_container(_parent_, resolve=False)
    if data.get("builtin"):  # the folder is generated later; the built-in data names its classes
        raise DatasetError("data.classes: ${coco_categories:} cannot read the built-in data before it is generated; list the classes")
    sets = {stage: OmegaConf.to_container(_parent_[f"{stage}_sets"], resolve=True) if _parent_.get(f"{stage}_sets") is not None else [] for stage in ("train", "val", "test")}
    root = _parent_.get("root")
    return list(default_classes(sets, root))  # type: ignore[arg-type]


if not OmegaConf.has_resolver("coco_categories"):
    OmegaConf.register_new_resolver("coco_categories", _coco_categories_resolver)


def find_coco(dataset: Dataset) -> COCODetection | None:
    """The one COCO reader under ``dataset`` (a DetectionDataset wraps its reader as ``voc``),
    or None for VOC data or several sets (image ids are then not one file's)."""
    while not isinstance(dataset, (COCODetection, VOCDetection, ConcatDataset)) and hasattr(dataset, "voc"):
        dataset = dataset.voc  # type: ignore[attr-defined]
    return dataset if isinstance(dataset, COCODetection) else None
