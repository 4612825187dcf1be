"""``anchor=auto``: anchor scales and ratios fitted to the training boxes before training.

Shape legend: B ground-truth boxes over the images used, k anchors per location
(``len(scales) * len(ratios)``).

The boxes are the training split's non-difficult ones (as in training), read from the
annotations and scaled by the training rescaling rule (:func:`fasterrcnn.data.transforms.
rescale_factor` with ``data.min_size`` / ``max_size``; with a list of sizes, image ``i`` at the
``i``-th size in turn), without decoding an image. Each image's feature map size is the trunk's
(:func:`fasterrcnn.analysis.coverage_report.feature_size_fn`, on the meta device), so any
backbone stride works.

The search (:func:`fit_anchors`): for every factorisation ``k = n_scales x n_ratios`` and a few
spreads, the scales are quantiles of the boxes' sides ``sqrt(w h) / base_size`` and the ratios
quantiles of their aspects ``h / w``, at levels spread evenly over the middle of the
distribution (:data:`SPREADS`). Each candidate is scored by
:func:`fasterrcnn.analysis.coverage.anchor_coverage`, the one coverage function (the best IoU
of each box with an anchor inside the image): the share of boxes reaching IoU 0.5 plus the share
reaching 0.7, ties broken by the median best IoU. No random draw: the same boxes give the same
anchors.

Training (:func:`fit_config`) fits once, before the model is built, prints the anchors with
their coverage and the coverage of the config's own values (``conf/anchor/auto.yaml``: k9's),
and puts plain ``scales`` / ``ratios`` in the config, so the run's ``config.yaml``, the
checkpoint's model config and hence eval, predict and resume all use the fitted anchors. A
resumed run takes them from its checkpoint and does not fit again. Outside training (the tools,
``scripts/anchor_coverage.py``), an ``anchor=auto`` node stands for its starting values
(:func:`auto_anchors`, :func:`model_anchor`).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from fasterrcnn.analysis.coverage import IOU_THRESHOLDS, Coverage, Sample, Size, anchor_coverage
from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn.data.transforms import rescale_factor
from fasterrcnn.data.voc import VOCDetection, clip_boxes, image_size, parse_voc_xml

# conf/anchor/auto.yaml's builder; the fit replaces it by AnchorGenerator and drops FIT_KEYS.
AUTO_TARGET = "fasterrcnn.analysis.anchor_fit.auto_anchors"
PLAIN_TARGET = "fasterrcnn.anchors.AnchorGenerator"
FIT_KEYS = ("k", "fit_images")
# Quantile levels of n values: linspace(a / n, 1 - a / n, n) for each a (a = 0.5: the middles
# of n equal parts; smaller: wider apart, larger: closer).
SPREADS = (1.0, 0.5, 0.25, 0.1)


# ---------------------------------------------------------------------- the config node
def auto_anchors(
    k: int = 15,
    fit_images: int | None = None,
    scales: Sequence[float] = (8, 16, 32),
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    base_size: float = 16,
    stride: int = 16,
) -> AnchorGenerator:
    """An ``anchor=auto`` node before its fit: the anchors of its starting ``scales`` and
    ``ratios`` (what the fit's "before" measures; ``scripts/anchor_coverage.py`` shows them).
    ``train`` fits the node first (:func:`fit_config`); ``k`` and ``fit_images`` are the fit's."""
    _check_k(k)
    return AnchorGenerator(scales, ratios, base_size, stride)


def _check_k(k: object) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"anchor.k is the number of anchors per location (scales x ratios), a positive integer, not {k!r}")


def is_auto(node: Mapping | None) -> bool:
    """Whether an ``anchor`` node is still to be fitted (``anchor=auto``)."""
    return node is not None and node.get("_target_") == AUTO_TARGET


