"""Training augmentation (the ``augment=`` config group) and multi-scale training sizes.

:class:`Augment` runs on the decoded image, before :func:`fasterrcnn.data.transforms.prepare`
rescales and normalises it, and is built from torchvision's ``transforms.v2`` with the boxes as
``tv_tensors.BoundingBoxes``: v2 moves, clamps and crops the boxes; nothing here re-derives box
geometry. The choices (``conf/augment/``):

* ``paper``: a horizontal flip with probability 0.5, the augmentation of every experiment of the
  paper and of the reference recipe;
* ``light``: the flip and photometric changes (``v2.ColorJitter``), sometimes a Gaussian blur or
  Gaussian noise;
* ``strong``: light, plus scale jitter (``v2.RandomAffine`` scale and shift, the canvas kept),
  zoom-out (``v2.RandomZoomOut``) and the IoU crop of SSD (``v2.RandomIoUCrop``, as
  :class:`IoUCrop`: the same crops, drawn faster);
* ``stretch`` (aspect-ratio jitter, :class:`RandomStretch`: a resize by ``TF.resize``, which moves
  the boxes) and a noise strength drawn per image (``noise_sigma: [min, max]``,
  :class:`RandomNoise`) are parameters any choice can set.

``mosaic`` (YOLOv4's mosaic, :func:`mosaic`) can be added to any choice: with that probability an
image is tiled with three other training images, each shrunk into one quadrant around a random
centre, before the rest of the augmentation runs on the tiled image: more objects per image,
smaller ones, and several scenes side by side (``augment=robust`` tiles every image).

``vflip`` and ``rot90`` (for overhead or microscopy images, where up is arbitrary) can be added to
any choice: ``augment.vflip=0.5 augment.rot90=true``.

The box-dropping rule, the only one: after the transforms that can cut a box (scale jitter, IoU
crop), a box whose width or height inside the image is under ``min_box_size`` pixels is dropped,
and its label and difficult flag with it (v2's ``sanitize_bounding_boxes``). v2 clamps every box
to the image it transforms, so a box pushed out of the image becomes empty and falls under the
rule; ``v2.RandomIoUCrop`` empties the boxes whose centre leaves its crop (SSD's rule), which then
fall under it too. Flips, rotations and zoom-out never shrink a box, so without scale jitter or
IoU crop nothing is dropped and every annotation is kept, as in the reference.

Random draws (``rng``):

* ``rng: item`` (light, strong): every draw of an image comes from the generator that the
  caller passes, :func:`item_generator` of ``(seed, epoch, index)`` (the caller is the training
  :class:`fasterrcnn.data.dataset.DetectionDataset`, which gets the epoch with each index from
  :class:`fasterrcnn.resume.ResumableSampler`'s ``(epoch, index)`` pairs): the same image of the same
  epoch is augmented the same way in the main process, in any DataLoader worker and after a
  resume, whatever was drawn before. v2 transforms draw from torch's global generator, so
  :meth:`Augment.__call__` runs them under ``torch.random.fork_rng`` with the global state set to
  the given generator's, and writes the advanced state back: v2 samples its own parameters, and
  the caller's generator is the only source of them.
* ``rng: global`` (paper): the caller passes no generator and the draws come from torch's global
  generator, as the training flip always has: exactly one ``torch.rand`` per image when the flip
  is on (``v2.RandomHorizontalFlip`` draws ``torch.rand(1) < p``, the same number and the same
  state as ``torch.rand(()) < p``), none when it is off.

Multi-scale training (detectron2's ``ResizeShortestEdge(sample_style="choice")``):
``data.min_size`` may be a list; :func:`draw_min_size` picks one size per image, from the same
generator, after :class:`Augment`; evaluation uses one size, :func:`eval_min_size`
(``data.test_min_size``, by default the largest of the list).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_iou
from torchvision.transforms import v2

# The ImageNet mean as uint8: what zoom-out and scale jitter fill the canvas with, so the filled
# area normalises to about 0 (SSD fills with the mean too).
MEAN_FILL = (124, 116, 104)
RNG_MODES = ("global", "item")
# The one builder a config's ``augment`` node may name (fasterrcnn.build's allowlist rule).
ALLOWED_TARGETS = frozenset({"fasterrcnn.data.augment.Augment"})


# ---------------------------------------------------------------------- random streams
def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of image ``index`` in ``epoch`` of a run with ``seed``: a CPU
    ``torch.Generator`` seeded from numpy's ``SeedSequence([seed, epoch, index])`` (a hash that
    mixes the three, so nearby triples give unrelated streams). Non-negative integers only."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"item_generator: seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    high, low = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(high) << 32) | int(low))


@contextmanager
def drawing_from(generator: torch.Generator | None) -> Iterator[None]:
    """Inside the block torch's global (CPU) generator draws ``generator``'s stream, and
    ``generator`` has advanced by what was drawn when the block ends; the global state outside is
    untouched. ``None``: the global generator itself, nothing swapped."""
    if generator is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        try:
            yield
        finally:
            generator.set_state(torch.get_rng_state())


# ---------------------------------------------------------------------- multi-scale sizes
def _sizes(min_size: int | Sequence[int]) -> list[int]:
    sizes = [int(min_size)] if isinstance(min_size, (int, np.integer)) else [int(s) for s in min_size]
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"data.min_size must be a positive size or a non-empty list of them, not {min_size!r}")
    return sizes


def draw_min_size(min_size: int | Sequence[int], generator: torch.Generator | None = None) -> int:
    """The shorter-side size of one training image: ``min_size`` itself when it is one size (no
    draw, so single-scale runs draw exactly as before), otherwise one of the list, uniformly,
    from ``generator`` (None: the global generator).

    >>> draw_min_size(600)
    600
    >>> draw_min_size([480, 576, 688], torch.Generator().manual_seed(0)) in (480, 576, 688)
    True
    """
    sizes = _sizes(min_size)
    if len(sizes) == 1:
        return sizes[0]
    return sizes[int(torch.randint(len(sizes), (1,), generator=generator))]


def eval_min_size(min_size: int | Sequence[int], test_min_size: int | None = None) -> int:
    """The one shorter-side size of validation, evaluation and prediction (and of the
    checkpoint's preprocessing): ``test_min_size`` (``data.test_min_size``) when set, otherwise
    the largest training size (detectron2's default pairs train sizes 640..800 with test 800).

    >>> eval_min_size([480, 576, 688]), eval_min_size(600), eval_min_size([480, 600], 560)
    (688, 600, 560)
    """
    if test_min_size is None:
        return max(_sizes(min_size))
    if not isinstance(test_min_size, (int, np.integer)) or test_min_size <= 0:
        raise ValueError(f"data.test_min_size is one positive size (or null: the largest of data.min_size), not {test_min_size!r}")
    return int(test_min_size)


# ---------------------------------------------------------------------- transforms v2 lacks, and a faster IoU crop
def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """``(H, W)`` of the image among a v2 transform's inputs."""
    image = next(i for i in flat_inputs if isinstance(i, tv_tensors.Image))
    height, width = TF.get_size(image)
    return int(height), int(width)


class RandomStretch(v2.Transform):
    """Aspect-ratio jitter: the image is resized to ``(H * sqrt(r), W / sqrt(r))`` (about the
    same area) with ``r`` log-uniform in ``aspect_range``, so an object's height / width is
    multiplied by ``r``; the boxes follow through ``TF.resize`` (v2's own box kernel)."""

    def __init__(self, aspect_range: Sequence[float]) -> None:
        super().__init__()
        self.log_range = tuple(float(np.log(v)) for v in aspect_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _image_size(flat_inputs)
        lo, hi = self.log_range
        root = float(torch.exp((lo + torch.rand(()) * (hi - lo)) / 2))  # sqrt(r)
        return {"size": [max(1, round(height * root)), max(1, round(width / root))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.resize, inpt, size=params["size"], antialias=True)


class _SigmaPerImage(v2.Transform):
    """A transform with a strength ``sigma`` drawn per image, uniformly from ``sigma_range``."""

    def __init__(self, sigma_range: Sequence[float]) -> None:
        super().__init__()
        self.sigma_range = tuple(float(v) for v in sigma_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.sigma_range
        return {"sigma": float(lo + torch.rand(()) * (hi - lo))}


def gaussian_blur_axis(image: Tensor, sigma: float, taps: int, dim: int) -> Tensor:
    """``TF.gaussian_blur`` along one axis of a float ``(..., H, W)`` image (``dim`` -2 or -1):
    the same normalised kernel of ``taps`` taps and the same reflect padding, as a sum of
    ``taps`` shifted, weighted copies (on the CPU about 3x faster than the depthwise
    convolution torchvision runs for a one-row kernel)."""
    half = taps // 2
    x = torch.linspace(-half, half, taps)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).tolist()
    size = image.shape[dim]
    pad = (0, 0, half, half) if dim == -2 else (half, half, 0, 0)
    padded = torch.nn.functional.pad(image.reshape(-1, *image.shape[-2:])[None], pad, mode="reflect")[0]
    out = padded.narrow(dim, 0, size) * kernel[0]
    for t in range(1, taps):
        out.add_(padded.narrow(dim, t, size), alpha=kernel[t])
    return out.view(image.shape)


class RandomBlur(_SigmaPerImage):
    """A Gaussian blur whose sigma (pixels) is drawn per image, uniformly from ``sigma_range``,
    over a kernel of ``2 * ceil(3 sigma) + 1`` taps, one axis at a time
    (:func:`gaussian_blur_axis`: the Gaussian is separable, so this is v2's 2-D
    ``TF.gaussian_blur`` with that kernel to float rounding, about 10x faster on the CPU than
    its one 17 x 17 pass; rounded to uint8 once, at the end). Boxes pass through."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        sigma = params["sigma"]
        taps = 2 * int(np.ceil(3 * sigma)) + 1
        image = inpt.as_subclass(Tensor)
        out = gaussian_blur_axis(gaussian_blur_axis(image.float(), sigma, taps, -2), sigma, taps, -1)
        if not image.is_floating_point():
            out = out.round_().clamp_(0, 255).to(image.dtype)
        return tv_tensors.wrap(out, like=inpt)


class RandomNoise(_SigmaPerImage):
    """Gaussian pixel noise whose standard deviation (a fraction of 255) is drawn per image,
    uniformly from ``sigma_range``, then ``TF.gaussian_noise`` (clipped); boxes pass through."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(TF.gaussian_noise, inpt, mean=0.0, sigma=params["sigma"], clip=True)


class IoUCrop(v2.RandomIoUCrop):
    """``v2.RandomIoUCrop`` (SSD's crop) with the same draws and the same crop, its trials tested
    together: v2 tests one trial at a time with a dozen small tensor ops (about 4 ms a crop on
    the CPU, most trials failing); this draws all of an option's trial numbers at once, finds
    the first trial v2 would accept with a few ops over all of them, and leaves torch's
    generator where v2's loop would have left it (``tests/test_augment.py`` checks the crops and
    the generator state against v2's)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        orig_h, orig_w = _image_size(flat_inputs)
        boxes = next(i for i in flat_inputs if isinstance(i, tv_tensors.BoundingBoxes))
        xyxy = TF.convert_bounding_box_format(boxes.as_subclass(Tensor), boxes.format, tv_tensors.BoundingBoxFormat.XYXY)
        centres = (0.5 * (xyxy[..., 0] + xyxy[..., 2]), 0.5 * (xyxy[..., 1] + xyxy[..., 3]))
        while True:
            threshold = self.options[int(torch.randint(low=0, high=len(self.options), size=(1,)))]
            if threshold >= 1.0:  # the leave-as-is option
                return {}
            state = torch.get_rng_state()
            # a trial draws 2 numbers for its size and, if its aspect ratio passes, 2 for its place
            u = torch.rand(4 * self.trials)
            scaled = self.min_scale + (self.max_scale - self.min_scale) * u
            widths, heights = (orig_w * scaled).tolist(), (orig_h * scaled).tolist()
            pos, sized = 0, []  # (trial's first place number, new_w, new_h) of the trials that pass
            for _ in range(self.trials):
                new_w, new_h = int(widths[pos]), int(heights[pos + 1])
                pos += 2
                if self.min_aspect_ratio <= new_w / new_h <= self.max_aspect_ratio:
                    sized.append((pos, new_w, new_h))
                    pos += 2
            params, used = self._first_accepted(u, sized, orig_h, orig_w, xyxy, centres, threshold)
            torch.set_rng_state(state)
            torch.rand(used if params is not None else pos)  # exactly what v2's loop draws
            if params is not None:
                return params

    def _first_accepted(
        self, u: Tensor, sized: list[tuple[int, int, int]], orig_h: int, orig_w: int, xyxy: Tensor, centres: tuple[Tensor, Tensor], threshold: float
    ) -> tuple[dict[str, Any] | None, int]:
        """The crop of the first of ``sized`` that v2 would accept and how many numbers v2 drew up to
        it (None, 0: none is)."""
        if not sized:
            return None, 0
        place = torch.tensor([p for p, _, _ in sized])
        spans = torch.tensor([[orig_w - w, orig_h - h] for _, w, h in sized], dtype=u.dtype)
        lefts = [int(v) for v in (spans[:, 0] * u[place]).tolist()]
        tops = [int(v) for v in (spans[:, 1] * u[place + 1]).tolist()]
        crops = [(left, top, left + w, top + h) for (_, w, h), left, top in zip(sized, lefts, tops)]
        trials = [i for i, (_, w, h) in enumerate(sized) if w > 0 and h > 0]  # 0-area crops are skipped
        if not trials or xyxy.shape[0] == 0:
            return None, 0
        window = torch.tensor([crops[i] for i in trials], dtype=xyxy.dtype)  # (T, 4)
        cx, cy = centres
        within = (window[:, :1] < cx) & (cx < window[:, 2:3]) & (window[:, 1:2] < cy) & (cy < window[:, 3:])  # (T, G)
        iou = box_iou(window, xyxy).masked_fill(~within, -math.inf)  # box_iou(boxes, crop) of v2, transposed
        accepted = (within.any(dim=1) & ~(iou.amax(dim=1) < threshold)).nonzero()
        if accepted.numel() == 0:
            return None, 0
        t = int(accepted[0, 0])
        i = trials[t]
        left, top, right, bottom = crops[i]
        params = {"top": top, "left": left, "height": bottom - top, "width": right - left, "is_within_crop_area": within[t].clone()}
        return params, sized[i][0] + 2


# ---------------------------------------------------------------------- the augmentation
def _prob(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"augment.{name} is a probability in [0, 1], not {value!r}")
    return value


def _strength(name: str, value: float, high: float = 1.0) -> float:
    value = float(value)
    if not 0.0 <= value <= high:
        raise ValueError(f"augment.{name} must lie in [0, {high}], not {value!r}")
    return value


def _range(name: str, value: Sequence[float], low: float) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not low < lo <= hi:
        raise ValueError(f"augment.{name} must be [min, max] with {low} < min <= max, not {list(value)!r}")
    return lo, hi


# ---------------------------------------------------------------------- mosaic
MOSAIC_CENTRE = (0.25, 0.75)  # the tiles' common corner, a fraction of each side, drawn uniformly
MOSAIC_PARTNERS = 3  # the other images of a mosaic


def mosaic(
    pieces: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]], centre: tuple[float, float], fill: Sequence[int] = MEAN_FILL
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four images tiled around a common corner (YOLOv4's mosaic, without its crop).

    Args:
        pieces: four ``(image (3, H_k, W_k) uint8, boxes (G_k, 4), labels (G_k,), difficult (G_k,))``,
            boxes continuous x1y1x2y2 in their image; the first sets the canvas, ``(H_0, W_0)``.
        centre: ``(x, y)`` of the corner the four tiles share, as fractions of ``W_0`` and ``H_0``.
        fill: the RGB (uint8) of the canvas a tile leaves uncovered.

    Returns:
        the canvas ``(3, H_0, W_0)`` uint8 and all ``G_0 + ... + G_3`` boxes in it, with their
        labels and flags in the order of ``pieces``. Piece k fills quadrant k (top left, top
        right, bottom left, bottom right of the centre), shrunk or grown with its aspect kept
        (``TF.resize``, which scales its boxes) to the largest size that fits, and is pushed
        against the centre; its boxes then move by the tile's offset. No part of an image is
        cut, so no box is cut or dropped.
    """
    if len(pieces) != 1 + MOSAIC_PARTNERS:
        raise ValueError(f"mosaic: {1 + MOSAIC_PARTNERS} pieces, not {len(pieces)}")
    height, width = pieces[0][0].shape[-2:]
    cx, cy = max(1, min(width - 1, round(centre[0] * width))), max(1, min(height - 1, round(centre[1] * height)))
    canvas = torch.tensor(list(fill), dtype=torch.uint8).view(3, 1, 1).expand(3, height, width).clone()
    regions = ((0, 0, cx, cy), (cx, 0, width, cy), (0, cy, cx, height), (cx, cy, width, height))  # x0, y0, x1, y1
    out_boxes = []
    for (image, boxes, _, _), (x0, y0, x1, y1), k in zip(pieces, regions, range(4)):
        h, w = image.shape[-2:]
        scale = min((x1 - x0) / w, (y1 - y0) / h)
        size = [max(1, min(y1 - y0, round(h * scale))), max(1, min(x1 - x0, round(w * scale)))]
        tile = TF.resize(tv_tensors.Image(image), size, antialias=True)
        tile_boxes = TF.resize(tv_tensors.BoundingBoxes(boxes.float(), format="XYXY", canvas_size=(h, w)), size)
        # against the centre: the left tiles end at cx, the top ones at cy
        left = x1 - size[1] if k in (0, 2) else x0
        top = y1 - size[0] if k in (0, 1) else y0
        canvas[:, top : top + size[0], left : left + size[1]] = tile.as_subclass(Tensor)
        out_boxes.append(tile_boxes.as_subclass(Tensor) + torch.tensor([left, top, left, top], dtype=torch.float32))
    labels = torch.cat([p[2] for p in pieces])
    difficult = torch.cat([p[3] for p in pieces])
    return canvas, torch.cat(out_boxes).reshape(-1, 4), labels, difficult


class Augment:
    """The training augmentation of one ``conf/augment/*.yaml``: a ``v2.Compose`` built once.

    Args (probabilities are per image; 0 leaves the transform out, drawing nothing):
        hflip: probability of a horizontal flip (``v2.RandomHorizontalFlip``; paper: 0.5).
        vflip: probability of a vertical flip (``v2.RandomVerticalFlip``).
        rot90: rotate by 0, 90, 180 or 270 degrees, each a quarter of the time
            (``v2.RandomRotation`` at that angle with ``expand``: no pixel is lost).
        brightness, contrast, saturation, hue: ``v2.ColorJitter``'s strengths: the factor is drawn
            from ``[1 - s, 1 + s]``, the hue shift from ``[-hue, hue]`` (a fraction of the colour
            circle, at most 0.5). All 0: no colour change.
        blur: probability of a Gaussian blur with sigma drawn from ``blur_sigma`` (pixels; the
            kernel covers 3 sigma; :class:`RandomBlur`, ``TF.gaussian_blur`` along each axis).
        noise: probability of Gaussian noise of standard deviation ``noise_sigma`` (a fraction
            of 255; ``v2.GaussianNoise``), or drawn per image from ``noise_sigma: [min, max]``
            (:class:`RandomNoise`).
        stretch: ``[min, max]`` of the aspect-ratio jitter (:class:`RandomStretch`): each image's
            height / width is multiplied by a factor log-uniform in it, its area about kept
            (e.g. ``[0.5, 2]``). None: off.
        scale_jitter: ``[min, max]`` scale of ``v2.RandomAffine`` about the image centre, with a
            shift of up to ``translate`` of the image size; the canvas is kept, so above 1 the
            image is zoomed in and cut, below 1 it is shrunk and the border filled. None: off.
        zoom_out: probability of ``v2.RandomZoomOut``: the image is placed at random on a canvas
            up to ``zoom_out_max`` times its sides, filled with ``fill``.
        iou_crop: probability of ``v2.RandomIoUCrop`` (:class:`IoUCrop`; SSD: a crop of 0.3 to 1 of each side
            whose IoU with some box reaches a threshold drawn from 0 to 0.9, or no crop, one
            time in seven).
        mosaic: probability that an image becomes a mosaic (:func:`mosaic`) of itself and
            ``MOSAIC_PARTNERS`` other training images drawn uniformly, before every other
            transform. The dataset reads the partners (:meth:`draw_mosaic`); 0: never, no draw.
        fill: the RGB (uint8) of the canvas outside the image (default: the ImageNet mean).
        min_box_size: the box-dropping rule (module docstring), in pixels of the original image.
        rng: ``"global"`` (draws from torch's global generator: the paper's flip, as always
            drawn) or ``"item"`` (the dataset passes :func:`item_generator` of
            ``(seed, epoch, index)``). Read by the caller; :meth:`__call__` draws from whatever
            generator it is given.

    Order: flips, then photometric (colour, blur, noise: the filled canvas stays the fill
    colour, as in SSD), then the aspect stretch, scale jitter, zoom-out and IoU crop, the quarter turn, and last the
    dropping rule.
    """

    def __init__(
        self,
        hflip: float = 0.5,
        vflip: float = 0.0,
        rot90: bool = False,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
        blur: float = 0.0,
        blur_sigma: Sequence[float] = (0.1, 1.5),
        noise: float = 0.0,
        noise_sigma: float | Sequence[float] = 0.03,
        stretch: Sequence[float] | None = None,
        scale_jitter: Sequence[float] | None = None,
        translate: float = 0.0,
        zoom_out: float = 0.0,
        zoom_out_max: float = 2.0,
        iou_crop: float = 0.0,
        mosaic: float = 0.0,
        fill: Sequence[int] = MEAN_FILL,
        min_box_size: float = 2.0,
        rng: str = "global",
    ) -> None:
        if rng not in RNG_MODES:
            raise ValueError(f"augment.rng must be one of {RNG_MODES}, not {rng!r}")
        if float(min_box_size) < 1.0:
            raise ValueError(f"augment.min_box_size must be >= 1 pixel, not {min_box_size!r}")
        fill = tuple(int(v) for v in fill)
        if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
            raise ValueError(f"augment.fill is an RGB colour of three values in 0..255, not {list(fill)!r}")
        # The arguments as given (plain values): :meth:`replace` builds a variant from them.
        self.params = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.rng = rng
        self.min_box_size = float(min_box_size)
        self.mosaic = _prob("mosaic", mosaic)
        self.fill = fill
        steps: list[v2.Transform] = []
        if _prob("hflip", hflip) > 0:
            steps.append(v2.RandomHorizontalFlip(hflip))
        if _prob("vflip", vflip) > 0:
            steps.append(v2.RandomVerticalFlip(vflip))
        jitter = {k: _strength(k, v) for k, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation))}
        jitter["hue"] = _strength("hue", hue, 0.5)
        if any(jitter.values()):
            steps.append(v2.ColorJitter(**{k: v or None for k, v in jitter.items()}))
        if _prob("blur", blur) > 0:
            sigma = _range("blur_sigma", blur_sigma, 0.0)
            steps.append(v2.RandomApply([RandomBlur(sigma)], p=blur))
        if _prob("noise", noise) > 0:
            if isinstance(noise_sigma, (int, float)):
                steps.append(v2.RandomApply([v2.GaussianNoise(sigma=_strength("noise_sigma", noise_sigma))], p=noise))
            else:
                sigmas = _range("noise_sigma", noise_sigma, -1e-12)
                steps.append(v2.RandomApply([RandomNoise((_strength("noise_sigma", sigmas[0]), _strength("noise_sigma", sigmas[1])))], p=noise))
        if stretch is not None:
            steps.append(RandomStretch(_range("stretch", stretch, 0.0)))
        if scale_jitter is not None:
            shift = _strength("translate", translate)
            affine = v2.RandomAffine(
                degrees=0.0, translate=(shift, shift) if shift else None, scale=_range("scale_jitter", scale_jitter, 0.0),
                interpolation=v2.InterpolationMode.BILINEAR, fill=fill,
            )
            steps.append(affine)
        if _prob("zoom_out", zoom_out) > 0:
            if not float(zoom_out_max) >= 1.0:
                raise ValueError(f"augment.zoom_out_max is the largest canvas side / image side, >= 1, not {zoom_out_max!r}")
            steps.append(v2.RandomZoomOut(fill=fill, side_range=(1.0, float(zoom_out_max)), p=zoom_out))
        if _prob("iou_crop", iou_crop) > 0:
            steps.append(v2.RandomApply([IoUCrop()], p=iou_crop))
        if rot90:
            # Last: torchvision 0.29 leaves the canvas size of an empty BoundingBoxes unrotated
            # (rotate with expand), which a later transform asking for the size would refuse.
            steps.append(v2.RandomChoice([v2.Identity()] + [v2.RandomRotation((a, a), expand=True) for a in (90, 180, 270)]))
        self.transforms = v2.Compose(steps or [v2.Identity()])  # all off: the image as it is
        # The dropping rule runs only where a box can be cut (module docstring).
        self.cuts_boxes = scale_jitter is not None or iou_crop > 0

    @property
    def hflip(self) -> float:
        """The probability of a horizontal flip (0: none)."""
        return float(self.params["hflip"])

    @property
    def is_reference_flip(self) -> bool:
        """True for the paper's augmentation alone (a horizontal flip from torch's global
        generator, nothing else): the dataset then flips after resizing, as the reference does,
        so the flipped boxes are its numbers to the last bit (flipping first rounds differently)."""
        off = {"vflip": 0.0, "rot90": False, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0,
               "blur": 0.0, "noise": 0.0, "stretch": None, "scale_jitter": None, "zoom_out": 0.0, "iou_crop": 0.0,
               "mosaic": 0.0}  # fmt: skip
        return self.rng == "global" and all(self.params[k] == v for k, v in off.items())

    @property
    def draws_per_item(self) -> bool:
        """True under ``rng: item``: the caller passes :func:`item_generator` of
        ``(seed, epoch, index)``, so it must know the epoch of each image it loads."""
        return self.rng == "item"

    def draw_mosaic(self, num_images: int, generator: torch.Generator | None = None) -> list[int] | None:
        """Whether this image becomes a mosaic, and with which others: ``MOSAIC_PARTNERS``
        indices in ``[0, num_images)`` drawn uniformly (with replacement), or None. Draws from
        ``generator`` (None: the global one), and nothing at all when ``mosaic`` is 0."""
        if self.mosaic <= 0:
            return None
        if not bool(torch.rand((), generator=generator) < self.mosaic):
            return None
        return torch.randint(num_images, (MOSAIC_PARTNERS,), generator=generator).tolist()

    def mosaic_centre(self, generator: torch.Generator | None = None) -> tuple[float, float]:
        """The centre of a mosaic (:data:`MOSAIC_CENTRE`), ``(x, y)`` fractions."""
        lo, hi = MOSAIC_CENTRE
        x, y = (lo + torch.rand(2, generator=generator) * (hi - lo)).tolist()
        return x, y

    def replace(self, **changes: Any) -> Augment:
        """The same augmentation with some arguments changed (``replace(hflip=0.0)``)."""
        return Augment(**{**self.params, **changes})

    def __repr__(self) -> str:
        return f"Augment(rng={self.rng!r}, mosaic={self.mosaic}, min_box_size={self.min_box_size}, cuts_boxes={self.cuts_boxes},\n  {self.transforms})"

    def __call__(
        self, image: Tensor, boxes: Tensor, labels: Tensor, difficult: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """uint8 ``image (3, H, W)`` with its ``boxes (G, 4)`` (continuous x1y1x2y2 in that
        image, :mod:`fasterrcnn.boxes`), ``labels (G,)`` and ``difficult (G,)`` -> the augmented
        ``image (3, H', W')`` uint8 and the ``G' <= G`` boxes that remain, with their labels and
        flags, in its coordinates. Every draw comes from ``generator`` (None: torch's global one)."""
        height, width = image.shape[-2:]
        sample = (tv_tensors.Image(image), tv_tensors.BoundingBoxes(boxes.float(), format="XYXY", canvas_size=(height, width)))
        with drawing_from(generator):
            out_image, out_boxes = self.transforms(*sample)
        if self.cuts_boxes:
            out_boxes, keep = TF.sanitize_bounding_boxes(out_boxes, min_size=self.min_box_size)
            labels, difficult = labels[keep], difficult[keep]
        return out_image.as_subclass(Tensor), out_boxes.as_subclass(Tensor), labels, difficult


def build_augment(node: Mapping[str, Any]) -> Augment:
    """:class:`Augment` from a config's ``augment`` node (``_target_`` and plain parameters);
    the node may name no other builder (:func:`fasterrcnn.build.check_config`)."""
    from fasterrcnn.build import safe_instantiate, to_container

    return safe_instantiate(to_container(node), "augment", allowed=ALLOWED_TARGETS, _convert_="all")
