"""How far a run is from what this machine's arithmetic allows: the dense layers' FLOPs and time
on the run's own batches and validation images, their GFLOP/s against an fp32 GEMM's, the same
with one thread, and the whole run projected (:mod:`fasterrcnn.bench.floor`; docs/speed.md).

    python scripts/floor.py                                   # the default run, untrained weights
    python scripts/floor.py --ckpt outputs/runs/<run>/checkpoints/last.ckpt   # a trained detector's proposals
    python scripts/floor.py experiment=own_data --images 10   # any run: Hydra overrides of conf/train.yaml

Arguments that are not options below are Hydra overrides of conf/train.yaml. Run it on an idle
machine: it times one and two threads.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fasterrcnn.bench.floor import FloorOptions, run
from fasterrcnn.cli import parse_script_args


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--images", type=int, default=20, help="training batches and validation images measured (means)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured batches and images first")
    p.add_argument("--threads", default="auto", help="auto (as a run: one per core less the busy ones) or a number")
    p.add_argument("--ckpt", help="a trained checkpoint's weights (default: untrained, as the run starts)")
    p.add_argument("--gemm-size", type=int, default=2048, help="the square fp32 matrix product whose GFLOP/s is the reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the JSON file (default outputs/bench/<time>/floor.json)")
    args, overrides = parse_script_args(p, argv)
    if args.images < 1 or args.warmup < 0:
        p.error("--images must be at least 1 and --warmup at least 0")
    if args.ckpt and not os.path.isfile(args.ckpt):
        p.error(f"--ckpt {args.ckpt}: no such file")
    return run(overrides, FloorOptions(**vars(args)), log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        sys.exit(f"floor.py: bad config override: {err}")
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"floor.py: {err}")
