"""Anchor coverage before any training: how well can each anchor config match the ground truth?

Over the first ``--images`` training images (resized exactly as in training, not flipped) and
their non-difficult ground-truth boxes (difficult ones are left out, as in training), for each
anchor config:

* the best IoU of each box with an anchor the RPN is trained on (one lying inside the image,
  the rule of AnchorTargetCreator): the share of boxes reaching 0.7 (a positive by threshold)
  and 0.5, and the median;
* the positive anchors per image that AnchorTargetCreator itself labels (its real rules: inside
  anchors only, the best anchor of each box, IoU >= pos_iou_thresh), after its sampling (at most
  n_sample * pos_ratio) and before it, and how many of those are positive only as the best
  anchor of a box (IoU below pos_iou_thresh; all tied anchors count, e.g. every large anchor
  that contains a small box has the same IoU with it).

The feature map size of each image size is the one the configured backbone's trunk gives: the
trunk runs on PyTorch's meta device (shapes only, no weights, no arithmetic), with
``backbone.pretrained=false`` so nothing is downloaded.

    python scripts/anchor_coverage.py                                  # every group in conf/anchor
    python scripts/anchor_coverage.py anchor=k9                        # one group
    python scripts/anchor_coverage.py anchor=k9,k15                    # some groups
    python scripts/anchor_coverage.py anchor=k9 anchor.scales=[4,8,16],[8,16,32]   # a sweep
    python scripts/anchor_coverage.py data=voc2007 backbone=vgg16 --images 500

Every other argument is a Hydra override of conf/train.yaml. Comma-separated values of
``anchor`` and ``anchor.*`` are swept (one table row each); ``anchor.*`` overrides without an
``anchor=`` choice apply to the default group only. Prints a Markdown table and writes a bar plot
(``--out``) with the table as a ``.md`` file beside it.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn import build
from fasterrcnn.boxes import inside_image
from fasterrcnn.build import CONF_DIR, build_datamodule
from fasterrcnn.cli import parse_script_args
from fasterrcnn.creators import AnchorTargetCreator
from fasterrcnn.data import DatasetError, collate
from fasterrcnn.lit import training_targets
from fasterrcnn.matcher import match_iou

IOU_THRESHOLDS = (0.7, 0.5)
Size = tuple[int, int]  # (height, width)


# ---------------------------------------------------------------------------- the computation
@dataclass
class Sample:
    """One training image as the RPN sees it: resized ``image_size`` (H, W), the trunk's
    ``feature_size`` (h, w) and the non-difficult ``gt_boxes (G, 4)`` in resized coordinates."""

    image_size: Size
    feature_size: Size
    gt_boxes: Tensor


@dataclass
class Coverage:
    """The coverage of one anchor config over a list of samples."""

    name: str
    scales: tuple[float, ...]
    ratios: tuple[float, ...]
    base_size: float
    k: int
    num_images: int
    num_boxes: int
    share_iou: dict[float, float]  # threshold -> share of boxes whose best anchor reaches it
    median_iou: float
    positives: float  # per image, after AnchorTargetCreator's sampling
    positives_unsampled: float  # per image, before it
    positives_low_iou: float  # per image, before sampling, below pos_iou_thresh (best-of-box matches)
    pos_iou_thresh: float  # AnchorTargetCreator's

    def sizes(self) -> str:
        """Anchor sides in input pixels, e.g. ``16-256 px``."""
        lo, hi = min(self.scales) * self.base_size, max(self.scales) * self.base_size
        return f"{lo:g} px" if lo == hi else f"{lo:g}-{hi:g} px"


def best_anchor_iou(anchors: Tensor, gt_boxes: Tensor, image_size: Size) -> Tensor:
    """``(G,)``: the highest IoU of each ground-truth box ``(G, 4)`` with an anchor ``(A, 4)``
    inside the image (0 where no anchor is inside), as the Matcher computes it."""
    return match_iou(anchors, gt_boxes, valid=inside_image(anchors, image_size)).gt_max_iou.clamp(min=0)


def count_positives(creator: AnchorTargetCreator, anchors: Tensor, gt_boxes: Tensor, image_size: Size) -> tuple[int, int, int]:
    """Positive anchors that ``creator`` labels for one image: after sampling, before it, and
    how many of those before it have an IoU below ``creator.pos_iou_thresh`` (positive only as
    the best anchor of a box, ties included).

    "Before" is the labelling of the creator's own Matcher, the rules it applies before sampling.
    """
    sampled = int((creator(anchors, gt_boxes, image_size)[0] == 1).sum())
    inside = inside_image(anchors, image_size)
    match = creator.matcher.match(anchors, gt_boxes, valid=inside)
    positive = creator.matcher.label(match, valid=inside) == 1  # (A,)
    low = int((positive & (match.max_iou < creator.pos_iou_thresh)).sum())
    return sampled, int(positive.sum()), low


def anchor_coverage(name: str, generator: AnchorGenerator, creator: AnchorTargetCreator, samples: Sequence[Sample]) -> Coverage:
    """Coverage of the anchors of ``generator`` over ``samples`` (see the module docstring)."""
    if not samples:
        raise ValueError("no images to measure the anchor coverage on")
    best, counts = [], torch.zeros(3, dtype=torch.long)
    for sample in samples:
        anchors = generator(*sample.feature_size)  # (h*w*k, 4)
        best.append(best_anchor_iou(anchors, sample.gt_boxes, sample.image_size))
        counts += torch.tensor(count_positives(creator, anchors, sample.gt_boxes, sample.image_size))
    positives, unsampled, low = (int(c) / len(samples) for c in counts)
    ious = torch.cat(best)  # (sum of G,)
    nan = float("nan")
    return Coverage(
        name=name,
        scales=generator.scales,
        ratios=generator.ratios,
        base_size=generator.base_size,
        k=generator.num_anchors,
        num_images=len(samples),
        num_boxes=ious.numel(),
        share_iou={t: float((ious >= t).float().mean()) if ious.numel() else nan for t in IOU_THRESHOLDS},
        median_iou=float(ious.quantile(0.5)) if ious.numel() else nan,
        positives=positives,
        positives_unsampled=unsampled,
        positives_low_iou=low,
        pos_iou_thresh=creator.pos_iou_thresh,
    )


# ---------------------------------------------------------------------------- config and data
def expand_overrides(overrides: Sequence[str]) -> list[list[str]]:
    """One override list per table row.

    Sweeps (``a,b``) of ``anchor`` and ``anchor.*`` are expanded into their product, as Hydra's
    ``-m`` would. Without any ``anchor`` or ``anchor.*`` override, one row per group of
    ``conf/anchor``.
    """
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    choices: list[list[str]] = []
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override():
            if key != "anchor" and not key.startswith("anchor."):
                raise ValueError(f"{override.input_line}: only anchor and anchor.* overrides can take several values here")
            choices.append([f"{override.get_key_element()}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    rows = [list(row) for row in itertools.product(*choices)]
    if not any(o.key_or_group == "anchor" or o.key_or_group.startswith("anchor.") for o in parsed):
        rows = [[*row, f"anchor={group}"] for row in rows for group in anchor_groups()]
    return rows


def anchor_groups() -> list[str]:
    """The choices of the ``anchor`` config group (the files of ``conf/anchor``), in natural
    order: k3_ratios, k3_scales, k9, k15, small."""
    names = [path.stem for path in (CONF_DIR / "anchor").glob("*.yaml")]
    return sorted(names, key=lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)])


def row_name(cfg: DictConfig, overrides: Sequence[str]) -> str:
    """The anchor group of the row and its ``anchor.*`` overrides, e.g. ``k9 anchor.scales=[4,8]``."""
    extra = [o for o in overrides if o.lstrip("+~").startswith("anchor.")]
    return " ".join([str(cfg.hydra.runtime.choices.anchor), *extra])


def feature_size_fn(backbone_cfg: DictConfig) -> tuple[Callable[[int, int], Size], int]:
    """``(H, W) -> (h, w)`` of the configured trunk, and its stride.

    The trunk is built and run on the meta device: exact output shapes (VGG16's max-pools floor,
    the tiny trunk's strided convs round up), no weights and no arithmetic.
    """
    with torch.device("meta"):
        backbone = instantiate(backbone_cfg)

    @cache
    def feature_size(height: int, width: int) -> Size:
        with torch.no_grad():
            out = backbone.trunk(torch.empty(1, 3, height, width, device="meta"))
        return int(out.shape[-2]), int(out.shape[-1])

    return feature_size, backbone.stride


def load_samples(cfg: DictConfig, num_images: int, feature_size: Callable[[int, int], Size]) -> list[Sample]:
    """The first ``num_images`` images of the training split, resized as in training, unflipped,
    with the training targets (difficult objects left out) and their ``feature_size``."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    dataset.flip_prob = 0.0  # coverage of the images as they are
    samples = []
    for index in range(min(num_images, len(dataset))):
        batch = collate([dataset[index]])
        boxes, _ = training_targets(batch)
        size = batch.image_sizes[0]
        samples.append(Sample(image_size=size, feature_size=feature_size(*size), gt_boxes=boxes[0]))
    return samples


# ---------------------------------------------------------------------------- report
def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def markdown_table(rows: Sequence[Coverage]) -> str:
    """One row per anchor config."""
    low = f"of which IoU < {rows[0].pos_iou_thresh:g}" if rows else "of which below the threshold"
    lines = [
        f"| anchors | scales (sides) | ratios | k | IoU ≥ 0.7 | IoU ≥ 0.5 | median best IoU | positives / image | before sampling | {low} |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        scales = ", ".join(f"{s:g}" for s in r.scales)
        ratios = ", ".join(f"{x:g}" for x in r.ratios)
        lines.append(
            f"| {r.name} | [{scales}] ({r.sizes()}) | [{ratios}] | {r.k} | {_fmt(r.share_iou[0.7])} | "
            f"{_fmt(r.share_iou[0.5])} | {_fmt(r.median_iou)} | {r.positives:.1f} | {r.positives_unsampled:.1f} | {r.positives_low_iou:.1f} |"
        )
    return "\n".join(lines)


def describe(cfg: DictConfig, samples: Sequence[Sample], stride: int) -> str:
    """What the table was measured on."""
    creator = cfg.sampler.anchor_target
    boxes = sum(s.gt_boxes.shape[0] for s in samples)
    choices = cfg.hydra.runtime.choices
    return (
        f"Anchor coverage on the first {len(samples)} training images of `{cfg.data.name}` "
        f"({boxes} non-difficult boxes; images resized to {cfg.data.min_size}/{cfg.data.max_size} px; "
        f"`{choices.backbone}` trunk, stride {stride}). Best IoU over the anchors inside the image; "
        f"positives as labelled by AnchorTargetCreator (IoU ≥ {creator.pos_iou_thresh} or best of a box), "
        f"sampled to at most {int(creator.n_sample * creator.pos_ratio)} of {creator.n_sample} per image."
    )


def plot(rows: Sequence[Coverage], title: str, path: Path) -> None:
    """Grouped bars: the IoU shares and median per config (left), positives per image (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.arange(len(rows), dtype=torch.float64).tolist()
    names = [r.name for r in rows]
    fig, (ax_iou, ax_pos) = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(rows)), 4.2))
    series = [
        ("IoU ≥ 0.7", [r.share_iou[0.7] for r in rows]),
        ("IoU ≥ 0.5", [r.share_iou[0.5] for r in rows]),
        ("median best IoU", [r.median_iou for r in rows]),
    ]
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax_iou.bar([v + (i - 1) * width for v in x], values, width, label=label)
    ax_iou.set_ylim(0, 1)
    ax_iou.set_ylabel("share of ground-truth boxes / IoU")
    ax_iou.set_title("best inside anchor per box")
    ax_iou.legend(fontsize=8)
    ax_pos.bar([v - 0.2 for v in x], [r.positives_unsampled for r in rows], 0.4, label="before sampling")
    ax_pos.bar([v + 0.2 for v in x], [r.positives for r in rows], 0.4, label="sampled")
    ax_pos.set_ylabel("positive anchors per image")
    ax_pos.set_title("AnchorTargetCreator")
    ax_pos.legend(fontsize=8)
    for ax in (ax_iou, ax_pos):
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- entry point
def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--images", type=int, default=200, help="how many training images, from the first (default 200)")
    parser.add_argument("--out", type=Path, default=Path("outputs/anchor_coverage/coverage.png"), help="the bar plot; the table goes beside it as .md")
    args, overrides = parse_script_args(parser, argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small tensors: one thread is fastest and leaves the other cores alone
    try:
        configs = [(row, build.compose_config(row, args.out.parent, return_hydra_config=True, pretrained=False)) for row in expand_overrides(overrides)]
        first = configs[0][1]  # the rows differ in their anchors only: same data, trunk and sampler
        feature_size, stride = feature_size_fn(first.backbone)
        samples = load_samples(first, args.images, feature_size)
        rows = []
        for row, cfg in configs:
            generator = instantiate(cfg.anchor)(stride=stride)
            rows.append(anchor_coverage(row_name(cfg, row), generator, instantiate(cfg.sampler.anchor_target), samples))
    except (HydraException, OmegaConfBaseException, DatasetError, ValueError) as err:
        sys.exit(f"error: {err}")
    intro = describe(first, samples, stride)
    table = markdown_table(rows)
    print(intro + "\n\n" + table)
    plot(rows, f"{first.data.name}: {len(samples)} images, {rows[0].num_boxes} boxes", args.out)
    md = args.out.with_suffix(".md")
    md.write_text(intro + "\n\n" + table + "\n", encoding="utf-8")
    print(f"\nwrote {args.out} and {md}")


if __name__ == "__main__":
    main()
