"""Draw one image under several draws of the training augmentation, with its boxes, as a PNG.

    python scripts/show_augment.py                                  # augment=paper, train image 0
    python scripts/show_augment.py augment=strong --index 5 --num 11 --out /tmp/strong.png
    python scripts/show_augment.py augment=light augment.rot90=true data.min_size=[224,256,288]

The first tile is the image as annotated; tile k is the draw of epoch k - 1 for that image (the
(seed, epoch, index) stream of fasterrcnn.data.augment.item_generator), rescaled as in training.
Boxes in their class's colour, difficult ones grey. Everything else is a Hydra override of
conf/train.yaml. The logic is fasterrcnn.visual_augment.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from hydra.errors import HydraException

from fasterrcnn.cli import parse_script_args
from fasterrcnn.data import DatasetError
from fasterrcnn.visual_augment import compose_config, show_augment


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="train", choices=("train", "val", "test"), help="the data's split (default: train)")
    parser.add_argument("--index", type=int, default=0, help="image index in the split's first set (default: 0)")
    parser.add_argument("--num", type=int, default=8, help="augmentation draws to show (default: 8)")
    parser.add_argument("--seed", type=int, default=None, help="the run seed of the draws (default: the config's seed)")
    parser.add_argument("--columns", type=int, default=3, help="tiles per row (default: 3)")
    parser.add_argument("--out", default="augment.png", help="the PNG to write (default: augment.png)")
    args, overrides = parse_script_args(parser, argv)
    try:
        with tempfile.TemporaryDirectory() as output_dir:
            cfg = compose_config(overrides, output_dir)
            path = show_augment(cfg, args.out, split=args.split, index=args.index, num=args.num, seed=args.seed, columns=args.columns)
    except (HydraException, DatasetError, ValueError) as err:
        sys.exit(f"show_augment.py: {err}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
