"""Anchor coverage before any training: how well can each anchor config match the ground truth?

    python scripts/anchor_coverage.py                                  # every group in conf/anchor
    python scripts/anchor_coverage.py anchor=k9                        # one group
    python scripts/anchor_coverage.py anchor=k9,k15                    # some groups
    python scripts/anchor_coverage.py anchor=k9 anchor.scales=[4,8,16],[8,16,32]   # a sweep
    python scripts/anchor_coverage.py data=voc2007 backbone=vgg16 --images 500

Per anchor config, over the first ``--images`` training images and their non-difficult boxes:
the share of boxes whose best inside anchor reaches IoU 0.7 and 0.5, the median best IoU, and
the positive anchors per image of AnchorTargetCreator (after and before its sampling). Every
other argument is a Hydra override of conf/train.yaml; comma-separated values of ``anchor`` and
``anchor.*`` are swept. Prints a Markdown table and writes a bar plot (``--out``) with the table
as a ``.md`` file beside it. The logic: :mod:`fasterrcnn.analysis.coverage_report`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fasterrcnn.analysis.coverage_report import coverage_report
from fasterrcnn.analysis.inputs import INPUT_ERRORS
from fasterrcnn.cli import parse_script_args


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--images", type=int, default=200, help="how many training images, from the first (default 200)")
    parser.add_argument("--out", type=Path, default=Path("outputs/anchor_coverage/coverage.png"), help="the bar plot; the table goes beside it as .md")
    args, overrides = parse_script_args(parser, argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    torch.set_num_threads(1)  # small tensors: one thread is fastest and leaves the other cores alone
    try:
        print(coverage_report(overrides, args.images, args.out))
    except INPUT_ERRORS as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
