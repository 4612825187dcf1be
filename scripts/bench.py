"""Speed of this project's Faster R-CNN against torchvision's ``FasterRCNN`` configured identically
(:mod:`fasterrcnn.bench.speed`; what is measured and how: docs/speed.md).

    python scripts/bench.py --threads 1                       # the CPU default (tiny backbone, 256-400 px)
    python scripts/bench.py --threads 1 '~experiment' backbone=vgg16 data.min_size=600 data.max_size=1000 \\
        --image-size 600 1000 --repeats 3                     # VGG16 with the paper's anchors and sampler
    python scripts/bench.py --threads 1 trainer.precision=bf16-mixed model.channels_last=false
    python scripts/bench.py --busy-steps 25                   # + the thread policy on a busy machine (idle machine only)

Arguments that are not options below are Hydra overrides of conf/train.yaml; '~experiment' drops
the CPU default's experiment. On a machine shared with other processes use --threads 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fasterrcnn.bench.speed import SpeedOptions, run
from fasterrcnn.cli import parse_script_args
from fasterrcnn.api import PredictError


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--repeats", type=int, default=5, help="measured runs per contender (median)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="resize the bench image to exactly H x W")
    p.add_argument("--profile-steps", type=int, default=1, help="profiled steps for our time split")
    p.add_argument("--data-images", type=int, default=30, help="images read to time the DataLoader (0: skip)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the JSON file (default outputs/bench/<time>/bench.json)")
    p.add_argument("--map-ckpt", help="also: validation mAP of this trained checkpoint in fp32 and under bf16 autocast")
    p.add_argument("--busy-steps", type=int, default=0, help="also: this many training steps idle and beside a competing CPU-bound process (threads=auto, then all threads); 0: skip")
    args, overrides = parse_script_args(p, argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.busy_steps < 0:
        p.error("--busy-steps must be 0 or more")
    if args.map_ckpt and not os.path.isfile(args.map_ckpt):
        p.error(f"--map-ckpt {args.map_ckpt}: no such file")
    return run(overrides, SpeedOptions(**vars(args)), log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        sys.exit(f"bench.py: bad config override: {err}")
    except (FileNotFoundError, ValueError, PredictError) as err:
        sys.exit(f"bench.py: {err}")
