"""Print the tensor shape at each stage of Faster R-CNN, in training and in test mode.

    python scripts/inspect_shapes.py                                  # the default config
    python scripts/inspect_shapes.py backbone=vgg16 anchor=k9         # any override of conf/train.yaml
    python scripts/inspect_shapes.py experiment=voc07_vgg16 paths.data_dir=/path/to/data

Builds the detector of the composed config with untrained weights (``backbone.pretrained`` is
turned off: only shapes matter here, nothing is downloaded) and runs one ``FasterRCNN.trace`` on
one training image (``--index``, resized and normalised as in training, not flipped), with its
ground truth and ``detect=True``, with a fixed seed (``--seed``). Counts that depend on the
weights (proposals, detections) are those of an untrained network; the shapes are the ones a
trained model has. The logic: :mod:`fasterrcnn.analysis.shapes`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fasterrcnn.analysis.shapes import shapes_report
from fasterrcnn.build import compose_config
from fasterrcnn.analysis.inputs import INPUT_ERRORS
from fasterrcnn.cli import parse_script_args

ROOT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--index", type=int, default=0, help="which training image (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the sampling (default 0)")
    args, overrides = parse_script_args(parser, argv)
    try:
        cfg = compose_config(overrides, ROOT / "outputs" / "inspect_shapes", return_hydra_config=True, pretrained=False)
        print(shapes_report(cfg, args.index, args.seed))
    except INPUT_ERRORS as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
