"""The tensor shape at each stage of Faster R-CNN (``scripts/inspect_shapes.py``).

The detector of the composed config, with untrained weights, runs one :meth:`FasterRCNN.trace`
on one training image (resized and normalised with the model's preprocessing, not flipped):
with the image's non-difficult ground truth, so the training branch runs (the targets, sampled
RoIs and losses of :meth:`FasterRCNN.losses`), and ``detect=True``, so the test branch runs too
(the proposals and detections of :meth:`FasterRCNN.predict`), as validation does. Every row is
a tensor the trace keeps, except those marked ``*``: the RPN's inner 3x3 and 1x1 convs, the
pooled RoIs and the head's features live only inside the heads, so their shapes are given from
the layers' sizes. Counts that depend on the weights (proposals, detections) are those of an
untrained network; the shapes are the ones a trained model has.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import Tensor

from fasterrcnn.analysis.inputs import item_at, load_split
from fasterrcnn.build import build_model, model_config
from fasterrcnn.data import collate
from fasterrcnn.lit import training_targets
from fasterrcnn.model import LOSS_KEYS, FasterRCNN, Trace

DERIVED = " *"  # after a stage name: not kept by the trace, the shape follows from the layers


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
    """``12 positive, 244 negative, 4994 ignored`` for anchor labels in {1, 0, -1}."""
    return f"{int((labels == 1).sum())} positive, {int((labels == 0).sum())} negative, {int((labels == -1).sum())} ignored (-1)"


# ---------------------------------------------------------------------------- the stages
def shared_rows(report: Report, model: FasterRCNN, trace: Trace, images: Tensor) -> None:
    """Image -> trunk -> RPN head -> anchors, which both branches share."""
    (height, width), (orig_h, orig_w) = trace.image_sizes[0], trace.original_sizes[0]
    n, c, h, w = trace.features.shape
    s, k = model.stride, model.anchor_generator.num_anchors
    report.row("input image", images, f"N=1 image (batch size 1), resized from {orig_h}x{orig_w} to H x W = {height}x{width}, normalised")
    report.row(
        "feature map", trace.features, f"trunk output: C={c} channels, stride {s}: h = {height}/{s} = {height / s:g} -> {h}, w = {width}/{s} = {width / s:g} -> {w}"
    )
    report.row("RPN 3x3 conv" + DERIVED, (n, model.rpn.conv.out_channels, h, w), "the RPN's sliding window over the feature map (padding 1: h x w kept)")
    report.row("RPN score conv" + DERIVED, (n, 2 * k, h, w), f"1x1 conv: 2 scores x k={k} anchors per cell = {2 * k} channels")
    report.row("RPN scores", trace.objectness, f"(N, A, 2), A = h*w*k = {h}*{w}*{k} = {h * w * k}: (background, object) logits per anchor")
    report.row("RPN deltas", trace.rpn_deltas, f"(N, A, 4): (dx, dy, dw, dh) per anchor, from a 1x1 conv with 4k = {4 * k} channels")
    gen = model.anchor_generator
    sides = sorted({round(gen.base_size * sc) for sc in gen.scales})
    ratios = ", ".join(f"{r:g}" for r in gen.ratios)
    report.row(
        "anchors",
        trace.anchors,
        f"(A, 4) x1y1x2y2: k = {len(gen.scales)} scales x {len(gen.ratios)} ratios at each of the h*w cells (sides {sides} px, ratios [{ratios}])",
    )


def head_rows(report: Report, model: FasterRCNN, trace: Trace, rois: Tensor, class_logits: Tensor, box_deltas: Tensor) -> None:
    """RoI pooling -> the backbone's head -> classifier and box regressor (:class:`RoIHead`)."""
    head = model.roi_head
    kp1 = model.num_classes + 1
    r, c, s = rois.shape[0], trace.features.shape[1], head.roi_size
    d = head.cls_score.in_features
    report.row("RoI pool" + DERIVED, (r, c, s, s), f"(R, C, {s}, {s}): {head.pooling} of each RoI at spatial scale 1/{round(1 / head.spatial_scale)} with its batch index")
    report.row("head features" + DERIVED, (r, d), f"(R, D): the backbone's per-RoI head ({c}*{s}*{s} -> D={d})")
    report.row("class scores", class_logits, f"(R, K+1), K+1 = {model.num_classes} classes + background = {kp1}")
    report.row(
        "class-specific deltas",
        box_deltas.flatten(1),
        f"(R, 4(K+1)) = 4*{kp1} = {4 * kp1}: one (dx, dy, dw, dh) per class, so each class refines the RoI its own way;",
    )
    report.more("the loss takes the 4 of the RoI's true class (the background's 4 are never trained),")
    report.more(f"prediction decodes one box per class: viewed as (R, K+1, 4) = {shape(box_deltas)}")


