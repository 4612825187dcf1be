"""Print the tensor shape at each stage of Faster R-CNN, in training and in test mode.

    python scripts/inspect_shapes.py                                  # the default config
    python scripts/inspect_shapes.py backbone=vgg16 anchor=k9         # any override of conf/train.yaml
    python scripts/inspect_shapes.py experiment=voc07_vgg16 paths.data_dir=/path/to/data

Builds the detector of the composed config with untrained weights (``backbone.pretrained`` is
turned off: only shapes matter here, nothing is downloaded) and runs one training image
(``--index``, resized and normalised as in training, not flipped) through every stage, with a
fixed seed (``--seed``). Counts that depend on the weights (proposals, detections) are those of
an untrained network; the shapes are the ones a trained model has.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from fasterrcnn import build
from fasterrcnn.build import build_datamodule, build_model, model_config
from fasterrcnn.cli import parse_script_args
from fasterrcnn.data import DatasetError, DetectionBatch, collate
from fasterrcnn.lit import training_targets
from fasterrcnn.model import FasterRCNN

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- config, model, data
def load_batch(cfg: DictConfig, index: int) -> DetectionBatch:
    """Training image ``index`` as a batch of one, resized and normalised as in training, unflipped."""
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = datamodule.datasets["train"]
    if not 0 <= index < len(dataset):
        raise ValueError(f"--index {index} is out of range: the training split has {len(dataset)} images")
    dataset.flip_prob = 0.0
    return collate([dataset[index]])


# ---------------------------------------------------------------------------- printing
def shape(t: Tensor | tuple) -> str:
    """``(1, 3, 256, 341)``; ``()`` for a scalar."""
    dims = tuple(t.shape) if isinstance(t, Tensor) else tuple(t)
    return "(" + ", ".join(str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"


class Report:
    """Collects ``stage | shape | description`` lines and prints them aligned."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def title(self, text: str) -> None:
        self.lines += ["", text, "-" * len(text)]

    def note(self, text: str) -> None:
        self.lines.append(text)

    def row(self, stage: str, tensor: Tensor | tuple, description: str) -> None:
        self.lines.append(f"  {stage:<24} {shape(tensor):<22} {description}")

    def more(self, description: str) -> None:
        """A further line of the last row's description."""
        self.lines.append(" " * 50 + description)

    def __str__(self) -> str:
        return "\n".join(self.lines)


def counts(labels: Tensor) -> str:
    """``12 positive, 244 negative, 4994 ignored`` for anchor labels ``(A,)`` in {1, 0, -1}."""
    return f"{int((labels == 1).sum())} positive, {int((labels == 0).sum())} negative, {int((labels == -1).sum())} ignored (-1)"


