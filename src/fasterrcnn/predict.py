"""``predict(cfg)``: a trained checkpoint on an image or a folder of images -> the images with
their detections drawn and ``detections.json``. ``src/predict.py`` is a thin Hydra entry point
around it (``conf/predict.yaml``); tests call it directly with a composed config.

Images are prepared as in training (:func:`fasterrcnn.data.transforms.prepare`, without the
flip) with the preprocessing the checkpoint carries (:attr:`FasterRCNN.preprocess`: the run's
``data.min_size``/``max_size`` and the backbone's mean/std), so the checkpoint file alone is
enough; ``min_size``/``max_size`` override the sizes.

Boxes in ``detections.json`` are PASCAL VOC's 1-based inclusive pixel coordinates
``[xmin, ymin, xmax, ymax]`` (:func:`fasterrcnn.boxes.boxes_to_voc`), as in VOC annotations:
the continuous box the model predicts is ``[xmin - 1, ymin - 1, xmax, ymax]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageFont
from torch import Tensor

from fasterrcnn.boxes import boxes_to_voc
from fasterrcnn.build import UnsafeConfigError
from fasterrcnn.data.transforms import Preprocess, prepare
from fasterrcnn.data.voc import load_image
from fasterrcnn.lit import FasterRCNNModule
from fasterrcnn.metrics_file import write_json
from fasterrcnn.model import FasterRCNN
from fasterrcnn.visualize import draw_detections

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BOX_FORMAT = (
    "voc: [xmin, ymin, xmax, ymax], 1-based inclusive pixel indices of the original image (continuous x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax)"
)
USAGE = "python src/predict.py ckpt_path=outputs/runs/<date>/<time>/checkpoints/last.ckpt input=<image or folder>"


class PredictError(RuntimeError):
    """Prediction cannot start (checkpoint, input, sizes, device, options); the message says what to fix."""


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


def run_config_path(ckpt_path: str | Path) -> Path | None:
    """The ``config.yaml`` of the run that wrote ``ckpt_path``: training writes
    ``<run>/config.yaml`` and ``<run>/checkpoints/*.ckpt``; a checkpoint copied next to its
    config is found too."""
    ckpt_path = Path(ckpt_path)
    for folder in (ckpt_path.parent, ckpt_path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def preprocessing(module: FasterRCNNModule, ckpt_path: str | Path, min_size: int | None = None, max_size: int | None = None) -> Preprocess:
    """How to prepare an image for the checkpoint's model: its stored :class:`Preprocess`
    (checkpoints carry it), with ``min_size``/``max_size`` replaced when given. A checkpoint
    written before the preprocessing travelled with the weights takes its sizes from the
    ``config.yaml`` of its run (:func:`run_config_path`) when there is one."""
    spec = module.model.preprocess
    if "preprocess" not in module.hparams["model_cfg"] and (min_size is None or max_size is None):
        config = run_config_path(ckpt_path)
        if config is None:
            raise PredictError(
                f"{ckpt_path}: an old checkpoint without its preprocessing, and no config.yaml of its run found (looked in"
                f" {Path(ckpt_path).parent} and {Path(ckpt_path).parent.parent}), so the training image size is unknown;"
                " give it, e.g. min_size=600 max_size=1000 (the paper's VOC sizes; the shapes data uses 256/400)"
            )
        try:
            data = OmegaConf.load(config).data
            min_size = int(data.min_size) if min_size is None else min_size
            max_size = int(data.max_size) if max_size is None else max_size
        except Exception as err:
            raise PredictError(f"{config}: cannot read data.min_size/data.max_size ({err}); give min_size=... max_size=...") from err
    for name, value in (("min_size", min_size), ("max_size", max_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise PredictError(f"{name}={value!r}: must be a positive integer (pixels)")
    return replace(spec, min_size=spec.min_size if min_size is None else min_size, max_size=spec.max_size if max_size is None else max_size)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:<i>``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise PredictError(f"device={name!r}: expected auto, cpu or cuda ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"device={name}: CUDA is not available here (use device=cpu or device=auto)")
    return device


def load_module(ckpt_path: str | Path, device: torch.device) -> FasterRCNNModule:
    """:meth:`FasterRCNNModule.load`, on ``device`` in eval mode, with a clear error for a path
    that is not a checkpoint of this project."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise PredictError(f"ckpt_path={ckpt_path}: no such file")
    try:
        module = FasterRCNNModule.load(str(ckpt_path))
    except UnsafeConfigError as err:  # names the file, the key and the value; nothing was built
        raise PredictError(str(err)) from err
    except Exception as err:
        raise PredictError(f"{ckpt_path}: cannot load it as a Faster R-CNN checkpoint of this project ({type(err).__name__}: {err})") from err
    return module.to(device).eval()


# ---------------------------------------------------------------------------------- one image
def detect(
    model: FasterRCNN,
    image: Tensor,
    spec: Preprocess | None = None,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
) -> dict[str, Tensor]:
    """Detections on one uint8 ``(3, H, W)`` image, prepared as in training
    (:func:`fasterrcnn.data.transforms.prepare` with ``spec``, default the model's own).

    Returns:
        ``boxes (D, 4)`` continuous coordinates of the original image, ``scores (D,)``,
        ``labels (D,)`` in 1..K, sorted by decreasing score, on the CPU.
    """
    device = next(model.parameters()).device
    original_size = (image.shape[-2], image.shape[-1])
    x, _ = prepare(image.to(device), None, spec or model.preprocess)
    det = model.predict(x[None], [(x.shape[-2], x.shape[-1])], [original_size], score_thresh=score_thresh, nms_thresh=nms_thresh)[0]
    return {k: v.cpu() for k, v in det.items()}


def detections_to_json(det: dict[str, Tensor], class_names: Sequence[str]) -> list[dict]:
    """``[{class, label, score, box}]`` with ``box`` in VOC coordinates (see :data:`BOX_FORMAT`)."""
    voc = boxes_to_voc(det["boxes"]).tolist()
    return [
        {"class": class_names[label - 1], "label": label, "score": round(score, 4), "box": [round(v, 2) for v in box]}
        for label, score, box in zip(det["labels"].tolist(), det["scores"].tolist(), voc)
    ]


def save_image(image: Tensor, path: Path) -> None:
    """Write uint8 ``(3, H, W)`` in the format its suffix names (JPEG at quality 95)."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg", ".webp") else {}
    pil.save(path, **options)


def drawing_options(draw) -> dict:
    """``cfg.draw`` as keyword arguments of :func:`draw_detections`, checked before any image
    (a wrong font would otherwise fail every image)."""
    draw = dict(draw or {})
    unknown = set(draw) - {"line_width", "font", "font_size"}
    if unknown:
        raise PredictError(f"draw: unknown option(s) {sorted(unknown)} (known: line_width, font, font_size)")
    if draw.get("font") is not None:
        try:
            ImageFont.truetype(draw["font"], 10)
        except OSError as err:
            raise PredictError(f"draw.font={draw['font']}: cannot load it as a TrueType font ({err})") from err
    return draw


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
    try:
        score_thresh = float(cfg.score_thresh)
    except (TypeError, ValueError):
        score_thresh = float("nan")
    if not 0.0 <= score_thresh <= 1.0:
        raise PredictError(f"score_thresh={cfg.score_thresh}: must be between 0 and 1 (a class probability)")
    nms_thresh = cfg.get("nms_thresh")
    ckpt_path, input_path = Path(str(cfg.ckpt_path)), Path(str(cfg.input))
    images = find_images(input_path)
    device = resolve_device(str(cfg.get("device", "auto")))
    draw = drawing_options(cfg.get("draw"))

    out_dir = Path(str(cfg.output) if cfg.get("output") else default_output_dir())
    input_dir = input_path if input_path.is_dir() else input_path.parent
    if out_dir.resolve() == input_dir.resolve():
        raise PredictError(f"output={out_dir} is the input folder: the drawn images would overwrite the originals; choose another output")

    module = load_module(ckpt_path, device)
    spec = preprocessing(module, ckpt_path, cfg.get("min_size"), cfg.get("max_size"))
    min_size, max_size = spec.min_size, spec.max_size
    class_names = module.class_names
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s on %d image(s), %s, min_size=%d max_size=%d, score > %.2f -> %s", ckpt_path, len(images), device, min_size, max_size, score_thresh, out_dir)

    results: list[dict] = []
    failures: list[dict] = []
    for path in images:
        try:
            image = load_image(str(path))
            det = detect(module.model, image, spec, score_thresh, nms_thresh)
            drawn = draw_detections(image, det["boxes"], det["labels"], det["scores"], class_names, **draw)
            save_image(drawn, out_dir / path.name)
        except Exception as err:  # one bad image must not cost the others their results
            message = str(err) if str(path) in str(err) else f"{path}: {type(err).__name__}: {err}"
            log.error("%s", message)
            failures.append({"file": str(path), "error": message})
            continue
        results.append(
            {
                "file": path.name,
                "path": str(path),
                "width": image.shape[-1],
                "height": image.shape[-2],
                "detections": detections_to_json(det, class_names),
            }
        )
        log.info("%s: %d detection(s)", path.name, len(det["scores"]))

    output = {
        "checkpoint": str(ckpt_path),
        "classes": class_names,
        "score_thresh": score_thresh,
        "nms_thresh": module.model.nms_thresh if nms_thresh is None else float(nms_thresh),
        "min_size": min_size,
        "max_size": max_size,
        "box_format": BOX_FORMAT,
        "images": results,
        "failures": failures,
    }
    write_json(os.path.join(out_dir, "detections.json"), output)
    log.info("wrote %d image(s) and detections.json to %s", len(results), out_dir)
    return output
