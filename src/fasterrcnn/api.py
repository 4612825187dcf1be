"""A trained detector as a Python object, for notebooks and scripts::

    from fasterrcnn import Detector

    det = Detector.from_checkpoint("outputs/runs/<date>/<time>/checkpoints/last.ckpt", score_thresh=0.7)
    result = det.predict("photo.jpg")      # or a PIL image, a (3, H, W) uint8 tensor, an (H, W, 3) uint8 array, a list
    result.boxes, result.scores, result.class_names
    det.draw("photo.jpg", result)          # (3, H, W) uint8 with the boxes drawn

This module is the one path from a checkpoint to detections: ``src/predict.py``
(:func:`fasterrcnn.predict.predict`) loads, prepares, detects, draws and writes each image
through a :class:`Detector`, and adds only the folder walk and ``detections.json``.

The checkpoint file alone is enough: it carries the classes and the preprocessing
(:attr:`FasterRCNN.preprocess`: the run's ``data.min_size``/``max_size`` and the backbone's
mean/std); images are prepared as in training by :func:`fasterrcnn.data.transforms.prepare`
(without the flip). Loading is safe (:meth:`FasterRCNNModule.load`: ``weights_only``, and only
the project's own ``_target_`` builders).

Boxes are continuous ``(x1, y1, x2, y2)`` coordinates of the original image
(:mod:`fasterrcnn.boxes`); :meth:`Detections.to_json` gives PASCAL VOC's 1-based inclusive
pixels ``[xmin, ymin, xmax, ymax]`` as in ``detections.json`` (:data:`BOX_FORMAT`).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageFont, ImageOps
from torch import Tensor

from fasterrcnn.boxes import boxes_to_voc
from fasterrcnn.build import UnsafeConfigError
from fasterrcnn.data.transforms import Preprocess, prepare
from fasterrcnn.data.voc import load_image
from fasterrcnn.lit import FasterRCNNModule
from fasterrcnn.model import FasterRCNN
from fasterrcnn.visualize import draw_detections

BOX_FORMAT = (
    "voc: [xmin, ymin, xmax, ymax], 1-based inclusive pixel indices of the original image (continuous x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax)"
)
DRAWING_OPTIONS = ("line_width", "font", "font_size")
# What predict() takes; a list or tuple of these gives a list of results.
ImageInput = str | Path | Image.Image | Tensor | np.ndarray


class PredictError(RuntimeError):
    """Prediction cannot start (checkpoint, input, sizes, device, options); the message says what to fix."""


# ---------------------------------------------------------------------------------- loading
def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:<i>``."""
    if str(name) == "auto":
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