# ---------------------------------------------------------------------------- the two modes
def shared_stages(report: Report, model: FasterRCNN, batch: DetectionBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Image -> trunk -> RPN head -> anchors, as in both modes.

    Returns features ``(1, C, h, w)``, logits ``(1, A, 2)``, deltas ``(1, A, 4)``, anchors ``(A, 4)``.
    """
    images = batch.images
    (height, width), (orig_h, orig_w) = batch.image_sizes[0], batch.original_sizes[0]
    report.row("input image", images, f"N=1 image (batch size 1), resized from {orig_h}x{orig_w} to H x W = {height}x{width}, normalised")
    features, logits, deltas, anchors = model.rpn_forward(images)
    c, h, w = features.shape[1:]
    s, k = model.stride, model.anchor_generator.num_anchors
    report.row(
        "feature map", features, f"trunk output: C={c} channels, stride {s}: h = {height}/{s} = {height / s:g} -> {h}, w = {width}/{s} = {width / s:g} -> {w}"
    )
    mid = torch.relu(model.rpn.conv(features))
    report.row("RPN 3x3 conv", mid, "the RPN's sliding window over the feature map")
    report.row("RPN score conv", model.rpn.score(mid), f"1x1 conv: 2 scores x k={k} anchors per cell = {2 * k} channels")
    report.row("RPN scores", logits, f"(N, A, 2), A = h*w*k = {h}*{w}*{k} = {h * w * k}: (background, object) logits per anchor")
    report.row("RPN deltas", deltas, f"(N, A, 4): (dx, dy, dw, dh) per anchor, from a 1x1 conv with 4k = {4 * k} channels")
    gen = model.anchor_generator
    sides = sorted({round(gen.base_size * sc) for sc in gen.scales})
    ratios = ", ".join(f"{r:g}" for r in gen.ratios)
    report.row(
        "anchors",
        anchors,
        f"(A, 4) x1y1x2y2: k = {len(gen.scales)} scales x {len(gen.ratios)} ratios at each of the h*w cells (sides {sides} px, ratios [{ratios}])",
    )
    return features, logits, deltas, anchors


def training_mode(report: Report, model: FasterRCNN, batch: DetectionBatch) -> None:
    """The stages of ``FasterRCNN.losses``, one by one."""
    model.train()
    report.title("Training mode (model.train(), FasterRCNN.losses)")
    gt_boxes, gt_labels = (x[0] for x in training_targets(batch))
    size, orig = batch.image_sizes[0], batch.original_sizes[0]
    features, logits, deltas, anchors = shared_stages(report, model, batch)
    report.row("ground-truth boxes", gt_boxes, f"(G, 4) non-difficult objects in input pixels, labels {shape(gt_labels)} in 1..K")

    atc = model.anchor_target_creator
    rpn_labels, rpn_targets = atc(anchors, gt_boxes, size)
    report.row(
        "RPN labels", rpn_labels, f"AnchorTargetCreator: {counts(rpn_labels)}; {atc.n_sample} sampled, at most {int(atc.n_sample * atc.pos_ratio)} positive"
    )
    report.row("RPN targets", rpn_targets, "(A, 4) deltas from each anchor to its ground truth, non-zero for positives only")

    pc = model.proposal_creator
    proposals = model.proposals(logits, deltas, anchors, [size], [orig], training=True)[0]
    report.row(
        "proposals",
        proposals,
        f"ProposalCreator, training counts: decode, clip, drop < {pc.min_size:g} px, "
        f"top {pc.n_pre_nms['training']} -> NMS {pc.nms_thresh} -> at most {pc.n_post_nms['training']}",
    )

    ptc = model.proposal_target_creator
    rois, roi_labels, roi_targets = ptc(proposals, gt_boxes, gt_labels)
    fg, bg = int((roi_labels >= 1).sum()), int((roi_labels == 0).sum())
    report.row(
        "sampled RoIs",
        rois,
        f"ProposalTargetCreator: {ptc.n_sample} of the proposals + the {gt_boxes.shape[0]} ground-truth boxes, "
        f"{fg} foreground (at most {int(ptc.n_sample * ptc.pos_ratio)}, IoU >= {ptc.pos_iou_thresh}), {bg} background",
    )
    report.row("RoI labels", roi_labels, "0 background, 1..K the class of the matched ground truth (-1: filler, ignored)")
    report.row("RoI targets", roi_targets, f"(R, 4) deltas to the matched ground truth / std {tuple(model.roi_box_coder.std)}, foreground only")
    head_stages(report, model, features, rois)

    losses = model.losses(batch.images, batch.image_sizes, batch.original_sizes, [gt_boxes], [gt_labels])
    values = ", ".join(f"{key} {float(losses[key]):.3f}" for key in ("rpn_cls", "rpn_loc", "roi_cls", "roi_loc", "loss"))
    report.row("losses", losses["loss"], f"scalars (a new sampling of the same image): {values}")


def head_stages(report: Report, model: FasterRCNN, features: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
    """RoI pooling -> the backbone's head -> classifier and box regressor, as ``RoIHead``.

    Returns cls_logits ``(R, K+1)`` and deltas ``(R, K+1, 4)``.
    """
    head = model.roi_head
    kp1 = model.num_classes + 1
    batch_index = torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
    pooled = head.pool(features, rois, batch_index)
    r, c, s = pooled.shape[0], pooled.shape[1], pooled.shape[-1]
    report.row("RoI pool", pooled, f"(R, C, {s}, {s}): {head.pooling} of each RoI at spatial scale 1/{round(1 / head.spatial_scale)} with its batch index")
    x = head.head(pooled)
    report.row("head features", x, f"(R, D): the backbone's per-RoI head ({c}*{s}*{s} -> D={x.shape[1]})")
    cls_logits = head.cls_score(x)
    report.row("class scores", cls_logits, f"(R, K+1), K+1 = {model.num_classes} classes + background = {kp1}")
    raw = head.bbox_pred(x)
    report.row(
        "class-specific deltas",
        raw,
        f"(R, 4(K+1)) = 4*{kp1} = {4 * kp1}: one (dx, dy, dw, dh) per class, so each class refines the RoI its own way;",
    )
    report.more("the loss takes the 4 of the RoI's true class (the background's 4 are never trained),")
    report.more(f"prediction decodes one box per class: viewed as (R, K+1, 4) = ({r}, {kp1}, 4)")
    return cls_logits, raw.view(r, kp1, 4)


def test_mode(report: Report, model: FasterRCNN, batch: DetectionBatch) -> None:
    """The stages of ``FasterRCNN.predict``, one by one, then predict itself for the detections."""
    model.eval()
    report.title("Test mode (model.eval(), FasterRCNN.predict)")
    size, orig = batch.image_sizes[0], batch.original_sizes[0]
    features, logits, deltas, anchors = shared_stages(report, model, batch)
    pc = model.proposal_creator
    proposals = model.proposals(logits, deltas, anchors, [size], [orig], training=False)[0]
    report.row(
        "proposals",
        proposals,
        f"ProposalCreator, testing counts: top {pc.n_pre_nms['testing']} -> NMS {pc.nms_thresh} -> at most {pc.n_post_nms['testing']}; all go to the head",
    )
    cls_logits, roi_deltas = head_stages(report, model, features, proposals)
    probs = cls_logits.softmax(dim=-1)
    boxes = model.roi_box_coder.decode(proposals[:, None, :], roi_deltas)
    report.row("class probabilities", probs, "softmax over the K+1 scores")
    report.row("class-specific boxes", boxes, "(R, K+1, 4): each RoI decoded with the deltas of every class")
    k = model.num_classes
    kept = int((probs[:, 1:] > model.score_thresh).sum())
    report.row("candidates", (probs.shape[0] * k,), f"R*K (background dropped); {kept} above score_thresh {model.score_thresh}")
    det = model.predict(batch.images, batch.image_sizes, batch.original_sizes)[0]
    where = f"after per-class NMS {model.nms_thresh}, in original image pixels ({orig[0]}x{orig[1]})"
    report.row("final boxes", det["boxes"], f"(D, 4) {where}")
    report.row("final labels", det["labels"], "(D,) in 1..K")
    report.row("final scores", det["scores"], "(D,) class probabilities, decreasing")


# ---------------------------------------------------------------------------- entry point
def header(cfg: DictConfig, model: FasterRCNN, batch: DetectionBatch, seed: int) -> str:
    """What is being inspected."""
    choices = cfg.hydra.runtime.choices
    classes = ", ".join(cfg.data.classes)
    params = sum(p.numel() for p in model.parameters())
    gen = model.anchor_generator
    return (
        f"Faster R-CNN shapes: data={choices.data} ({cfg.data.name}, image {batch.image_ids[0]}), backbone={choices.backbone}, "
        f"anchor={choices.anchor}, sampler={choices.sampler}, seed {seed}\n"
        f"K = {model.num_classes} classes ({classes}); k = {gen.num_anchors} anchors per location; stride {model.stride}; "
        f"{params / 1e6:.2f} M parameters, UNTRAINED (random init, backbone.pretrained=false): shapes are real, scores are not."
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--index", type=int, default=0, help="which training image (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the sampling (default 0)")
    args, overrides = parse_script_args(parser, argv)
    return args, overrides


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    try:
        cfg = build.compose_config(overrides, ROOT / "outputs" / "inspect_shapes", return_hydra_config=True, pretrained=False)
        batch = load_batch(cfg, args.index)
        torch.manual_seed(args.seed)
        model = build_model(model_config(cfg))
    except (HydraException, OmegaConfBaseException, DatasetError, ValueError) as err:
        sys.exit(f"error: {err}")
    report = Report()
    report.note(header(cfg, model, batch, args.seed))
    with torch.no_grad():
        torch.manual_seed(args.seed)
        training_mode(report, model, batch)
        test_mode(report, model, batch)
    print(report)


if __name__ == "__main__":
    main()