def plain_anchor(node: Mapping, scales: Sequence[float], ratios: Sequence[float]) -> dict:
    """``node`` as a plain :class:`AnchorGenerator` node with ``scales`` and ``ratios``, without
    :data:`FIT_KEYS`."""
    out = {key: value for key, value in node.items() if key not in FIT_KEYS}
    return {**out, "_target_": PLAIN_TARGET, "scales": [float(s) for s in scales], "ratios": [float(r) for r in ratios]}


def model_anchor(node: Mapping) -> dict:
    """The anchor node a model config stores: ``node`` itself, or for an ``anchor=auto`` node
    that was not fitted (a tool given ``anchor=auto``; training always fits first) its starting
    values, with a warning."""
    if not is_auto(node):
        return dict(node)
    warnings.warn(
        f"anchor=auto is fitted by train() before the model is built; here, unfitted, it is its starting anchors "
        f"(scales {list(node['scales'])}, ratios {list(node['ratios'])}); a trained run's config.yaml and checkpoint hold the fitted ones",
        stacklevel=2,
    )
    return plain_anchor(node, node["scales"], node["ratios"])


# ---------------------------------------------------------------------- the boxes
def _voc_parts(dataset: Dataset) -> list[Dataset]:
    return [p for d in dataset.datasets for p in _voc_parts(d)] if isinstance(dataset, ConcatDataset) else [dataset]


def _read_boxes(part: Dataset, index: int) -> tuple[Size, Tensor]:
    """``(height, width)`` and the non-difficult boxes ``(G, 4)`` of image ``index``, clipped as
    the reader clips them: from the annotation (and the image header when it has no size) of a
    VOC-layout set, otherwise from the reader's item."""
    if isinstance(part, VOCDetection):
        image_id = part.ids[index]
        target = parse_voc_xml(part.annotation_path(image_id), part.class_to_index, part.max_objects)
        size = target["size"] or image_size(part.image_path(image_id))
        boxes, difficult = clip_boxes(target["boxes"], size), target["difficult"]
    else:
        item = part[index]
        size, boxes, difficult = tuple(item["image"].shape[-2:]), item["boxes"], item["difficult"]
    return (int(size[0]), int(size[1])), boxes[~difficult.bool()]


def training_boxes(dataset: Dataset, min_size: int | Sequence[int], max_size: int, max_images: int | None = None) -> list[tuple[Size, Tensor]]:
    """``(resized size, boxes (G, 4) in it)`` of the images of ``dataset`` (the training sets'
    reader, :class:`VOCDetection` or a ConcatDataset of them): all, or ``max_images`` spread
    evenly over them. Resized by the training rule (module docstring): the sizes :func:`fasterrcnn.
    data.transforms.resize` gives."""
    parts = _voc_parts(dataset)
    where = [(p, i) for p in parts for i in range(len(p))]  # type: ignore[arg-type]
    if max_images is not None and len(where) > max_images:
        where = [where[int(j)] for j in torch.linspace(0, len(where) - 1, max_images).round().long().unique()]
    sizes = [int(min_size)] if isinstance(min_size, int) else [int(s) for s in min_size]
    out = []
    for n, (part, index) in enumerate(where):
        (height, width), boxes = _read_boxes(part, index)
        scale = rescale_factor(height, width, sizes[n % len(sizes)], max_size)
        out_h, out_w = round(height * scale), round(width * scale)  # as transforms.resize
        out.append(((out_h, out_w), boxes * boxes.new_tensor([out_w / width, out_h / height] * 2)))
    return out


def box_samples(boxes: Sequence[tuple[Size, Tensor]], feature_size: Callable[[int, int], Size]) -> list[Sample]:
    """The coverage :class:`Sample` of each ``(image size, boxes)``."""
    return [Sample(size, feature_size(*size), gt) for size, gt in boxes]


