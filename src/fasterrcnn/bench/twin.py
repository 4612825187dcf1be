"""torchvision's ``FasterRCNN`` configured as ours and sharing our weights: the bench's contender.

:func:`torchvision_twin` gives torchvision's detector deep copies of our trunk (as its
``backbone``), our RPN head (behind torchvision's RPN head interface), our RoI head's layers (its
``box_head``) and classifier and regressor (its ``box_predictor``); our base anchors and stride;
the config's sampler counts and thresholds; torchvision's RoI pooling op with our settings
(``roi_pool`` or ``roi_align``); the RoI coder's weights; and an identity transform in place of its resizing and normalisation (the
DataModule did both). :func:`check_anchors` and :func:`inference_difference` check that the two
agree. What still differs is hard-coded in torchvision: :data:`DIFFERENCES`.

Shape legend: N images, (H, W) input size, (h, w) feature size, k anchors per location,
A = h*w*k anchors, R RoIs over the batch, S x S pooled size.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import roi_align, roi_pool

from fasterrcnn.heads import RoIHead, RPNHead
from fasterrcnn.model import FasterRCNN

# What still differs between the two once configured identically (torchvision hard-codes these).
DIFFERENCES = [
    "torchvision labels every anchor for the RPN; ours (the paper) ignores anchors crossing the image border",
    "torchvision keeps the top pre-NMS proposals before dropping small boxes; ours drops small boxes first",
    "torchvision's RoI box loss is smooth L1 with beta 1/9; ours uses the config's roi_sigma (1: beta 1)",
    (
        "torchvision's RPN objectness is one logit per anchor: it gets our 2-way scores as a logit difference "
        "(sigmoid(l1 - l0) = softmax(l0, l1)[1]), so the layers and weights are ours"
    ),
]


class IdentityTransform(nn.Module):
    """GeneralizedRCNNTransform without resizing or normalising: the images arrive as ours do."""

    def forward(self, images: list[Tensor], targets=None):
        tensors = images[0][None] if len(images) == 1 else torch.stack(images)
        return ImageList(tensors, [tuple(img.shape[-2:]) for img in images]), targets

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


class Trunk(nn.Module):
    """Our trunk as torchvision's backbone (``out_channels``), optionally channels-last."""

    def __init__(self, trunk: nn.Module, out_channels: int, channels_last: bool) -> None:
        super().__init__()
        self.body = trunk
        self.out_channels = out_channels
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.body(x)


class SoftmaxRPNHead(nn.Module):
    """Our :class:`~fasterrcnn.heads.RPNHead` behind torchvision's RPNHead interface.

    Ours gives ``(N, A, 2)`` logits and ``(N, A, 4)`` deltas, location-major (A = h*w*k);
    torchvision wants per feature map objectness ``(N, k, h, w)``, one logit per anchor, and
    deltas ``(N, 4k, h, w)``: the logit difference ``l1 - l0`` (its sigmoid is our softmax
    foreground probability) and the deltas, as views in those layouts."""

    def __init__(self, rpn: RPNHead) -> None:
        super().__init__()
        self.rpn = copy.deepcopy(rpn)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        objectness, deltas = [], []
        for x in features:
            (n, _, h, w) = x.shape
            logits, loc = self.rpn(x)  # (N, A, 2), (N, A, 4)
            fg = (logits[..., 1] - logits[..., 0]).view(n, h, w, -1)  # (N, h, w, k)
            objectness.append(fg.permute(0, 3, 1, 2))  # (N, k, h, w)
            deltas.append(loc.reshape(n, h, w, -1).permute(0, 3, 1, 2))  # (N, 4k, h, w)
        return objectness, deltas


class FixedStrideAnchorGenerator(TVAnchorGenerator):
    """torchvision's anchor generator with our base anchors and stride: its ``grid_anchors``
    places cell anchors at ``j * stride``, ours at ``(j + 0.5) * stride``, so the cell anchors
    are shifted by half a stride; the stride is fixed instead of ``image_size // feature_size``
    (which is 15, not 16, for a 300 px image and a 19-cell feature map)."""

    def __init__(self, base: Tensor, stride: int) -> None:
        super().__init__(sizes=((1,),), aspect_ratios=((1.0,),))
        self.cell_anchors = [base.clone() + stride / 2]
        self.stride = stride

    def num_anchors_per_location(self) -> list[int]:
        return [self.cell_anchors[0].shape[0]]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        device = feature_maps[0].device
        self.set_cell_anchors(torch.float32, device)
        stride = torch.tensor(self.stride, dtype=torch.int64, device=device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, [[stride, stride]] * len(grid_sizes)))
        return [anchors for _ in image_list.image_sizes]


