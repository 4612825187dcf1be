"""Check a VOC-layout dataset before training: every problem of every file, not just the first.

Checks each split of ``data.train_sets``, ``data.val_sets`` and ``data.test_sets`` (a split
used by several stages once): the split file (missing, empty, lines that are not UTF-8, ids
that are not plain file names, ids listed twice), each annotation (missing, a directory,
unreadable, malformed or unsafe XML, more objects than ``data.max_objects``, unknown class
names, missing or non-numeric boxes, xmax < xmin or ymax < ymin, boxes outside the image, no
objects), each image (missing, a directory, unreadable, and whether the annotation's ``<size>``
is the image's size after its EXIF rotation) and symbolic links leading outside the dataset
folder (followed in training; reported as warnings). Images are opened for their header only
unless ``--decode``.

    python scripts/check_dataset.py                          # the built-in shapes data (generated if needed)
    python scripts/check_dataset.py data=voc2007             # VOC2007 under paths.data_dir
    python scripts/check_dataset.py data=voc data.root=/path/to/MyData data.classes=[cat,dog]
    python scripts/check_dataset.py data=voc2007 --json outputs/check_voc2007.json --decode

Every other argument is a Hydra override of conf/train.yaml. Prints each problem (ERROR or
WARNING, kind, file, message) and a summary per split. Exit status: 1 when an error was found
(or a warning, with ``--strict``; a missing split file is an error), 0 otherwise; 2 when the
config itself is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fasterrcnn import build
from fasterrcnn.cli import parse_script_args
from fasterrcnn.data import DatasetError
from fasterrcnn.data.check import check_split, count_kinds
from fasterrcnn.data.voc import PROBLEM_KINDS, Problem, split_ids

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("train", "val", "test")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, usage="%(prog)s [options] [hydra overrides...]"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    parser.add_argument("--decode", action="store_true", help="decode every image fully (finds corrupt pixel data; slower)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too (clipped boxes, images without objects)")
    parser.add_argument("--quiet", action="store_true", help="the summary only, not every problem")
    args, overrides = parse_script_args(parser, argv)
    return args, overrides


def split_reports(overrides: Sequence[str], decode: bool) -> tuple[str, list[dict]]:
    """The data's name and one report per distinct (root, split): its stages, sample count and
    problems. The built-in data is generated first when missing (VOC downloaded only with
    ``data.download=true``)."""
    cfg = build.compose_config(overrides, ROOT / "outputs" / "check_dataset", pretrained=False)
    datamodule = build.build_datamodule(cfg)
    datamodule.prepare_data()
    reports: dict[tuple[str, str], dict] = {}
    for stage in STAGES:
        try:
            splits = datamodule.splits(stage)
        except DatasetError as err:  # a missing split file: report it, check the others
            splits = []
            key = (f"data.{stage}_sets", "")
            reports.setdefault(key, {"root": key[0], "split": "", "stages": [], "samples": 0, "problems": [Problem(key[0], "bad_split", str(err))]})
            reports[key]["stages"].append(stage)
        for root, split in splits:
            if (root, split) not in reports:
                problems = check_split(root, split, datamodule.classes, decode=decode, max_objects=datamodule.max_objects)
                samples = len(split_ids(root, split)[0])
                reports[(root, split)] = {"root": root, "split": split, "stages": [], "samples": samples, "problems": problems}
            reports[(root, split)]["stages"].append(stage)
    return cfg.data.name, list(reports.values())


def summary(name: str, reports: Sequence[dict]) -> str:
    """A Markdown table: one row per split, problems counted per kind."""
    kinds = [k for k in PROBLEM_KINDS if any(count_kinds(r["problems"])[k] for r in reports)]
    lines = [
        f"| split ({name}) | stages | samples | bad samples |" + "".join(f" {k} |" for k in kinds),
        "| --- | --- | ---: | ---: |" + " ---: |" * len(kinds),
    ]
    for r in reports:
        counts = count_kinds(r["problems"])
        bad = len({p.image_id for p in r["problems"] if p.severity == "error" and p.image_id})
        cells = " | ".join(str(counts[k]) for k in kinds)
        where = f"{r['root']}/{r['split']}" if r["split"] else r["root"]
        lines.append(f"| {where} | {', '.join(r['stages'])} | {r['samples']} | {bad} |" + (f" {cells} |" if kinds else ""))
    return "\n".join(lines)


def to_json(name: str, reports: Sequence[dict], status: int) -> dict:
    return {
        "data": name,
        "status": status,
        "splits": [
            {
                "root": r["root"],
                "split": r["split"],
                "stages": r["stages"],
                "samples": r["samples"],
                "counts": dict(count_kinds(r["problems"])),
                "problems": [
                    {"file": p.file, "kind": p.kind, "severity": p.severity, "image_id": p.image_id, "message": p.message} for p in r["problems"]
                ],
            }
            for r in reports
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        name, reports = split_reports(overrides, args.decode)
    except (HydraException, OmegaConfBaseException, DatasetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = [p for r in reports for p in r["problems"]]
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    if not args.quiet:
        for p in problems:
            print(f"{p.severity.upper():7s} {p.kind:16s} {p}")
        if problems:
            print()
    print(summary(name, reports))
    status = 1 if errors or (args.strict and warnings) else 0
    verdict = "OK" if status == 0 else "PROBLEMS FOUND"
    print(f"\n{verdict}: {errors} errors, {warnings} warnings in {sum(r['samples'] for r in reports)} samples")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(name, reports, status), indent=2), encoding="utf-8")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
