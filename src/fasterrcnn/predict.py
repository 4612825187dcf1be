"""``predict(cfg)``: a trained checkpoint on an image or a folder of images -> the images with
their detections drawn and ``detections.json``. ``src/predict.py`` is a thin Hydra entry point
around it (``conf/predict.yaml``); tests call it directly with a composed config.

Loading, preparing, detecting and drawing are :class:`fasterrcnn.api.Detector`'s, the same
object a notebook uses (``from fasterrcnn import Detector``); this module adds the walk over
the input files, the output folder, the per-image failures and ``detections.json``. The
one-image pipeline (:func:`fasterrcnn.api.load_module`, ``preprocessing``, ``detect``,
``resolve_device``, :class:`fasterrcnn.api.PredictError`) lives in :mod:`fasterrcnn.api`.

Boxes in ``detections.json`` are PASCAL VOC's 1-based inclusive pixel coordinates
``[xmin, ymin, xmax, ymax]`` (:func:`fasterrcnn.boxes.boxes_to_voc`), as in VOC annotations:
the continuous box the model predicts is ``[xmin - 1, ymin - 1, xmax, ymax]``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fasterrcnn.api import BOX_FORMAT, Detector, PredictError, drawing_options
from fasterrcnn.data.voc import load_image
from fasterrcnn.metrics_file import write_json


log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
USAGE = "python src/predict.py ckpt_path=outputs/runs/<date>/<time>/checkpoints/last.ckpt input=<image or folder>"


# ---------------------------------------------------------------------------------- inputs
def find_images(path: str | Path) -> list[Path]:
    """The images to process: ``path`` itself when it is a file (whatever its suffix), else the
    files of the folder ``path`` with an image suffix (:data:`IMAGE_SUFFIXES`, any case), sorted,
    not recursing into sub-folders."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PredictError(f"input={path}: no such file or folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PredictError(f"input={path}: the folder holds no images ({'/'.join(IMAGE_SUFFIXES)}; sub-folders are not searched)")
    return images


# ---------------------------------------------------------------------------------- the run
def default_output_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise PredictError("output=null means Hydra's run folder, which exists only under src/predict.py; give output=<folder>")
    return HydraConfig.get().runtime.output_dir


def predict(cfg: DictConfig) -> dict:
    """Detect, draw and write. Returns the contents of ``detections.json``.

    ``cfg`` keys (``conf/predict.yaml``): ``ckpt_path``, ``input`` (an image or a folder),
    ``output`` (a folder; null: Hydra's run folder), ``score_thresh``, ``nms_thresh`` (null: the
    checkpoint's), ``device``, ``min_size``/``max_size`` (null: the checkpoint's) and
    ``draw`` (``line_width``, ``font``, ``font_size``; null: sized to each image).

    An image that cannot be read or processed does not stop the others: it is logged and listed
    under ``failures`` in the result (the CLI then exits non-zero). A problem that stops all
    images (checkpoint, input, sizes, device, drawing options, output folder) raises :class:`PredictError`.
    """
    for key in ("ckpt_path", "input"):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
            raise PredictError(f"{key} is required: {USAGE}")
    ckpt_path, input_path = Path(str(cfg.ckpt_path)), Path(str(cfg.input))
    images = find_images(input_path)
    draw = drawing_options(cfg.get("draw"))
    out_dir = Path(str(cfg.output) if cfg.get("output") else default_output_dir())
    input_dir = input_path if input_path.is_dir() else input_path.parent
    if out_dir.resolve() == input_dir.resolve():
        raise PredictError(f"output={out_dir} is the input folder: the drawn images would overwrite the originals; choose another output")

    detector = Detector.from_checkpoint(
        ckpt_path, str(cfg.get("device", "auto")), cfg.get("score_thresh"), cfg.get("nms_thresh"), cfg.get("min_size"), cfg.get("max_size")
    )
    spec = detector.preprocess
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s on %d image(s): %s -> %s", ckpt_path, len(images), detector, out_dir)

    results: list[dict] = []
    failures: list[dict] = []
    for path in images:
        try:
            image = load_image(str(path))
            result = detector.predict(image)
            detector.save(image, out_dir / path.name, result, **draw)
        except Exception as err:  # one bad image must not cost the others their results
            message = str(err) if str(path) in str(err) else f"{path}: {type(err).__name__}: {err}"
            log.error("%s", message)
            failures.append({"file": str(path), "error": message})
            continue
        height, width = result.image_size
        results.append({"file": path.name, "path": str(path), "width": width, "height": height, "detections": result.to_json()})
        log.info("%s: %d detection(s)", path.name, len(result))

    output = {
        "checkpoint": str(ckpt_path),
        "classes": detector.classes,
        "score_thresh": detector.score_thresh,
        "nms_thresh": detector.nms_thresh,
        "min_size": spec.min_size,
        "max_size": spec.max_size,
        "box_format": BOX_FORMAT,
        "images": results,
        "failures": failures,
    }
    write_json(os.path.join(out_dir, "detections.json"), output)
    log.info("wrote %d image(s) and detections.json to %s", len(results), out_dir)
    return output
