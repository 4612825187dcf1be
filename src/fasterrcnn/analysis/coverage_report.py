"""``scripts/anchor_coverage.py``: anchor configs compared by :func:`~fasterrcnn.analysis.coverage.anchor_coverage`.

Over the first ``num_images`` training images (resized exactly as in training, not flipped) and
their non-difficult ground-truth boxes (difficult ones are left out, as in training), one table
row per anchor config: the share of boxes whose best inside anchor reaches IoU 0.7 and 0.5, the
median best IoU, and the positive anchors per image AnchorTargetCreator labels, after and
before its sampling.

The feature map size of each image size is the one the configured backbone's trunk gives: the
trunk runs on PyTorch's meta device (shapes only, no weights, no arithmetic), with
``backbone.pretrained=false`` so nothing is downloaded.

Every override is one of ``conf/train.yaml``. Comma-separated values of ``anchor`` and
``anchor.*`` are swept (one table row each); ``anchor.*`` overrides without an ``anchor=``
choice apply to the default group only; without any, one row per group of ``conf/anchor``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig

from fasterrcnn import build
from fasterrcnn.analysis.coverage import Coverage, Sample, Size, anchor_coverage
from fasterrcnn.analysis.inputs import load_split
from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn.build import CONF_DIR
from fasterrcnn.data import collate
from fasterrcnn.lit import training_targets


@dataclass
class Row:
    """One anchor config of the table and its coverage."""

    name: str
    generator: AnchorGenerator
    coverage: Coverage

    def sizes(self) -> str:
        """Anchor sides in input pixels, e.g. ``16-256 px``."""
        gen = self.generator
        lo, hi = min(gen.scales) * gen.base_size, max(gen.scales) * gen.base_size
        return f"{lo:g} px" if lo == hi else f"{lo:g}-{hi:g} px"


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
    dataset = load_split(cfg, "train")
    samples = []
    for index in range(min(num_images, len(dataset))):
        batch = collate([dataset[index]])  # unflipped: the coverage of the images as they are
        boxes, _ = training_targets(batch)
        size = batch.image_sizes[0]
        samples.append(Sample(image_size=size, feature_size=feature_size(*size), gt_boxes=boxes[0]))
    return samples


# ---------------------------------------------------------------------------- report
def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def markdown_table(rows: Sequence[Row], pos_iou_thresh: float) -> str:
    """One row per anchor config; ``pos_iou_thresh`` is AnchorTargetCreator's."""
    lines = [
        f"| anchors | scales (sides) | ratios | k | IoU ≥ 0.7 | IoU ≥ 0.5 | median best IoU | positives / image | before sampling | of which IoU < {pos_iou_thresh:g} |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        c, gen = r.coverage, r.generator
        scales = ", ".join(f"{s:g}" for s in gen.scales)
        ratios = ", ".join(f"{x:g}" for x in gen.ratios)
        lines.append(
            f"| {r.name} | [{scales}] ({r.sizes()}) | [{ratios}] | {gen.num_anchors} | {_fmt(c.share_iou[0.7])} | {_fmt(c.share_iou[0.5])} | "
            f"{_fmt(c.median_iou)} | {_fmt(c.positives, 1)} | {_fmt(c.positives_unsampled, 1)} | {_fmt(c.positives_low_iou, 1)} |"
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


def plot(rows: Sequence[Row], title: str, path: Path) -> None:
    """Grouped bars: the IoU shares and median per config (left), positives per image (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.arange(len(rows), dtype=torch.float64).tolist()
    cov = [r.coverage for r in rows]
    fig, (ax_iou, ax_pos) = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(rows)), 4.2))
    series = [
        ("IoU ≥ 0.7", [c.share_iou[0.7] for c in cov]),
        ("IoU ≥ 0.5", [c.share_iou[0.5] for c in cov]),
        ("median best IoU", [c.median_iou for c in cov]),
    ]
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax_iou.bar([v + (i - 1) * width for v in x], values, width, label=label)
    ax_iou.set_ylim(0, 1)
    ax_iou.set_ylabel("share of ground-truth boxes / IoU")
    ax_iou.set_title("best inside anchor per box")
    ax_iou.legend(fontsize=8)
    ax_pos.bar([v - 0.2 for v in x], [c.positives_unsampled for c in cov], 0.4, label="before sampling")
    ax_pos.bar([v + 0.2 for v in x], [c.positives for c in cov], 0.4, label="sampled")
    ax_pos.set_ylabel("positive anchors per image")
    ax_pos.set_title("AnchorTargetCreator")
    ax_pos.legend(fontsize=8)
    for ax in (ax_iou, ax_pos):
        ax.set_xticks(x, [r.name for r in rows], rotation=20, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- entry point
def coverage_report(overrides: Sequence[str], num_images: int, out: Path) -> str:
    """The table of every anchor config that ``overrides`` name (see the module docstring) over
    the first ``num_images`` training images; writes the bar plot ``out`` and the table beside it
    as ``.md``. Returns the text to print.

    Raises:
        HydraException, OmegaConfBaseException, DatasetError, ValueError: a bad override or data.
    """
    torch.manual_seed(0)
    configs = [(row, build.compose_config(row, out.parent, return_hydra_config=True, pretrained=False)) for row in expand_overrides(overrides)]
    first = configs[0][1]  # the rows differ in their anchors only: same data, trunk and sampler
    feature_size, stride = feature_size_fn(first.backbone)
    samples = load_samples(first, num_images, feature_size)
    rows = []
    for overrides_of_row, cfg in configs:
        generator = instantiate(cfg.anchor)(stride=stride)
        coverage = anchor_coverage(generator, samples, instantiate(cfg.sampler.anchor_target))
        rows.append(Row(row_name(cfg, overrides_of_row), generator, coverage))
    text = describe(first, samples, stride) + "\n\n" + markdown_table(rows, float(first.sampler.anchor_target.pos_iou_thresh))
    plot(rows, f"{first.data.name}: {len(samples)} images, {rows[0].coverage.num_boxes} boxes", out)
    md = out.with_suffix(".md")
    md.write_text(text + "\n", encoding="utf-8")
    return f"{text}\n\nwrote {out} and {md}"