def check_threshold(name: str, value) -> float:
    """``value`` as a float in [0, 1]; :class:`PredictError` naming ``name`` otherwise."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok:
        what = "a class probability" if name == "score_thresh" else "an IoU"
        raise PredictError(f"{name}={value!r}: must be a number between 0 and 1 ({what})")
    return float(value)


def drawing_options(draw=None) -> dict:
    """``draw`` (``line_width``, ``font``, ``font_size``) as keyword arguments of
    :func:`draw_detections`, checked before any image (a wrong font would otherwise fail every
    image)."""
    draw = dict(draw or {})
    unknown = set(draw) - set(DRAWING_OPTIONS)
    if unknown:
        raise PredictError(f"draw: unknown option(s) {sorted(unknown)} (known: {', '.join(DRAWING_OPTIONS)})")
    if draw.get("font") is not None:
        try:
            ImageFont.truetype(draw["font"], 10)
        except OSError as err:
            raise PredictError(f"draw.font={draw['font']}: cannot load it as a TrueType font ({err})") from err
    return draw


# ---------------------------------------------------------------------------------- images
def as_image(image: ImageInput) -> Tensor:
    """Any single input of :meth:`Detector.predict` -> uint8 ``(3, H, W)`` RGB (on the CPU, or
    where a given tensor is).

    A path is read with :func:`fasterrcnn.data.voc.load_image` (any colour mode, EXIF rotation
    applied); a PIL image gets the same EXIF rotation and RGB conversion, so a path and
    ``Image.open`` of it give the same pixels. Arrays and tensors are taken as they are: uint8
    RGB, ``(H, W, 3)`` for numpy (as PIL, imageio and matplotlib give them; OpenCV's are BGR:
    ``img[..., ::-1]``), ``(3, H, W)`` for torch (as torchvision gives them).

    Raises:
        FileNotFoundError: a path that is no file.
        TypeError: any other type. ValueError: a wrong shape or dtype, or a PIL mode of more than 8 bits.
        fasterrcnn.data.voc.DatasetError: a file that cannot be decoded (the message names it).
    """
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"{image}: no such image file" if not Path(image).is_dir() else f"{image}: a folder, not an image (give the image files)")
        return load_image(str(image))
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            raise ValueError(f"a PIL image of mode {image.mode} (more than 8 bits per pixel): pass its file path, which load_image scales to 0..255")
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"a numpy image must be (H, W, 3) uint8 RGB, not {image.shape} {image.dtype}")
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if isinstance(image, Tensor):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            hint = "; a float image in 0..1: (img * 255).round().to(torch.uint8)" if image.is_floating_point() else ""
            raise ValueError(f"a tensor image must be (3, H, W) uint8 RGB, not {tuple(image.shape)} {image.dtype}{hint}")
        return image
    raise TypeError(f"cannot predict on a {type(image).__name__}: give a file path, a PIL image, a (3, H, W) uint8 tensor or an (H, W, 3) uint8 numpy array (or a list of them)")


def save_image(image: Tensor, path: Path) -> None:
    """Write uint8 ``(3, H, W)`` in the format its suffix names (JPEG at quality 95)."""
    pil = Image.fromarray(image.detach().cpu().permute(1, 2, 0).numpy())
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg", ".webp") else {}
    pil.save(path, **options)


# ---------------------------------------------------------------------------------- detections
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


@dataclass(frozen=True)
class Detections:
    """The detections of one image, sorted by decreasing score, on the CPU.

    ``boxes (D, 4)``: continuous ``(x1, y1, x2, y2)`` in the original image's pixels;
    ``scores (D,)``: class probabilities; ``labels (D,)``: class indices 1..K (0 is background);
    ``class_names``: ``D`` names, ``classes[label - 1]``; ``image_size``: (height, width).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    class_names: list[str]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    def to_json(self) -> list[dict]:
        """``[{class, label, score, box}]``, ``box`` in VOC coordinates (:data:`BOX_FORMAT`), as in
        the ``detections`` of ``detections.json``."""
        voc = boxes_to_voc(self.boxes).tolist()
        return [
            {"class": name, "label": label, "score": round(score, 4), "box": [round(v, 2) for v in box]}
            for name, label, score, box in zip(self.class_names, self.labels.tolist(), self.scores.tolist(), voc)
        ]

    def __repr__(self) -> str:
        shown = ", ".join(f"{n} {s:.2f}" for n, s in zip(self.class_names[:5], self.scores.tolist()))
        more = f", ... ({len(self)} in all)" if len(self) > 5 else ""
        return f"Detections({len(self)} on {self.image_size[1]}x{self.image_size[0]}: {shown}{more})"


