"""What Faster R-CNN does to one image, stage by stage, drawn as PNGs (``scripts/explain.py``).

Panels (each its own PNG, and all together in ``pipeline.png``), boxes drawn on the resized
input image the network sees:

1. the k anchors of the feature cell nearest the centre of the largest ground-truth box;
2. AnchorTargetCreator: the sampled positive anchors and some of the sampled negatives;
3. ProposalCreator: the top test-mode proposals, coloured by rank;
4. ProposalTargetCreator: the sampled RoIs, foreground by class and background in grey;
5. the final detections (score >= ``score``), ground truth dashed.

Every panel reads one :meth:`fasterrcnn.model.FasterRCNN.trace` of the image: its training
branch (with the image's non-difficult ground truth: anchor labels, training proposals, sampled
RoIs) and its test branch (``detect=True``: test proposals, detections), with the RNG seeded
before it so the samplers' draws repeat.

Without a checkpoint the model is freshly initialised from the config (``pretrained=false``,
nothing is downloaded): its proposals and detections mean nothing, but the anchors and both
samplers are the real ones. With one, the detector, its class names and its preprocessing come
from the checkpoint file alone: the image is prepared with the checkpoint's
:attr:`~fasterrcnn.model.FasterRCNN.preprocess` (:func:`fasterrcnn.data.transforms.prepare`);
the config says only where the data is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from omegaconf import DictConfig
from torch import Tensor

from fasterrcnn.analysis.inputs import item_at, load_split
from fasterrcnn.build import build_model, model_config
from fasterrcnn.data import collate
from fasterrcnn.data.transforms import Preprocess, denormalize
from fasterrcnn.lit import training_targets
from fasterrcnn.model import FasterRCNN, to_resized
from fasterrcnn.api import load_module, preprocessing
from fasterrcnn.visualize import class_color

GT_COLOR = "yellow"
PANELS = ("1_anchors", "2_anchor_targets", "3_proposals", "4_roi_samples", "5_detections")


# ---------------------------------------------------------------------------------- model
def load_model(cfg: DictConfig, ckpt: str | None) -> tuple[FasterRCNN, list[str], Preprocess]:
    """The detector, its class names and its preprocessing: all from the checkpoint file, or a
    freshly initialised detector of ``cfg`` (no ImageNet download).

    Raises:
        UnsafeConfigError: ``cfg`` names a ``_target_`` outside the project's builders.
        PredictError: the checkpoint cannot be loaded (or names such a target).
    """
    if ckpt is None:
        model = build_model(model_config(cfg), pretrained=False)
        return model, list(cfg.data.classes), model.preprocess
    module = load_module(ckpt, torch.device("cpu"))
    return module.model, module.class_names, preprocessing(module, ckpt)


# ---------------------------------------------------------------------------------- stages
def anchors_at(anchors: Tensor, k: int, width: int, i: int, j: int) -> Tensor:
    """The k anchors of feature cell (row i, column j) of a ``width``-column map: anchors are
    location-major (:func:`fasterrcnn.anchors.grid_anchors`), so they are consecutive."""
    start = (i * width + j) * k
    return anchors[start : start + k]


def nearest_cell(x: float, y: float, stride: int, height: int, width: int) -> tuple[int, int]:
    """The feature cell whose centre ``((j + 0.5) * stride, (i + 0.5) * stride)`` is nearest (x, y)."""
    i = min(max(int(y // stride), 0), height - 1)
    j = min(max(int(x // stride), 0), width - 1)
    return i, j


@dataclass
class Stages:
    """What the panels draw, read from one trace, in resized input coordinates."""

    size: tuple[int, int]  # (H, W) of the input
    feature_size: tuple[int, int]
    stride: int
    k: int
    cell: tuple[int, int]  # (row, column) of panel 1's feature cell
    cell_anchors: Tensor  # (k, 4)
    anchors: Tensor  # (A, 4)
    anchor_labels: Tensor  # (A,) in {-1, 0, 1}
    shown_negatives: Tensor  # indices of the negatives drawn
    test_proposals: Tensor  # (R_test, 4)
    num_train_proposals: int
    rois: Tensor  # (R, 4) sampled for the RoI head
    roi_labels: Tensor  # (R,)
    num_gt: int  # non-difficult objects: the targets
    det_boxes: Tensor  # (D, 4)
    det_scores: Tensor
    det_labels: Tensor


@torch.no_grad()
def run_stages(model: FasterRCNN, item: dict, score: float, num_negatives: int, seed: int) -> Stages:
    """One :meth:`FasterRCNN.trace` of ``item`` (an item of :class:`fasterrcnn.data.DetectionDataset`)
    with its training targets and ``detect=True``, as :class:`Stages`."""
    batch = collate([item])
    gt_boxes, gt_labels = training_targets(batch)  # difficult objects are not targets
    torch.manual_seed(seed)  # the samplers draw at random
    trace = model.trace(batch.images, batch.image_sizes, batch.original_sizes, gt_boxes, gt_labels, detect=True, score_thresh=score)
    train, test = trace.training, trace.testing
    assert train is not None and test is not None
    size, orig = trace.image_sizes[0], trace.original_sizes[0]
    fh, fw = trace.features.shape[-2:]
    k, stride = model.anchor_generator.num_anchors, model.anchor_generator.stride

    boxes = gt_boxes[0] if len(gt_boxes[0]) else item["boxes"]
    if len(boxes):
        big = boxes[((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argmax()]
        cx, cy = float(big[0] + big[2]) / 2, float(big[1] + big[3]) / 2
    else:
        cx, cy = size[1] / 2, size[0] / 2
    cell = nearest_cell(cx, cy, stride, fh, fw)
    labels = train.anchor_labels[0]
    negatives = (labels == 0).nonzero().flatten()
    det = test.detections[0]
    return Stages(
        size=size,
        feature_size=(fh, fw),
        stride=stride,
        k=k,
        cell=cell,
        cell_anchors=anchors_at(trace.anchors, k, fw, *cell),
        anchors=trace.anchors,
        anchor_labels=labels,
        shown_negatives=negatives[torch.randperm(len(negatives))[:num_negatives]],
        test_proposals=test.proposals[0],
        num_train_proposals=train.proposals[0].shape[0],
        rois=train.rois,
        roi_labels=train.roi_labels,
        num_gt=gt_boxes[0].shape[0],
        det_boxes=to_resized(det["boxes"], size, orig),  # the trace's detections are in original coordinates
        det_scores=det["scores"],
        det_labels=det["labels"],
    )


# ---------------------------------------------------------------------------------- drawing
def box_patch(box, color, lw=1.5, ls="-", alpha=1.0) -> Rectangle:
    x1, y1, x2, y2 = (float(v) for v in box)
    return Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=lw, linestyle=ls, alpha=alpha)


def show_image(ax, image, title: str) -> None:
    height, width = image.shape[:2]
    # extent: pixel (i, j) covers [j, j+1] x [i, i+1], the continuous box convention (fasterrcnn.boxes)
    ax.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_gt(ax, item: dict, ls="-", lw=2.0) -> None:
    for box, difficult in zip(item["boxes"], item["difficult"]):
        ax.add_patch(box_patch(box, GT_COLOR, lw=lw, ls=":" if difficult else ls))


def panel_anchors(ax, image, item, s: Stages, model: FasterRCNN) -> None:
    i, j = s.cell
    show_image(
        ax,
        image,
        f"1. anchors: the k={s.k} anchors of feature cell (y={i}, x={j})\n"
        f"of the {s.feature_size[0]}x{s.feature_size[1]} map (stride {s.stride}), ground truth yellow",
    )
    draw_gt(ax, item)
    gen = model.anchor_generator
    scales, ratios = gen.scales, gen.ratios
    cmap = matplotlib.colormaps["cool"]
    styles = ["-", "--", ":", "-."]
    for a, box in enumerate(s.cell_anchors):  # ratios-major, as in anchors.anchor_base
        r, sc = divmod(a, len(scales))
        ax.add_patch(box_patch(box, cmap(sc / max(len(scales) - 1, 1)), lw=1.3, ls=styles[r % len(styles)]))
    cx, cy = (s.cell_anchors[0, :2] + s.cell_anchors[0, 2:]).div(2).tolist()
    ax.plot([cx], [cy], "o", color="white", markeredgecolor="black", markersize=6)
    # Show the whole anchors, also where they stick out of the image (those are ignored in training).
    height, width = s.size
    lo = s.cell_anchors.min(dim=0).values
    hi = s.cell_anchors.max(dim=0).values
    pad = 4
    ax.set_xlim(min(0.0, float(lo[0])) - pad, max(float(width), float(hi[2])) + pad)
    ax.set_ylim(max(float(height), float(hi[3])) + pad, min(0.0, float(lo[1])) - pad)
    ax.add_patch(box_patch((0, 0, width, height), "black", lw=0.8))
    handles = [Line2D([], [], color=cmap(n / max(len(scales) - 1, 1)), label=f"{gen.base_size * sc:g} px") for n, sc in enumerate(scales)]
    handles += [Line2D([], [], color="black", ls=styles[n % len(styles)], label=f"h/w {r:g}") for n, r in enumerate(ratios)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), framealpha=0.8, title="anchor", title_fontsize=7)


def panel_anchor_targets(ax, image, item, s: Stages) -> None:
    labels, shown = s.anchor_labels, s.shown_negatives
    pos = (labels == 1).nonzero().flatten()
    show_image(
        ax,
        image,
        f"2. AnchorTargetCreator: {len(pos)} positive (green), {int((labels == 0).sum())} negative\n"
        f"({len(shown)} drawn, red), {int((labels == -1).sum())} ignored of {s.anchors.shape[0]} anchors",
    )
    for box in s.anchors[shown]:
        ax.add_patch(box_patch(box, "red", lw=0.6, alpha=0.8))
    for box in s.anchors[pos]:
        ax.add_patch(box_patch(box, "lime", lw=1.0))
    draw_gt(ax, item)


def panel_proposals(ax, image, item, s: Stages, top: int) -> None:
    proposals = s.test_proposals[:top]
    show_image(
        ax,
        image,
        f"3. ProposalCreator (test mode): top {len(proposals)} of {len(s.test_proposals)} proposals,\n"
        "coloured by rank (orange and thick = best, dark blue = worst), ground truth dashed",
    )
    cmap = matplotlib.colormaps["plasma"]
    for rank in reversed(range(len(proposals))):  # best on top; plasma stops at orange, short of the yellow ground truth
        ax.add_patch(box_patch(proposals[rank], cmap(0.8 * (1.0 - rank / max(len(proposals) - 1, 1))), lw=1.0 + 1.5 * (rank < 5)))
    draw_gt(ax, item, ls="--", lw=1.5)


def panel_roi_samples(ax, image, item, s: Stages, class_names) -> None:
    labels, rois = s.roi_labels, s.rois
    fg, bg = labels >= 1, labels == 0
    show_image(
        ax,
        image,
        f"4. ProposalTargetCreator: {int(fg.sum())} foreground (by class), {int(bg.sum())} background (grey)\n"
        f"sampled from {s.num_train_proposals} training proposals + {s.num_gt} ground truth",
    )
    for box in rois[bg]:
        ax.add_patch(box_patch(box, "dimgrey", lw=0.6, alpha=0.8))
    draw_gt(ax, item, ls="--", lw=1.5)
    for box, label in zip(rois[fg], labels[fg]):
        ax.add_patch(box_patch(box, class_color(int(label)), lw=1.2))
    present = sorted(set(labels[fg].tolist()))
    if present:
        handles = [Line2D([], [], color=class_color(c), label=class_names[c - 1]) for c in present]
        ax.legend(handles=handles, fontsize=7, loc="upper right", framealpha=0.8)


def panel_detections(ax, image, item, s: Stages, class_names, score: float, max_drawn: int, trained: bool) -> None:
    n = len(s.det_scores)
    note = "" if trained else " (untrained model)"
    drawn = f" (best {max_drawn} drawn)" if n > max_drawn else ""
    show_image(ax, image, f"5. detections: {n} with score >= {score:g}{drawn}{note}\nground truth dashed")
    draw_gt(ax, item, ls="--", lw=1.5)
    for box, sc, label in zip(s.det_boxes[:max_drawn], s.det_scores[:max_drawn], s.det_labels[:max_drawn]):  # best first
        color = class_color(int(label))
        ax.add_patch(box_patch(box, color, lw=2.0))
        ax.text(
            float(box[0]),
            float(box[1]),
            f"{class_names[int(label) - 1]} {float(sc):.2f}",
            fontsize=7,
            color="white",
            va="bottom",
            ha="left",
            bbox={"facecolor": color, "edgecolor": "none", "pad": 1.0, "alpha": 0.9},
            clip_on=True,
        )


# ---------------------------------------------------------------------------------- text
def summary_lines(s: Stages, item: dict, class_names, top: int, score: float) -> list[str]:
    """One line per panel, ``key=value`` counts (the tests read them)."""
    labels, roi_labels = s.anchor_labels, s.roi_labels
    listed = 10
    dets = ", ".join(f"{class_names[int(label) - 1]} {float(sc):.2f}" for sc, label in zip(s.det_scores[:listed], s.det_labels[:listed]))
    if len(s.det_scores) > listed:
        dets += f", and {len(s.det_scores) - listed} more"
    return [
        f"1 anchors: k={s.k} cell=({s.cell[0]},{s.cell[1]}) feature={s.feature_size[0]}x{s.feature_size[1]} stride={s.stride} anchors={s.anchors.shape[0]}",
        f"2 anchor targets: positives={int((labels == 1).sum())} negatives={int((labels == 0).sum())} ignored={int((labels == -1).sum())}",
        f"3 proposals: test={len(s.test_proposals)} drawn={min(top, len(s.test_proposals))}",
        (
            f"4 roi samples: rois={len(roi_labels)} foreground={int((roi_labels >= 1).sum())} background={int((roi_labels == 0).sum())} "
            f"filler={int((roi_labels == -1).sum())} proposals={s.num_train_proposals} gt={s.num_gt}"
        ),
        f"5 detections: detections={len(s.det_scores)} score>={score:g} gt={len(item['boxes'])} difficult={int(item['difficult'].sum())}"
        + (f" [{dets}]" if dets else ""),
    ]


def config_lines(model: FasterRCNN, item: dict, s: Stages) -> list[str]:
    atc, pc, ptc = model.anchor_target_creator, model.proposal_creator, model.proposal_target_creator
    h, w = s.size
    oh, ow = item["original_size"]
    return [
        f"image: {ow}x{oh} px resized to {w}x{h}",
        f"ground truth: {len(item['boxes'])} objects, {int(item['difficult'].sum())} difficult (dotted, not targets)",
        f"anchors: scales {[int(x) if x.is_integer() else x for x in model.anchor_generator.scales]} x base {model.anchor_generator.base_size:g}",
        f"         ratios {list(model.anchor_generator.ratios)}",
        f"AnchorTargetCreator: {atc.n_sample} anchors, <= {atc.pos_ratio:.0%} positive,",
        f"         IoU >= {atc.pos_iou_thresh} pos, < {atc.neg_iou_thresh} neg",
        f"ProposalCreator: train {pc.n_pre_nms['training']} -> NMS {pc.nms_thresh} -> {pc.n_post_nms['training']},",
        f"         test {pc.n_pre_nms['testing']} -> {pc.n_post_nms['testing']}",
        f"ProposalTargetCreator: {ptc.n_sample} RoIs, <= {ptc.pos_ratio:.0%} foreground,",
        f"         IoU >= {ptc.pos_iou_thresh} fg, [{ptc.neg_iou_thresh_lo}, {ptc.neg_iou_thresh_hi}) bg",
    ]


# ---------------------------------------------------------------------------------- entry point
def explain(
    cfg: DictConfig,
    ckpt: str | None = None,
    split: str = "val",
    index: int = 0,
    out: str | Path = "outputs/explain",
    score: float = 0.5,
    max_dets: int = 100,
    top: int = 50,
    negatives: int = 30,
) -> list[str]:
    """Draw the panels of image ``index`` of ``split`` ("train", "val", "test") of ``cfg.data``
    into ``out`` (see the module docstring); returns the lines to print: the files written, what
    was drawn, then :func:`summary_lines`.

    Args:
        ckpt: a checkpoint of ``src/train.py`` (None: an untrained model of ``cfg``, its weights
            seeded with ``cfg.seed``).
        score: detection score threshold; max_dets: detections drawn in panel 5, best first;
        top: proposals drawn in panel 3; negatives: sampled negative anchors drawn in panel 2.

    Raises:
        UnsafeConfigError, PredictError: the config or the checkpoint names a ``_target_``
            outside the project's builders, or the checkpoint cannot be loaded.
        ValueError: the checkpoint's classes are not the data's, or ``index`` is out of range.
    """
    torch.manual_seed(int(cfg.seed))  # the untrained model's weights
    model, class_names, spec = load_model(cfg, ckpt)
    model.eval()
    if ckpt is not None and list(cfg.data.classes) != class_names:
        raise ValueError(
            f"{ckpt}: the checkpoint detects {class_names}, but data={cfg.data.name} has {list(cfg.data.classes)}; pass the data config it was trained for (data=...)"
        )
    item = item_at(load_split(cfg, split, spec), index)
    s = run_stages(model, item, score, negatives, seed=int(cfg.seed))
    image = denormalize(item["image"], spec.mean, spec.std).permute(1, 2, 0).numpy()  # (H, W, 3) for imshow
    trained = ckpt is not None
    panels = [
        lambda ax: panel_anchors(ax, image, item, s, model),
        lambda ax: panel_anchor_targets(ax, image, item, s),
        lambda ax: panel_proposals(ax, image, item, s, top),
        lambda ax: panel_roi_samples(ax, image, item, s, class_names),
        lambda ax: panel_detections(ax, image, item, s, class_names, score, max_dets, trained),
    ]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    aspect = image.shape[0] / image.shape[1]
    written = []
    for name, draw in zip(PANELS, panels):
        fig = Figure(figsize=(6.4, 6.4 * aspect + 0.8))  # no pyplot: no global state, no display
        draw(fig.subplots())
        fig.tight_layout()
        written.append(out / f"{name}.png")
        fig.savefig(written[-1], dpi=110)

    fig = Figure(figsize=(19, 2 * (6.2 * aspect + 0.9)))
    axes = fig.subplots(2, 3)
    for ax, draw in zip(axes.flat, panels):
        draw(ax)
    model_name = f"checkpoint {ckpt}" if trained else "UNTRAINED model (random init): proposals and detections are random-ish"
    fig.suptitle(f"Faster R-CNN on {split} image {item['image_id']} (index {index}), {cfg.data.name} data; {model_name}", fontsize=12)
    summary = summary_lines(s, item, class_names, top, score)
    text_ax = axes.flat[5]
    text_ax.axis("off")
    text = "\n".join(["Per panel:", *summary, "", *config_lines(model, item, s)])
    text_ax.text(0.0, 1.0, text, va="top", ha="left", fontsize=9, family="monospace", wrap=True, transform=text_ax.transAxes)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    written.append(out / "pipeline.png")
    fig.savefig(written[-1], dpi=100)
    return [*(f"wrote {path}" for path in written), f"{split} image {item['image_id']} (index {index}), {model_name}", *summary]