def training_rows(report: Report, model: FasterRCNN, trace: Trace, gt_boxes: Tensor, gt_labels: Tensor) -> None:
    """:attr:`Trace.training`: what :meth:`FasterRCNN.losses` computes."""
    t = trace.training
    assert t is not None
    report.row("ground-truth boxes", gt_boxes, f"(G, 4) non-difficult objects in input pixels, labels {shape(gt_labels)} in 1..K")
    atc = model.anchor_target_creator
    report.row(
        "RPN labels",
        t.anchor_labels,
        f"(N, A) AnchorTargetCreator: {counts(t.anchor_labels)}; {atc.n_sample} sampled, at most {int(atc.n_sample * atc.pos_ratio)} positive",
    )
    report.row("RPN targets", t.anchor_targets, "(N, A, 4) deltas from each anchor to its ground truth, non-zero for positives only")
    pc = model.proposal_creator
    report.row(
        "proposals",
        t.proposals[0],
        f"ProposalCreator, training counts: decode, clip, drop < {pc.min_size:g} px, "
        f"top {pc.n_pre_nms['training']} -> NMS {pc.nms_thresh} -> at most {pc.n_post_nms['training']}",
    )
    ptc = model.proposal_target_creator
    fg, bg = int((t.roi_labels >= 1).sum()), int((t.roi_labels == 0).sum())
    report.row(
        "sampled RoIs",
        t.rois,
        f"ProposalTargetCreator: {ptc.n_sample} of the proposals + the {gt_boxes.shape[0]} ground-truth boxes, "
        f"{fg} foreground (at most {int(ptc.n_sample * ptc.pos_ratio)}, IoU >= {ptc.pos_iou_thresh}), {bg} background",
    )
    report.row("RoI labels", t.roi_labels, "0 background, 1..K the class of the matched ground truth (-1: filler, ignored)")
    report.row("RoI targets", t.roi_targets, f"(R, 4) deltas to the matched ground truth / std {tuple(model.roi_box_coder.std)}, foreground only")
    head_rows(report, model, trace, t.rois, t.class_logits, t.box_deltas)
    values = ", ".join(f"{key} {float(t.losses[key]):.3f}" for key in LOSS_KEYS)
    report.row("losses", t.losses["loss"], f"scalars of this sampling: {values}")


def testing_rows(report: Report, model: FasterRCNN, trace: Trace) -> None:
    """:attr:`Trace.testing`: what :meth:`FasterRCNN.predict` computes."""
    t = trace.testing
    assert t is not None
    pc = model.proposal_creator
    report.row(
        "proposals",
        t.proposals[0],
        f"ProposalCreator, testing counts: top {pc.n_pre_nms['testing']} -> NMS {pc.nms_thresh} -> at most {pc.n_post_nms['testing']}; all go to the head",
    )
    head_rows(report, model, trace, t.rois, t.class_logits, t.box_deltas)
    report.row("class probabilities", t.class_probs, "softmax over the K+1 scores")
    report.row("class-specific boxes", t.boxes, "(R, K+1, 4): each RoI decoded with the deltas of every class")
    kept = int((t.class_probs[:, 1:] > model.score_thresh).sum())
    report.row("candidates", (t.class_probs.shape[0] * model.num_classes,), f"R*K (background dropped); {kept} above score_thresh {model.score_thresh}")
    det, orig = t.detections[0], trace.original_sizes[0]
    report.row("final boxes", det["boxes"], f"(D, 4) after per-class NMS {model.nms_thresh}, in original image pixels ({orig[0]}x{orig[1]})")
    report.row("final labels", det["labels"], "(D,) in 1..K")
    report.row("final scores", det["scores"], "(D,) class probabilities, decreasing")


# ---------------------------------------------------------------------------- entry point
def header(cfg: DictConfig, model: FasterRCNN, image_id: str, seed: int) -> str:
    """What is being inspected."""
    choices = cfg.hydra.runtime.choices
    classes = ", ".join(cfg.data.classes)
    params = sum(p.numel() for p in model.parameters())
    gen = model.anchor_generator
    return (
        f"Faster R-CNN shapes: data={choices.data} ({cfg.data.name}, image {image_id}), backbone={choices.backbone}, "
        f"anchor={choices.anchor}, sampler={choices.sampler}, seed {seed}\n"
        f"K = {model.num_classes} classes ({classes}); k = {gen.num_anchors} anchors per location; stride {model.stride}; "
        f"{params / 1e6:.2f} M parameters, UNTRAINED (random init, backbone.pretrained=false): shapes are real, scores are not.\n"
        f"One FasterRCNN.trace (model.eval()) with the ground truth and detect=True, as validation runs it; "
        f"rows marked{DERIVED} live inside the heads, not in the trace: their shapes follow from the layers."
    )


def shapes_report(cfg: DictConfig, index: int = 0, seed: int = 0) -> str:
    """The shape report of training image ``index`` under ``cfg`` (composed with
    ``return_hydra_config=True``), weights and sampling seeded with ``seed``.

    Raises:
        DatasetError, ValueError: bad data, or ``index`` out of range.
    """
    torch.manual_seed(seed)  # the untrained weights
    model = build_model(model_config(cfg), pretrained=False).eval()
    batch = collate([item_at(load_split(cfg, "train", model.preprocess), index)])
    gt_boxes, gt_labels = training_targets(batch)
    with torch.no_grad():
        torch.manual_seed(seed)  # the samplers draw at random
        trace = model.trace(batch.images, batch.image_sizes, batch.original_sizes, gt_boxes, gt_labels, detect=True)
    report = Report()
    report.note(header(cfg, model, batch.image_ids[0], seed))
    report.title("Shared stages (Trace: trunk, RPN head, anchors)")
    shared_rows(report, model, trace, batch.images)
    report.title("Training mode (Trace.training: the targets, sampled RoIs and losses of FasterRCNN.losses)")
    training_rows(report, model, trace, gt_boxes[0], gt_labels[0])
    report.title("Test mode (Trace.testing: the proposals, boxes and detections of FasterRCNN.predict)")
    testing_rows(report, model, trace)
    return str(report)