class RoIPooler(nn.Module):
    """torchvision's ``roi_pool`` or ``roi_align`` with our RoI head's settings, behind its
    ``box_roi_pool`` interface (one feature map). torchvision's ops, not ours, so that a faster
    pooling of ours shows in the comparison."""

    def __init__(self, roi_head: RoIHead) -> None:
        super().__init__()
        self.pooling, self.size, self.scale = roi_head.pooling, roi_head.roi_size, roi_head.spatial_scale
        self.sampling_ratio, self.aligned = roi_head.sampling_ratio, roi_head.aligned

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes) -> Tensor:
        x = features["0"]
        if x.dtype in (torch.float16, torch.bfloat16):
            # as ours: torchvision's CPU RoI kernels take no bf16 (and under autocast its RPN
            # hands over bf16 proposals, which its own MultiScaleRoIAlign would reject too)
            x = x.float()
            proposals = [p.float() for p in proposals]
        if self.pooling == "roi_pool":
            return roi_pool(x, proposals, self.size, self.scale)  # (R, C, S, S)
        return roi_align(x, proposals, self.size, self.scale, self.sampling_ratio, self.aligned)


def _copy(module: nn.Module, compiled: bool) -> nn.Module:
    """A deep copy of ``module``; without ``compiled``, its layers run eagerly even where ours
    are compiled (``model.compile``; a deep copy of a compiled module compiles again)."""
    twin = copy.deepcopy(module)
    if not compiled:
        for m in twin.modules():
            m._compiled_call_impl = None  # what nn.Module.compile() set; None is its eager default
    return twin


def torchvision_twin(model: FasterRCNN, channels_last: bool = False, compiled: bool = False) -> TVFasterRCNN:
    """torchvision's FasterRCNN with ``model``'s weights, anchors, sampler and thresholds
    (deep copies: training one does not change the other). ``channels_last`` and ``compiled``:
    our memory layout, and our ``torch.compile`` of the trunk and heads where ``model`` has it."""
    pc, atc, ptc = model.proposal_creator, model.anchor_target_creator, model.proposal_target_creator
    if ptc.neg_iou_thresh_lo != 0.0:
        raise ValueError(
            "torchvision's RoI sampler has no lower background threshold; "
            f"sampler.proposal_target.neg_iou_thresh_lo={ptc.neg_iou_thresh_lo} cannot be matched"
        )
    head = model.roi_head
    predictor = FastRCNNPredictor(head.cls_score.in_features, model.num_classes + 1)
    predictor.cls_score.load_state_dict(head.cls_score.state_dict())
    predictor.bbox_pred.load_state_dict(head.bbox_pred.state_dict())
    tv = TVFasterRCNN(
        Trunk(_copy(model.trunk, compiled), model.rpn.conv.in_channels, channels_last),
        num_classes=None,
        min_size=1,
        max_size=1,
        image_mean=[0.0] * 3,
        image_std=[1.0] * 3,
        rpn_anchor_generator=FixedStrideAnchorGenerator(model.anchor_generator.base, model.anchor_generator.stride),
        rpn_head=SoftmaxRPNHead(_copy(model.rpn, compiled)),
        rpn_pre_nms_top_n_train=pc.n_pre_nms["training"],
        rpn_pre_nms_top_n_test=pc.n_pre_nms["testing"],
        rpn_post_nms_top_n_train=pc.n_post_nms["training"],
        rpn_post_nms_top_n_test=pc.n_post_nms["testing"],
        rpn_nms_thresh=pc.nms_thresh,
        rpn_fg_iou_thresh=atc.pos_iou_thresh,
        rpn_bg_iou_thresh=atc.neg_iou_thresh,
        rpn_batch_size_per_image=atc.n_sample,
        rpn_positive_fraction=atc.pos_ratio,
        box_head=_copy(head.head, compiled),
        box_predictor=predictor,
        box_score_thresh=model.score_thresh,
        box_nms_thresh=model.nms_thresh,
        box_detections_per_img=model.max_detections or 1_000_000,
        box_fg_iou_thresh=ptc.pos_iou_thresh,
        box_bg_iou_thresh=ptc.neg_iou_thresh_hi,
        box_batch_size_per_image=ptc.n_sample,
        box_positive_fraction=ptc.pos_ratio,
        bbox_reg_weights=tuple(1.0 / s for s in model.roi_box_coder.std),
    )
    tv.transform = IdentityTransform()
    tv.roi_heads.box_roi_pool = RoIPooler(head)  # the constructor accepts only MultiScaleRoIAlign
    tv.rpn.min_size = pc.min_size  # torchvision hard-codes 1e-3; the bench feeds original-size images
    tv.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return tv


