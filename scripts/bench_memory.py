"""Peak memory (RSS) and time of one training step of the default model with 1k, 10k and 30k
objects in one image, each in a child process (see :mod:`fasterrcnn.bench.memory`).

    python scripts/bench_memory.py                          # 1000, 10000, 30000 objects
    python scripts/bench_memory.py --counts 1000 3000 --unchunked   # also with the IoU matrices whole
    python scripts/bench_memory.py backbone=vgg16 --image-size 600 1000

Every other argument is a Hydra override of conf/train.yaml.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fasterrcnn.bench.memory import DEFAULT_COUNTS, DEFAULT_IMAGE_SIZE, markdown_table, measure
from fasterrcnn.cli import parse_script_args


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--counts", type=int, nargs="+", default=list(DEFAULT_COUNTS), help="objects per image")
    parser.add_argument("--image-size", type=int, nargs=2, default=list(DEFAULT_IMAGE_SIZE), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the child (default 1)")
    parser.add_argument("--unchunked", action="store_true", help="also measure with the whole IoU matrices (before the bound)")
    args, overrides = parse_script_args(parser, argv)
    results = measure(args.counts, overrides, tuple(args.image_size), chunked=True, threads=args.threads)
    if args.unchunked:
        results += measure(args.counts, overrides, tuple(args.image_size), chunked=False, threads=args.threads)
    print(markdown_table(results))


if __name__ == "__main__":
    main()
