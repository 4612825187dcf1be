"""Checking a VOC-layout dataset before training: every problem of every file, none raised.
(COCO files are checked by :mod:`fasterrcnn.data.coco`; :func:`split_reports` covers both, through
:func:`fasterrcnn.data.sources.check_set`.)

Used by ``scripts/check_dataset.py`` (:func:`report_dataset`: a report of the whole dataset,
every split of a DataModule) and by the DataModule's ``setup`` (``data.on_bad_sample``: drop the
bad samples with a warning, or stop naming them).
Each problem is a :class:`fasterrcnn.data.voc.Problem` ``(file, kind, message, image_id)`` of
one of the :data:`fasterrcnn.data.voc.PROBLEM_KINDS`; ``severity`` "error" makes the sample
bad, "warning" leaves it usable (clipped boxes, an image without objects).

Images are opened for their header only (size and EXIF orientation, about 0.2 ms each), so a
file whose pixels are corrupt after a valid header is found only with ``decode=True``, or when
the reader decodes it in training.

Symbolic links are followed (a dataset's images often live on another disk); an image or
annotation whose real path lies outside the dataset folder is an ``outside_link`` warning, so
the report says what outside the folder is read.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fasterrcnn.data.voc import (
    PROBLEM_KINDS,
    DatasetError,
    Problem,
    annotation_path,
    box_problems,
    image_path,
    image_size,
    load_image,
    not_a_file,
    printable,
    read_annotation,
    split_ids,
)

if TYPE_CHECKING:  # the DataModule imports this module
    from fasterrcnn.data.datamodule import VOCDataModule

__all__ = [
    "Problem",
    "SplitReport",
    "bad_samples",
    "check_sample",
    "check_samples",
    "check_split",
    "count_kinds",
    "describe",
    "outside_link",
    "report_dataset",
    "split_reports",
    "summary",
    "to_json",
]
STAGES = ("train", "val", "test")


def outside_link(root: str, path: str, image_id: str | None = None) -> Problem | None:
    """An ``outside_link`` warning when ``path`` (``root/<folder>/<name>``) exists and really lies
    outside ``root``: the file or its folder is a symbolic link leading out (a broken link is
    reported by the reader as missing). Two ``lstat`` calls when neither is a link (the usual
    case)."""
    if not (os.path.islink(path) or os.path.islink(os.path.dirname(path))) or not os.path.exists(path):
        return None
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) == real_root:
        return None
    return Problem(path, "outside_link", f"is a link to {real}, outside the dataset folder {real_root} (followed: it is read)", image_id)


def read_image_size(img: str, image_id: str, decode: bool = False) -> tuple[tuple[int, int] | None, Problem | None]:
    """``(height, width)`` of the image file ``img`` as displayed (its header only, or fully
    decoded when ``decode``), or the ``missing_image`` / ``unreadable_image`` problem that stops
    it; the one image check of every dataset format."""
    why = not_a_file(img, "image")
    if why is not None:
        return None, Problem(img, "missing_image", why, image_id)
    try:
        return (tuple(load_image(img).shape[-2:]) if decode else image_size(img)), None  # type: ignore[return-value]
    except DatasetError as err:
        return None, Problem(img, "unreadable_image", str(err).removeprefix(printable(f"{img}: ")), image_id)


def check_sample(root: str, image_id: str, class_to_index: dict[str, int], decode: bool = False, max_objects: int | None = None) -> list[Problem]:
    """Every problem of one sample: its annotation (:func:`read_annotation`, at most
    ``max_objects`` objects), its image (there, a file, readable; fully decoded when ``decode``),
    whether the annotation's ``<size>`` is the image's size as displayed (after EXIF rotation),
    the size its boxes refer to, and links leading outside ``root`` (:func:`outside_link`)."""
    xml = annotation_path(root, image_id)
    target, problems = read_annotation(xml, class_to_index, image_id, max_objects)
    img = image_path(root, image_id)
    problems += [p for p in (outside_link(root, xml, image_id), outside_link(root, img, image_id)) if p is not None]
    size, image_problem = read_image_size(img, image_id, decode)
    if image_problem is not None:
        return problems + [image_problem]
    if target is None:
        return problems
    if target["size"] is None:  # no <size>: the boxes can only be checked against the image
        return problems + box_problems(target["boxes"], size, xml, image_id)  # type: ignore[arg-type]
    if target["size"] != size:
        (xml_h, xml_w), (h, w) = target["size"], size
        hint = " (width and height swapped: labelled before its EXIF rotation?)" if (xml_h, xml_w) == (w, h) else ""
        problems.append(Problem(xml, "size_mismatch", f"<size> is {xml_w}x{xml_h} but the image {img} is {w}x{h}{hint}", image_id))
    return problems


def check_samples(
    root: str, ids: Iterable[str], class_to_index: dict[str, int], decode: bool = False, max_objects: int | None = None
) -> list[Problem]:
    """:func:`check_sample` over ``ids``."""
    return [p for image_id in ids for p in check_sample(root, image_id, class_to_index, decode, max_objects)]


def check_split(root: str, split: str, classes: Sequence[str], decode: bool = False, max_objects: int | None = None) -> list[Problem]:
    """Every problem of one split of a VOC-layout folder: the split file (:func:`split_ids`),
    then each sample it lists (once, however often it is listed)."""
    ids, problems = split_ids(root, split)
    class_to_index = {name: i + 1 for i, name in enumerate(classes)}
    return problems + check_samples(root, ids, class_to_index, decode, max_objects)


def bad_samples(problems: Iterable[Problem]) -> dict[str, Problem]:
    """image id -> its first error, for the samples that have one."""
    bad: dict[str, Problem] = {}
    for p in problems:
        if p.severity == "error" and p.image_id is not None:
            bad.setdefault(p.image_id, p)
    return bad


def count_kinds(problems: Iterable[Problem]) -> Counter:
    """kind -> how many problems of that kind."""
    return Counter(p.kind for p in problems)


def describe(problems: Sequence[Problem], limit: int = 5) -> str:
    """The first ``limit`` problems, one a line, and how many more."""
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------- the whole dataset
@dataclass
class SplitReport:
    """The problems of one split (``root``/``split``, the file ``ImageSets/Main/<split>.txt``),
    the stages that use it and its sample count. A stage whose split file is missing is a report
    of its own, ``root`` naming the config key and ``split`` empty."""

    root: str
    split: str
    samples: int
    problems: list[Problem]
    stages: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.root}/{self.split}" if self.split else self.root


def split_reports(datamodule: VOCDataModule, decode: bool = False) -> list[SplitReport]:
    """One report per distinct (root, split), or COCO file, of the DataModule's train, val and
    test sets: a set used by several stages is checked once. The data must be there
    (``prepare_data`` generates the built-in data)."""
    reports: dict[tuple[str, str], SplitReport] = {}
    for stage in STAGES:
        try:
            splits = datamodule.splits(stage)
        except DatasetError as err:  # a missing split file: report it, check the others
            splits = []
            key = f"data.{stage}_sets"
            reports.setdefault((key, ""), SplitReport(key, "", 0, [Problem(key, "bad_split", str(err))])).stages.append(stage)
        from fasterrcnn.data.sources import check_set, set_key  # VOC splits and COCO files alike (sources imports this module)

        for spec, (root, _split) in zip(datamodule.sets[stage], splits):
            key = set_key(spec, root)
            if key not in reports:
                reports[key] = check_set(spec, root, datamodule.classes, decode=decode, max_objects=datamodule.max_objects)
            reports[key].stages.append(stage)
    return list(reports.values())


def summary(name: str, reports: Sequence[SplitReport]) -> str:
    """A Markdown table: one row per split, problems counted per kind."""
    kinds = [k for k in PROBLEM_KINDS if any(count_kinds(r.problems)[k] for r in reports)]
    lines = [
        f"| split ({name}) | stages | samples | bad samples |" + "".join(f" {k} |" for k in kinds),
        "| --- | --- | ---: | ---: |" + " ---: |" * len(kinds),
    ]
    for r in reports:
        counts = count_kinds(r.problems)
        cells = " | ".join(str(counts[k]) for k in kinds)
        lines.append(f"| {r.name} | {', '.join(r.stages)} | {r.samples} | {len(bad_samples(r.problems))} |" + (f" {cells} |" if kinds else ""))
    return "\n".join(lines)


def to_json(name: str, reports: Sequence[SplitReport], status: int) -> dict:
    """The report as JSON data: per split its counts per kind and every problem."""
    return {
        "data": name,
        "status": status,
        "splits": [
            {
                "root": r.root,
                "split": r.split,
                "stages": r.stages,
                "samples": r.samples,
                "counts": dict(count_kinds(r.problems)),
                "problems": [{"file": p.file, "kind": p.kind, "severity": p.severity, "image_id": p.image_id, "message": p.message} for p in r.problems],
            }
            for r in reports
        ],
    }


def report_dataset(
    datamodule: VOCDataModule, decode: bool = False, strict: bool = False, quiet: bool = False, json_path: str | Path | None = None
) -> int:
    """Check every split of ``datamodule`` (:func:`split_reports`) and print each problem (unless
    ``quiet``), the :func:`summary` and a verdict; write :func:`to_json` to ``json_path`` when
    given. Returns the exit status: 1 when an error was found (or a warning, with ``strict``),
    0 otherwise."""
    reports = split_reports(datamodule, decode)
    problems = [p for r in reports for p in r.problems]
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    if not quiet:
        for p in problems:
            print(f"{p.severity.upper():7s} {p.kind:16s} {p}")
        if problems:
            print()
    print(summary(datamodule.name, reports))
    status = 1 if errors or (strict and warnings) else 0
    verdict = "OK" if status == 0 else "PROBLEMS FOUND"
    print(f"\n{verdict}: {errors} errors, {warnings} warnings in {sum(r.samples for r in reports)} samples")
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(to_json(datamodule.name, reports, status), indent=2), encoding="utf-8")
        print(f"wrote {json_path}")
    return status
