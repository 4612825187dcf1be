"""Draw what Faster R-CNN does to one image, stage by stage, as PNGs.

    python scripts/explain.py                                  # untrained model, val image 0
    python scripts/explain.py --ckpt outputs/runs/<date>/<time>/checkpoints/last.ckpt --index 3
    python scripts/explain.py backbone=vgg16 anchor=k9 --out /tmp/explain   # any Hydra override

Panels (each its own PNG in --out, and all together in pipeline.png), boxes drawn on the
resized input image the network sees:

1. the k anchors of the feature cell nearest the centre of the largest ground-truth box;
2. AnchorTargetCreator: the sampled positive anchors and some of the sampled negatives;
3. ProposalCreator: the top test-mode proposals, coloured by rank;
4. ProposalTargetCreator: the sampled RoIs, foreground by class and background in grey;
5. the final detections (score >= --score), ground truth dashed.

Without --ckpt the model is freshly initialised (``pretrained=false``, nothing is downloaded):
its proposals and detections mean nothing, but the anchors and both samplers are the real ones.
With --ckpt the detector and its config come from the checkpoint; the data still comes from the
composed config (the image normalisation follows the checkpoint's backbone).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from hydra.errors import HydraException
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from omegaconf import DictConfig, open_dict
from torch import Tensor

from fasterrcnn import build
from fasterrcnn.build import UnsafeConfigError, build_datamodule, build_model, model_config
from fasterrcnn.cli import parse_script_args
from fasterrcnn.data import collate
from fasterrcnn.data.transforms import denormalize
from fasterrcnn.lit import FasterRCNNModule

SETUP_STAGE = {"train": "fit", "val": "validate", "test": "test"}
GT_COLOR = "yellow"
# Class colours: tab10 without its green, red and grey (those mean positive, negative, background).
CLASS_COLORS = [plt.get_cmap("tab10")(i) for i in (0, 1, 4, 5, 6, 8, 9)]


def class_color(label: int) -> tuple:
    return CLASS_COLORS[(label - 1) % len(CLASS_COLORS)]


# ---------------------------------------------------------------------------------- model
def load_model(cfg: DictConfig, ckpt: str | None):
    """The detector and its class names: from the checkpoint, or freshly initialised from cfg."""
    try:
        if ckpt is None:
            model = build_model(model_config(cfg), pretrained=False)  # no ImageNet download
            return model, list(cfg.data.classes)
        module = FasterRCNNModule.load(ckpt)
    except UnsafeConfigError as err:  # a _target_ outside the project's builders: nothing was built
        sys.exit(f"error: {err}")
    backbone = module.hparams["model_cfg"]["backbone"]
    with open_dict(cfg):  # normalise the image the way the checkpoint's backbone was trained
        for key in ("mean", "std"):
            if key in backbone:
                cfg.data[key] = list(backbone[key])
    if len(module.class_names) != len(cfg.data.classes):
        sys.exit(
            f"error: the checkpoint has {len(module.class_names)} classes, the data config {len(cfg.data.classes)} ({list(cfg.data.classes)})"
        )
    return module.model, module.class_names


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


@torch.no_grad()
def run_stages(model, item: dict, score: float, num_negatives: int, seed: int) -> dict:
    """Every intermediate result, in resized input coordinates."""
    batch = collate([item])
    size, orig = batch.image_sizes[0], batch.original_sizes[0]
    keep = ~item["difficult"]  # training targets leave difficult objects out (lit.training_targets)
    gt_boxes, gt_labels = item["boxes"][keep], item["labels"][keep]

    torch.manual_seed(seed)  # the samplers draw at random
    features, logits, deltas, anchors = model.rpn_forward(batch.images)
    fh, fw = features.shape[-2:]
    k = model.anchor_generator.num_anchors
    stride = model.anchor_generator.stride

    boxes = gt_boxes if len(gt_boxes) else item["boxes"]
    if len(boxes):
        big = boxes[((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argmax()]
        cx, cy = float(big[0] + big[2]) / 2, float(big[1] + big[3]) / 2
    else:
        cx, cy = size[1] / 2, size[0] / 2
    cell = nearest_cell(cx, cy, stride, fh, fw)

    rpn_labels, _ = model.anchor_target_creator(anchors, gt_boxes, size)
    negatives = (rpn_labels == 0).nonzero().flatten()
    shown_negatives = negatives[torch.randperm(len(negatives))[:num_negatives]]
    test_proposals = model.proposals(logits, deltas, anchors, [size], [orig], training=False)[0]
    train_proposals = model.proposals(logits, deltas, anchors, [size], [orig], training=True)[0]
    rois, roi_labels, _ = model.proposal_target_creator(train_proposals, gt_boxes, gt_labels)

    det = model.predict(batch.images, [size], [orig], score_thresh=score)[0]
    to_resized = det["boxes"].new_tensor([size[1] / orig[1], size[0] / orig[0]] * 2)
    return {
        "size": size,
        "feature_size": (fh, fw),
        "stride": stride,
        "k": k,
        "cell": cell,
        "cell_anchors": anchors_at(anchors, k, fw, *cell),
        "num_anchors": anchors.shape[0],
        "anchors": anchors,
        "rpn_labels": rpn_labels,
        "shown_negatives": shown_negatives,
        "test_proposals": test_proposals,
        "num_train_proposals": train_proposals.shape[0],
        "rois": rois,
        "roi_labels": roi_labels,
        "num_gt": gt_boxes.shape[0],
        "det_boxes": det["boxes"] * to_resized,  # predict answers in original coordinates
        "det_scores": det["scores"],
        "det_labels": det["labels"],
    }


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


def panel_anchors(ax, image, item, s, cfg_anchor) -> None:
    i, j = s["cell"]
    show_image(
        ax,
        image,
        f"1. anchors: the k={s['k']} anchors of feature cell (y={i}, x={j})\n"
        f"of the {s['feature_size'][0]}x{s['feature_size'][1]} map (stride {s['stride']}), ground truth yellow",
    )
    draw_gt(ax, item)
    scales, ratios = cfg_anchor["scales"], cfg_anchor["ratios"]
    cmap = plt.get_cmap("cool")
    styles = ["-", "--", ":", "-."]
    for a, box in enumerate(s["cell_anchors"]):  # ratios-major, as in anchors.anchor_base
        r, sc = divmod(a, len(scales))
        color = cmap(sc / max(len(scales) - 1, 1))
        ax.add_patch(box_patch(box, color, lw=1.3, ls=styles[r % len(styles)]))
    cx, cy = (s["cell_anchors"][0, :2] + s["cell_anchors"][0, 2:]).div(2).tolist()
    ax.plot([cx], [cy], "o", color="white", markeredgecolor="black", markersize=6)
    # Show the whole anchors, also where they stick out of the image (those are ignored in training).
    height, width = s["size"]
    lo = s["cell_anchors"].min(dim=0).values
    hi = s["cell_anchors"].max(dim=0).values
    pad = 4
    ax.set_xlim(min(0.0, float(lo[0])) - pad, max(float(width), float(hi[2])) + pad)
    ax.set_ylim(max(float(height), float(hi[3])) + pad, min(0.0, float(lo[1])) - pad)
    ax.add_patch(box_patch((0, 0, width, height), "black", lw=0.8))
    handles = [
        Line2D([], [], color=cmap(n / max(len(scales) - 1, 1)), label=f"{cfg_anchor['base_size'] * sc:g} px") for n, sc in enumerate(scales)
    ]
    handles += [Line2D([], [], color="black", ls=styles[n % len(styles)], label=f"h/w {r:g}") for n, r in enumerate(ratios)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), framealpha=0.8, title="anchor", title_fontsize=7)


def panel_anchor_targets(ax, image, item, s) -> None:
    labels, shown = s["rpn_labels"], s["shown_negatives"]
    pos = (labels == 1).nonzero().flatten()
    show_image(
        ax,
        image,
        f"2. AnchorTargetCreator: {len(pos)} positive (green), {int((labels == 0).sum())} negative\n"
        f"({len(shown)} drawn, red), {int((labels == -1).sum())} ignored of {s['num_anchors']} anchors",
    )
    for box in s["anchors"][shown]:
        ax.add_patch(box_patch(box, "red", lw=0.6, alpha=0.8))
    for box in s["anchors"][pos]:
        ax.add_patch(box_patch(box, "lime", lw=1.0))
    draw_gt(ax, item)


def panel_proposals(ax, image, item, s, top: int) -> None:
    proposals = s["test_proposals"][:top]
    show_image(
        ax,
        image,
        f"3. ProposalCreator (test mode): top {len(proposals)} of {len(s['test_proposals'])} proposals,\n"
        "coloured by rank (orange and thick = best, dark blue = worst), ground truth dashed",
    )
    cmap = plt.get_cmap("plasma")
    for rank in reversed(range(len(proposals))):  # best on top; plasma stops at orange, short of the yellow ground truth
        ax.add_patch(box_patch(proposals[rank], cmap(0.8 * (1.0 - rank / max(len(proposals) - 1, 1))), lw=1.0 + 1.5 * (rank < 5)))
    draw_gt(ax, item, ls="--", lw=1.5)


def panel_roi_samples(ax, image, item, s, class_names) -> None:
    labels, rois = s["roi_labels"], s["rois"]
    fg, bg = labels >= 1, labels == 0
    show_image(
        ax,
        image,
        f"4. ProposalTargetCreator: {int(fg.sum())} foreground (by class), {int(bg.sum())} background (grey)\n"
        f"sampled from {s['num_train_proposals']} training proposals + {s['num_gt']} ground truth",
    )
    for box in rois[bg]:
        ax.add_patch(box_patch(box, "dimgrey", lw=0.6, alpha=0.8))
    draw_gt(ax, item, ls="--", lw=1.5)
    for box, label in zip(rois[fg], labels[fg]):
        ax.add_patch(box_patch(box, class_color(int(label)), lw=1.2))
    present = sorted(set(labels[fg].tolist()))
    if present:
        ax.legend(
            handles=[Line2D([], [], color=class_color(c), label=class_names[c - 1]) for c in present],
            fontsize=7,
            loc="upper right",
            framealpha=0.8,
        )


def panel_detections(ax, image, item, s, class_names, score: float, max_drawn: int, trained: bool) -> None:
    n = len(s["det_scores"])
    note = "" if trained else " (untrained model)"
    drawn = f" (best {max_drawn} drawn)" if n > max_drawn else ""
    show_image(ax, image, f"5. detections: {n} with score >= {score:g}{drawn}{note}\nground truth dashed")
    draw_gt(ax, item, ls="--", lw=1.5)
    for box, sc, label in zip(s["det_boxes"][:max_drawn], s["det_scores"][:max_drawn], s["det_labels"][:max_drawn]):  # best first
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


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, usage="%(prog)s [options] [hydra overrides...]"
    )
    parser.add_argument("--ckpt", help="a checkpoint of src/train.py (default: an untrained model)")
    parser.add_argument("--index", type=int, default=0, help="image index in the split (default 0)")
    parser.add_argument("--split", choices=sorted(SETUP_STAGE), default="val")
    parser.add_argument("--out", default=os.path.join("outputs", "explain"), help="folder for the PNGs (default outputs/explain)")
    parser.add_argument("--score", type=float, default=0.5, help="detection score threshold (default 0.5)")
    parser.add_argument("--max-dets", type=int, default=100, help="detections drawn in panel 5, best first (default 100)")
    parser.add_argument("--top", type=int, default=50, help="proposals drawn in panel 3 (default 50)")
    parser.add_argument("--negatives", type=int, default=30, help="sampled negative anchors drawn in panel 2 (default 30)")
    args, overrides = parse_script_args(parser, argv)

    plt.switch_backend("Agg")  # files only, no display
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        cfg = build.compose_config(overrides, out)
    except HydraException as err:  # names the bad override
        sys.exit(f"error: {err}")
    torch.manual_seed(int(cfg.seed))  # the untrained model's weights
    model, class_names = load_model(cfg, args.ckpt)
    model.eval()

    with open_dict(cfg):
        cfg.data.flip_prob = 0.0  # the image as it is
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup(SETUP_STAGE[args.split])
    dataset = dm.datasets[args.split]
    if not 0 <= args.index < len(dataset):
        sys.exit(f"error: --index {args.index} is out of range: the {args.split} split has {len(dataset)} images")
    item = dataset[args.index]

    s = run_stages(model, item, args.score, args.negatives, seed=int(cfg.seed))
    image = denormalize(item["image"], cfg.data.mean, cfg.data.std).permute(1, 2, 0).numpy()  # (H, W, 3) for imshow
    anchor_cfg = {
        "scales": model.anchor_generator.scales,
        "ratios": model.anchor_generator.ratios,
        "base_size": model.anchor_generator.base_size,
    }
    trained = args.ckpt is not None

    panels = [
        ("1_anchors", lambda ax: panel_anchors(ax, image, item, s, anchor_cfg)),
        ("2_anchor_targets", lambda ax: panel_anchor_targets(ax, image, item, s)),
        ("3_proposals", lambda ax: panel_proposals(ax, image, item, s, args.top)),
        ("4_roi_samples", lambda ax: panel_roi_samples(ax, image, item, s, class_names)),
        ("5_detections", lambda ax: panel_detections(ax, image, item, s, class_names, args.score, args.max_dets, trained)),
    ]
    written = []
    for name, draw in panels:
        fig, ax = plt.subplots(figsize=(6.4, 6.4 * image.shape[0] / image.shape[1] + 0.8))
        draw(ax)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(2, 3, figsize=(19, 2 * (6.2 * image.shape[0] / image.shape[1] + 0.9)))
    for ax, (_, draw) in zip(axes.flat, panels):
        draw(ax)
    model_name = f"checkpoint {args.ckpt}" if trained else "UNTRAINED model (random init): proposals and detections are random-ish"
    fig.suptitle(
        f"Faster R-CNN on {args.split} image {item['image_id']} (index {args.index}), {cfg.data.name} data; {model_name}", fontsize=12
    )
    summary = summary_lines(s, args, class_names, item)
    text_ax = axes.flat[5]
    text_ax.axis("off")
    text_ax.text(
        0.0,
        1.0,
        "\n".join(["Per panel:"] + summary + ["", *config_lines(model, item, s)]),
        va="top",
        ha="left",
        fontsize=9,
        family="monospace",
        wrap=True,
        transform=text_ax.transAxes,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out / "pipeline.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    for path in written:
        print(f"wrote {path}")
    print(f"{args.split} image {item['image_id']} (index {args.index}), {model_name}")
    for line in summary:
        print(line)


def summary_lines(s: dict, args, class_names, item) -> list[str]:
    """One line per panel, ``key=value`` counts (the tests read them)."""
    labels, roi_labels = s["rpn_labels"], s["roi_labels"]
    listed = 10
    dets = ", ".join(
        f"{class_names[int(label) - 1]} {float(sc):.2f}" for sc, label in zip(s["det_scores"][:listed], s["det_labels"][:listed])
    )
    if len(s["det_scores"]) > listed:
        dets += f", and {len(s['det_scores']) - listed} more"
    return [
        f"1 anchors: k={s['k']} cell=({s['cell'][0]},{s['cell'][1]}) feature={s['feature_size'][0]}x{s['feature_size'][1]} stride={s['stride']} anchors={s['num_anchors']}",
        f"2 anchor targets: positives={int((labels == 1).sum())} negatives={int((labels == 0).sum())} ignored={int((labels == -1).sum())}",
        f"3 proposals: test={len(s['test_proposals'])} drawn={min(args.top, len(s['test_proposals']))}",
        (
            f"4 roi samples: rois={len(roi_labels)} foreground={int((roi_labels >= 1).sum())} background={int((roi_labels == 0).sum())} "
            f"filler={int((roi_labels == -1).sum())} proposals={s['num_train_proposals']} gt={s['num_gt']}"
        ),
        f"5 detections: detections={len(s['det_scores'])} score>={args.score:g} gt={len(item['boxes'])} difficult={int(item['difficult'].sum())}"
        + (f" [{dets}]" if dets else ""),
    ]


def config_lines(model, item, s) -> list[str]:
    atc, pc, ptc = model.anchor_target_creator, model.proposal_creator, model.proposal_target_creator
    h, w = s["size"]
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


if __name__ == "__main__":
    main()