# ---------------------------------------------------------------------- the search
@dataclass
class AnchorFit:
    """The fitted anchors, their coverage, and that of the anchors the fit started from."""

    scales: list[float]
    ratios: list[float]
    coverage: Coverage
    before: Coverage | None
    before_anchors: tuple[list[float], list[float]] | None
    num_candidates: int

    def record(self) -> dict:
        """Plain data for metrics.json's ``anchor_fit``."""

        def cov(c: Coverage | None) -> dict | None:
            return None if c is None else {f"iou>={t:g}": c.share_iou[t] for t in sorted(c.share_iou)} | {"median_iou": c.median_iou}

        before = None if self.before_anchors is None else {"scales": self.before_anchors[0], "ratios": self.before_anchors[1], "coverage": cov(self.before)}
        return {
            "k": len(self.scales) * len(self.ratios),
            "scales": self.scales,
            "ratios": self.ratios,
            "num_images": self.coverage.num_images,
            "num_boxes": self.coverage.num_boxes,
            "coverage": cov(self.coverage),
            "before": before,
            "candidates": self.num_candidates,
        }

    def describe(self, base_size: float, stride: int) -> str:
        def line(name: str, scales, ratios, c: Coverage) -> str:
            sides = ", ".join(f"{s * base_size:.0f}" for s in scales)
            return (
                f"  {name}: scales [{', '.join(f'{s:g}' for s in scales)}] ({sides} px), ratios [{', '.join(f'{r:g}' for r in ratios)}]: "
                f"IoU>=0.5 {c.share_iou[0.5]:.3f}, IoU>=0.7 {c.share_iou[0.7]:.3f}, median best IoU {c.median_iou:.3f}"
            )

        k = len(self.scales) * len(self.ratios)
        lines = [
            f"anchor=auto: k={k} ({len(self.scales)} scales x {len(self.ratios)} ratios) fitted to {self.coverage.num_boxes} boxes of "
            f"{self.coverage.num_images} training images (stride {stride}, {self.num_candidates} candidates; share of boxes whose best anchor reaches IoU):"
        ]
        if self.before is not None and self.before_anchors is not None:
            lines.append(line("before (the config's)", *self.before_anchors, self.before))
        lines.append(line("after  (fitted)      ", self.scales, self.ratios, self.coverage))
        return "\n".join(lines)


def _levels(n: int, spread: float) -> list[float]:
    return [0.5] if n == 1 else torch.linspace(spread / n, 1 - spread / n, n).tolist()


def _quantiles(values: Tensor, levels: Sequence[float]) -> list[float]:
    """Quantiles of ``values`` at ``levels``, taken in log space, rounded to 3 significant digits."""
    q = values.log().quantile(torch.tensor(levels, dtype=values.dtype)).exp().tolist()
    return [float(f"{v:.3g}") for v in q]


def _score(c: Coverage) -> tuple[float, float]:
    return (sum(c.share_iou[t] for t in IOU_THRESHOLDS), c.median_iou)


def candidates(boxes: Tensor, k: int, base_size: float) -> list[tuple[list[float], list[float]]]:
    """Every ``(scales, ratios)`` the search tries for ``boxes (B, 4)`` (module docstring), in a
    fixed order, without repeats."""
    w, h = (boxes[:, 2] - boxes[:, 0]).double(), (boxes[:, 3] - boxes[:, 1]).double()
    keep = (w > 0) & (h > 0)
    sides, aspects = (w * h).sqrt()[keep] / base_size, (h / w)[keep]
    out: list[tuple[list[float], list[float]]] = []
    for n_scales in (n for n in range(1, k + 1) if k % n == 0):
        n_ratios = k // n_scales
        for scale_spread, ratio_spread in itertools.product(SPREADS if n_scales > 1 else SPREADS[:1], SPREADS if n_ratios > 1 else SPREADS[:1]):
            pair = (_quantiles(sides, _levels(n_scales, scale_spread)), _quantiles(aspects, _levels(n_ratios, ratio_spread)))
            if pair not in out:
                out.append(pair)
    return out


