"""Draw what Faster R-CNN does to one image, stage by stage, as PNGs.

    python scripts/explain.py                                  # untrained model, val image 0
    python scripts/explain.py --ckpt outputs/runs/<date>/<time>/checkpoints/last.ckpt --index 3
    python scripts/explain.py backbone=vgg16 anchor=k9 --out /tmp/explain   # any Hydra override

Five panels, each its own PNG in --out and all together in pipeline.png: the anchors of one
feature cell, AnchorTargetCreator's samples, the top proposals, ProposalTargetCreator's RoIs and
the detections, all read from one FasterRCNN.trace of the image. Without --ckpt the model is
freshly initialised (nothing is downloaded): its proposals and detections mean nothing. With
--ckpt the detector, its classes and its preprocessing come from the checkpoint file; the config
says only where the data is. The logic: :mod:`fasterrcnn.analysis.explain`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from fasterrcnn.analysis.explain import explain
from fasterrcnn.analysis.inputs import INPUT_ERRORS, SETUP_STAGE
from fasterrcnn.build import compose_config
from fasterrcnn.cli import parse_script_args
from fasterrcnn.api import PredictError


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, usage="%(prog)s [options] [hydra overrides...]"
    )
    parser.add_argument("--ckpt", help="a checkpoint of src/train.py (default: an untrained model)")
    parser.add_argument("--index", type=int, default=0, help="image index in the split (default 0)")
    parser.add_argument("--split", choices=sorted(SETUP_STAGE), default="val")
    parser.add_argument("--out", default=os.path.join("outputs", "explain"), help="folder for the PNGs (default outputs/explain)")
    parser.add_argument("--score", type=float, default=0.5, help="detection score threshold (default 0.5)")
    parser.add_argument("--max-dets", type=int, default=100, help="detections drawn in panel 5, best first (default 100)")
    parser.add_argument("--top", type=int, default=50, help="proposals drawn in panel 3 (default 50)")
    parser.add_argument("--negatives", type=int, default=30, help="sampled negative anchors drawn in panel 2 (default 30)")
    args, overrides = parse_script_args(parser, argv)
    try:
        cfg = compose_config(overrides, args.out)
        lines = explain(cfg, args.ckpt, args.split, args.index, args.out, args.score, args.max_dets, args.top, args.negatives)
    except (*INPUT_ERRORS, PredictError) as err:  # UnsafeConfigError is a ValueError: nothing was built from a bad target
        sys.exit(f"error: {err}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