def check_anchors(model: FasterRCNN, tv: TVFasterRCNN, images: Tensor) -> float:
    """Largest difference between our anchors and torchvision's for ``images (N, 3, H, W)``;
    raises above 1e-3 px."""
    with torch.no_grad():
        features, _, _, ours = model.rpn_forward(images)
    theirs = tv.rpn.anchor_generator(ImageList(images, [tuple(images.shape[-2:])]), [features])[0]
    if ours.shape != theirs.shape:
        raise RuntimeError(f"anchor counts differ: ours {tuple(ours.shape)}, torchvision {tuple(theirs.shape)}")
    diff = float((ours - theirs).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"torchvision's anchors differ from ours by up to {diff:.4f} px")
    return diff


def _rows_sorted(boxes: Tensor) -> Tensor:
    """``boxes (R, 4)`` in lexicographic row order (a stable sort per column, last column first)."""
    for column in reversed(range(boxes.shape[1])):
        boxes = boxes[boxes[:, column].argsort(stable=True)]
    return boxes


@torch.no_grad()
def inference_difference(model: FasterRCNN, tv: TVFasterRCNN, images: Tensor) -> dict[str, float | bool]:
    """Our test-time proposals and detections against torchvision's on ``images (N, 3, H, W)``
    (at their input size), both in eval mode.

    Returns ``same_counts`` (each image has as many proposals and as many detections in both),
    our ``proposals`` and ``detections`` counts and, when the counts agree, the largest absolute
    differences ``proposals_px``, ``boxes_px``, ``scores`` and the number of detections whose
    labels differ, ``labels_differ``. Equal up to float rounding unless one of
    :data:`DIFFERENCES` applies (more anchors than the pre-NMS count, with boxes below
    ``min_size`` among them)."""
    model.eval()
    tv.eval()
    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    ours = model.predict(images, sizes, sizes, return_proposals=True)
    captured: list[list[Tensor]] = []
    hook = tv.rpn.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        theirs = tv(list(images))
    finally:
        hook.remove()
    proposals = captured[0]
    same = all(o["proposals"].shape == p.shape and o["boxes"].shape == t["boxes"].shape for o, p, t in zip(ours, proposals, theirs))
    out: dict[str, float | bool] = {
        "same_counts": same,
        "proposals": sum(o["proposals"].shape[0] for o in ours),
        "detections": sum(o["boxes"].shape[0] for o in ours),
    }
    if same:

        def largest(diffs: list[Tensor]) -> float:
            return max((float(d.abs().max()) for d in diffs if d.numel()), default=0.0)

        # as sets: proposals of equal scores (an untrained RPN gives many, among small boxes
        # most) may come in either order; the detections, which depend on the set, must be equal
        out["proposals_px"] = largest([_rows_sorted(o["proposals"]) - _rows_sorted(p) for o, p in zip(ours, proposals)])
        out["boxes_px"] = largest([o["boxes"] - t["boxes"] for o, t in zip(ours, theirs)])
        out["scores"] = largest([o["scores"] - t["scores"] for o, t in zip(ours, theirs)])
        out["labels_differ"] = sum(int((o["labels"] != t["labels"]).sum()) for o, t in zip(ours, theirs))
    return out