def fit_anchors(
    samples: Sequence[Sample],
    k: int,
    base_size: float = 16,
    stride: int = 16,
    start: tuple[Sequence[float], Sequence[float]] | None = None,
) -> AnchorFit:
    """Scales and ratios with ``len(scales) * len(ratios) == k`` that maximise the coverage of
    ``samples`` (module docstring), for a trunk of ``stride`` and anchors of ``base_size``;
    ``start``: the ``(scales, ratios)`` to report the coverage "before" of.

    Raises:
        ValueError: ``k`` < 1, or no box in ``samples``.
    """
    _check_k(k)
    boxes = torch.cat([s.gt_boxes for s in samples]) if samples else torch.zeros(0, 4)
    if boxes.numel() == 0:
        raise ValueError("anchor=auto: the training images have no (non-difficult) box to fit the anchors to")

    def coverage(scales: Sequence[float], ratios: Sequence[float]) -> Coverage:
        return anchor_coverage(AnchorGenerator(scales, ratios, base_size, stride), samples)

    tried = candidates(boxes, k, base_size)
    scored = [(coverage(*pair), pair) for pair in tried]
    best, (scales, ratios) = max(scored, key=lambda item: _score(item[0]))  # the first of equals
    before = coverage(*start) if start is not None else None
    start_lists = ([float(s) for s in start[0]], [float(r) for r in start[1]]) if start is not None else None
    return AnchorFit(scales, ratios, best, before, start_lists, len(tried))


# ---------------------------------------------------------------------- in training
def _checkpoint_anchor(ckpt_path: str) -> dict:
    """The (fitted) anchor node of a checkpoint's model config, read without loading the weights
    into memory (``mmap``)."""
    # A checkpoint is data: only a plain AnchorGenerator node of numbers is taken from it.
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    node = ckpt.get("hyper_parameters", {}).get("model_cfg", {}).get("anchor") if isinstance(ckpt, dict) else None
    if not isinstance(node, dict) or node.get("_target_") != PLAIN_TARGET or not all(isinstance(node.get(key), list) for key in ("scales", "ratios")):
        raise ValueError(f"{ckpt_path}: no fitted anchors in the checkpoint's model config, cannot resume an anchor=auto run from it")
    return node


def fit_config(cfg: DictConfig, datamodule, ckpt_path: str | None = None) -> dict | None:
    """Under ``anchor=auto``, replace ``cfg.anchor`` by fitted plain scales and ratios (in
    place) and return :meth:`AnchorFit.record` (for metrics.json); otherwise do nothing and
    return None. ``datamodule``: the run's (its training sets are read, its setup is run);
    ``ckpt_path``: a resumed run takes the checkpoint's anchors instead of fitting again."""
    node = OmegaConf.to_container(cfg.anchor, resolve=True)
    if not is_auto(node):
        return None
    if ckpt_path is not None:
        fitted = _checkpoint_anchor(ckpt_path)
        with open_dict(cfg):
            cfg.anchor = OmegaConf.create(fitted)
        if rank_zero_only.rank == 0:
            print(f"anchor=auto: resuming with the checkpoint's fitted anchors: scales {fitted['scales']}, ratios {fitted['ratios']}", flush=True)
        return {"resumed": True, "scales": fitted["scales"], "ratios": fitted["ratios"]}
    from fasterrcnn.analysis.coverage_report import feature_size_fn

    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    if "pretrained" in backbone:
        backbone["pretrained"] = False  # shapes only: the trunk runs on the meta device
    feature_size, stride = feature_size_fn(OmegaConf.create(backbone))
    datamodule.setup("fit")
    min_size = OmegaConf.to_container(cfg.data.min_size) if OmegaConf.is_config(cfg.data.min_size) else cfg.data.min_size
    boxes = training_boxes(datamodule.datasets["train"].voc, min_size, int(cfg.data.max_size), node.get("fit_images"))
    base_size = float(node.get("base_size", 16))
    fit = fit_anchors(box_samples(boxes, feature_size), node["k"], base_size, stride, start=(node["scales"], node["ratios"]))
    if rank_zero_only.rank == 0:
        print(fit.describe(base_size, stride), flush=True)
    with open_dict(cfg):
        cfg.anchor = OmegaConf.create(plain_anchor(node, fit.scales, fit.ratios))
    return fit.record()