# ---------------------------------------------------------------------------------- the detector
class Detector:
    """A trained Faster R-CNN with its classes, preprocessing and thresholds.

    Args:
        model: the detector (its device is where prediction runs; it is put in eval mode).
        classes: the K class names; label k is ``classes[k - 1]``.
        preprocess: how images are prepared (default: the model's own, :attr:`FasterRCNN.preprocess`).
        score_thresh, nms_thresh: keep detections with a class probability above ``score_thresh``,
            per-class NMS at IoU ``nms_thresh`` (None: the model's, 0.05 and 0.3 by default;
            0.7 is the visualisation preset of ``src/predict.py``). Plain attributes: set them
            between calls.
    """

    def __init__(
        self,
        model: FasterRCNN,
        classes: Sequence[str],
        preprocess: Preprocess | None = None,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
    ) -> None:
        self.model = model.eval()
        self._classes = list(classes)
        self._preprocess = model.preprocess if preprocess is None else preprocess
        self.score_thresh = check_threshold("score_thresh", model.score_thresh if score_thresh is None else score_thresh)
        self.nms_thresh = check_threshold("nms_thresh", model.nms_thresh if nms_thresh is None else nms_thresh)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "auto",
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
    ) -> Detector:
        """The detector of a checkpoint written by ``src/train.py`` (the file alone is enough).

        ``device``: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:<i>``;
        ``min_size``/``max_size``: override the training rescaling the checkpoint carries.

        Raises:
            PredictError: a missing or foreign checkpoint, a bad device, threshold or size.
        """
        for name, value in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh)):
            if value is not None:
                check_threshold(name, value)  # before the (slow) loading
        device = resolve_device(device)
        module = load_module(path, device)
        spec = preprocessing(module, path, min_size, max_size)
        return cls(module.model, module.class_names, spec, score_thresh, nms_thresh)

    @property
    def classes(self) -> list[str]:
        """The K class names; label k is ``classes[k - 1]``."""
        return list(self._classes)

    @property
    def preprocess(self) -> Preprocess:
        """The rescaling and normalisation applied to every image."""
        return self._preprocess

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def predict(self, image: ImageInput | Sequence[ImageInput]) -> Detections | list[Detections]:
        """The detections of one image (a path, a PIL image, a ``(3, H, W)`` uint8 tensor or an
        ``(H, W, 3)`` uint8 array; see :func:`as_image`), or a list of them for a list.
        Boxes are in the original image's coordinates."""
        if isinstance(image, (list, tuple)):
            return [self.predict(one) for one in image]  # one at a time: as src/predict.py, no padding
        pixels = as_image(image)
        det = detect(self.model, pixels, self._preprocess, self.score_thresh, self.nms_thresh)
        names = [self._classes[k - 1] for k in det["labels"].tolist()]
        return Detections(det["boxes"], det["scores"], det["labels"], names, (pixels.shape[-2], pixels.shape[-1]))

    def draw(self, image: ImageInput, result: Detections | None = None, **options) -> Tensor:
        """``image`` as uint8 ``(3, H, W)`` with ``result`` (None: :meth:`predict` of it) drawn:
        class-coloured boxes labelled ``"name 0.93"`` (:func:`fasterrcnn.visualize.draw_detections`;
        ``options``: ``line_width``, ``font``, ``font_size``). To show it:
        ``PIL.Image.fromarray(drawn.permute(1, 2, 0).numpy())``."""
        pixels = as_image(image)
        if result is None:
            result = self.predict(pixels)
        if result.image_size != (pixels.shape[-2], pixels.shape[-1]):
            raise ValueError(f"the detections are of a {result.image_size[1]}x{result.image_size[0]} image, not of this {pixels.shape[-1]}x{pixels.shape[-2]} one")
        return draw_detections(pixels, result.boxes, result.labels, result.scores, self._classes, **drawing_options(options))

    def save(self, image: ImageInput, path: str | Path, result: Detections | None = None, **options) -> Path:
        """:meth:`draw` written to ``path`` in the format its suffix names (JPEG at quality 95)."""
        path = Path(path)
        save_image(self.draw(image, result, **options), path)
        return path

    def __repr__(self) -> str:
        spec = self._preprocess
        return (
            f"Detector({len(self._classes)} classes, {self.device}, min_size={spec.min_size} max_size={spec.max_size},"
            f" score_thresh={self.score_thresh}, nms_thresh={self.nms_thresh})"
        )
