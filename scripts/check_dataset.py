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
config itself is wrong. The logic: :func:`fasterrcnn.data.check.report_dataset`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fasterrcnn import build
from fasterrcnn.cli import parse_script_args
from fasterrcnn.data import DatasetError
from fasterrcnn.data.check import report_dataset

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, usage="%(prog)s [options] [hydra overrides...]"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    parser.add_argument("--decode", action="store_true", help="decode every image fully (finds corrupt pixel data; slower)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too (clipped boxes, images without objects)")
    parser.add_argument("--quiet", action="store_true", help="the summary only, not every problem")
    args, overrides = parse_script_args(parser, argv)
    try:
        datamodule = build.build_datamodule(build.compose_config(overrides, ROOT / "outputs" / "check_dataset", pretrained=False))
        datamodule.prepare_data()  # the built-in data is generated when missing (VOC downloaded only with data.download=true)
        return report_dataset(datamodule, args.decode, args.strict, args.quiet, args.json)
    except (HydraException, OmegaConfBaseException, DatasetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
