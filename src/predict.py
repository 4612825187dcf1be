"""Detect objects with a trained checkpoint: ``python src/predict.py ckpt_path=... input=...``
(Hydra; see conf/predict.yaml).

    python src/predict.py ckpt_path=outputs/runs/<date>/<time>/checkpoints/last.ckpt input=photos/
    python src/predict.py ckpt_path=... input=photo.jpg output=/tmp/pred score_thresh=0.5 device=cpu
    python src/predict.py ckpt_path=elsewhere.ckpt input=photos/ min_size=600 max_size=1000

Writes each image with its detections drawn, and detections.json, into ``output`` (default
outputs/predict/<date>/<time>). Exits with status 1 when any image failed (the others are
still written) or when nothing could start (bad checkpoint, input, sizes or device).
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from fasterrcnn.predict import PredictError, predict

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    try:
        result = predict(cfg)
    except PredictError as err:  # a user error: its message, not a traceback
        log.error("error: %s", err)
        sys.exit(1)
    if result["failures"]:
        log.error("%d of %d image(s) failed:", len(result["failures"]), len(result["failures"]) + len(result["images"]))
        for failure in result["failures"]:
            log.error("  %s", failure["error"])
        sys.exit(1)


if __name__ == "__main__":
    main()
