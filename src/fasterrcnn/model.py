"""Faster R-CNN: backbone trunk -> RPN -> proposals -> RoI head.

Shape legend: N images, (H, W) padded input size, (h, w) feature size, k anchors per location,
A = h*w*k anchors, G_i ground-truth boxes of image i, R RoIs over the batch, K classes.

One traced forward, :meth:`FasterRCNN.trace`, runs the stages once and returns every
intermediate result in a :class:`Trace`; the two entry points are views of it, so validation
can compute both from one trunk pass and the tools (``scripts/explain.py``,
``scripts/inspect_shapes.py``, ``scripts/bench.py``, the dashboard panel) read the same code
path as training:

* :meth:`FasterRCNN.losses` -> the four losses of the paper (and their sum) plus sampling stats;
* :meth:`FasterRCNN.predict` -> detections per image in original image coordinates.

Images arrive resized and normalised (:func:`fasterrcnn.data.transforms.prepare`, with the
numbers of :attr:`FasterRCNN.preprocess`, which travel in the checkpoint); the model does no
resizing itself.

Each stage runs in a ``torch.profiler.record_function`` scope named after it (``backbone``,
``rpn_head``, ``anchors``, ``anchor_target_creator``, ``proposal_creator``,
``proposal_target_creator``, ``roi_pool``, ``roi_head_layers``, ``losses``, ``postprocess``), so
a profile (``scripts/bench.py``) says where the time goes; without a profiler each costs a few us.

Mixed precision: under ``torch.autocast`` (Lightning's ``trainer.precision=bf16-mixed``) the
convolutions and linear layers run in bf16; box decoding, proposal scores and the losses are
computed in fp32 (bf16 numbers between 256 and 512 lie 2 apart: too coarse for pixels).

On a GPU everything runs on the model's device (anchors are buffers, targets and sampling are
tensor ops). The training branch is meant to wait for the GPU only where a count depends on
the data, in ProposalCreator (the boxes left after dropping small ones; torchvision's CUDA NMS,
which ends on the host): ``tests/test_cuda.py`` lists every host sync of a training step, why
it is there, and checks the list (on the CPU by tracing the calls, on a GPU with
``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torchvision.ops import batched_nms, clip_boxes_to_image

from fasterrcnn.anchors import AnchorGenerator
from fasterrcnn.backbones import Backbone
from fasterrcnn.boxes import BoxCoder
from fasterrcnn.creators import AnchorTargetCreator, ProposalCreator, ProposalTargetCreator
from fasterrcnn.data.transforms import Preprocess
from fasterrcnn.heads import RoIHead, RPNHead
from fasterrcnn.losses import classification_loss, localisation_loss, select_class_deltas

Size = tuple[int, int]  # (height, width)

LOSS_KEYS = ("rpn_cls", "rpn_loc", "roi_cls", "roi_loc", "loss")


@dataclass
class TrainingStages:
    """The training branch of a :class:`Trace` (ground truth given), in input coordinates.

    ``anchor_labels (N, A)`` in {-1, 0, 1} and ``anchor_targets (N, A, 4)`` (AnchorTargetCreator);
    ``proposals``: N ``(R_i, 4)`` with the training counts (ProposalCreator); ``rois (R, 4)``,
    ``roi_batch_index (R,)``, ``roi_labels (R,)`` (-1 ignored, 0 background, 1..K) and
    ``roi_targets (R, 4)`` normalised deltas (ProposalTargetCreator and the RoI coder);
    ``class_logits (R, K+1)`` and ``box_deltas (R, K+1, 4)`` of the RoI head on those RoIs;
    ``losses``: ``rpn_cls, rpn_loc, roi_cls, roi_loc, loss`` and the detached counts
    ``num_pos_anchors, num_pos_rois`` (per image, averaged over the batch)."""

    anchor_labels: Tensor
    anchor_targets: Tensor
    proposals: list[Tensor]
    rois: Tensor
    roi_batch_index: Tensor
    roi_labels: Tensor
    roi_targets: Tensor
    class_logits: Tensor
    box_deltas: Tensor
    losses: dict[str, Tensor]


@dataclass
class TestStages:
    """The detection branch of a :class:`Trace`, with the testing counts.

    ``proposals``: N ``(R_i, 4)`` input-coordinate proposals by score (up to the requested
    ``num_proposals``; the head sees the first ``n_test_post_nms`` of each: ``rois (R, 4)``,
    ``roi_batch_index (R,)``); ``class_probs (R, K+1)``; ``boxes (R, K+1, 4)`` each RoI decoded
    with every class's deltas (input coordinates, before clipping); ``detections``: per image
    ``boxes (D, 4)`` in original image coordinates, ``scores (D,)``, ``labels (D,)`` in 1..K by
    decreasing score."""

    proposals: list[Tensor]
    rois: Tensor
    roi_batch_index: Tensor
    class_logits: Tensor
    box_deltas: Tensor
    class_probs: Tensor
    boxes: Tensor
    detections: list[dict[str, Tensor]]


@dataclass
class Trace:
    """Every stage of one forward of :class:`FasterRCNN` (:meth:`FasterRCNN.trace`).

    ``features (N, C, h, w)``, ``anchors (A, 4)``, ``objectness (N, A, 2)`` logits (index 1 is
    foreground) and ``rpn_deltas (N, A, 4)`` are shared; ``training`` is set when ground truth
    was given, ``testing`` when detections were asked for."""

    image_sizes: list[Size]
    original_sizes: list[Size]
    features: Tensor
    anchors: Tensor
    objectness: Tensor
    rpn_deltas: Tensor
    training: TrainingStages | None = None
    testing: TestStages | None = None


class _TrainingRoIs(NamedTuple):
    """The training branch before the RoI head (:meth:`FasterRCNN._training_rois`); the fields
    are :class:`TrainingStages`'."""

    anchor_labels: Tensor
    anchor_targets: Tensor
    proposals: list[Tensor]
    rois: Tensor
    batch_index: Tensor
    roi_labels: Tensor
    roi_targets: Tensor


class _TestRoIs(NamedTuple):
    """The detection branch before the RoI head (:meth:`FasterRCNN._test_rois`): every testing
    proposal, the head's ``rois (R, 4)`` and ``batch_index (R,)``, and each image's count of them."""

    proposals: list[Tensor]
    rois: Tensor
    batch_index: Tensor
    counts: list[int]


class FasterRCNN(nn.Module):
    """The detector. Every argument below is a config value (see ``conf/model``).

    Args:
        backbone: trunk, per-RoI head and their properties.
        num_classes: K, background excluded.
        anchor_generator: builds an :class:`AnchorGenerator` given the backbone's ``stride``.
        anchor_target_creator, proposal_creator, proposal_target_creator: the paper's rules.
        roi_box_coder: codes the RoI head's class-specific deltas (the paper's recipe
            normalises them by std ``(0.1, 0.1, 0.2, 0.2)``): targets in training, boxes at
            prediction. The RPN's deltas are unnormalised (:class:`BoxCoder` defaults).
        preprocess: the image rescaling and normalisation the weights expect
            (:class:`fasterrcnn.data.transforms.Preprocess`); stored in checkpoints so that a
            checkpoint alone can predict.
        rpn_mid_channels: channels of the RPN's 3x3 conv (512 for VGG16); None = trunk channels.
        roi_pooling: ``"roi_pool"`` (paper) or ``"roi_align"``.
        rpn_sigma, roi_sigma: smooth L1 sigmas (3 and 1 in the reference).
        focal_gamma, focal_alpha: focal loss for both classification losses (0 / None: plain
            cross-entropy, the paper).
        nms_thresh: per-class NMS IoU threshold at prediction (0.3).
        score_thresh: detections below this class probability are dropped (0.05 to evaluate,
            0.7 to visualise).
        max_detections: keep at most this many detections per image (None: all, as the reference).
        channels_last: keep the convolutions' weights and inputs in the channels-last (NHWC)
            memory layout, which oneDNN runs faster on CPU (and cuDNN's tensor-core kernels
            expect on GPUs); results agree to float rounding.
        compile: ``torch.compile`` the trunk, the RPN head and the RoI head's layers in place
            (``nn.Module.compile``: the state dict keeps its keys, so checkpoints load either
            way); the box, sampling and NMS code between them stays eager (data-dependent
            shapes). Off by default: the first steps of each new input size pay for compiling.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        anchor_generator: Callable[..., AnchorGenerator],
        anchor_target_creator: AnchorTargetCreator,
        proposal_creator: ProposalCreator,
        proposal_target_creator: ProposalTargetCreator,
        roi_box_coder: BoxCoder | None = None,
        preprocess: Preprocess | Mapping | None = None,
        rpn_mid_channels: int | None = 512,
        roi_pooling: str = "roi_pool",
        rpn_sigma: float = 3.0,
        roi_sigma: float = 1.0,
        focal_gamma: float = 0.0,
        focal_alpha: float | None = None,
        nms_thresh: float = 0.3,
        score_thresh: float = 0.05,
        max_detections: int | None = None,
        channels_last: bool = False,
        compile: bool = False,  # noqa: A002 (the config key is model.compile)
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.trunk = backbone.trunk
        self.stride = backbone.stride
        self.anchor_generator = anchor_generator(stride=backbone.stride)
        self.rpn = RPNHead(backbone.out_channels, self.anchor_generator.num_anchors, rpn_mid_channels or backbone.out_channels)
        self.roi_head = RoIHead(
            backbone.head,
            backbone.head_out_features,
            num_classes,
            roi_size=backbone.roi_size,
            spatial_scale=1.0 / backbone.stride,
            pooling=roi_pooling,
            box_coder=roi_box_coder,
        )
        if preprocess is None:
            preprocess = Preprocess(mean=tuple(backbone.mean), std=tuple(backbone.std))  # type: ignore[arg-type]
        elif not isinstance(preprocess, Preprocess):  # a config node (Hydra passes dataclasses on as configs)
            preprocess = Preprocess.from_dict(preprocess)
        self.preprocess = preprocess
        self.anchor_target_creator = anchor_target_creator
        self.proposal_creator = proposal_creator
        self.proposal_target_creator = proposal_target_creator
        self.rpn_sigma = rpn_sigma
        self.roi_sigma = roi_sigma
        self.focal_gamma = focal_gamma
        self.focal_alpha = focal_alpha
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.max_detections = max_detections
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)  # 4-d weights only; Module.to(device) keeps it
        self.compiled = bool(compile)  # not self.compile: that is nn.Module's method
        if compile:
            for module in (self.trunk, self.rpn, self.roi_head.head):
                module.compile()  # lazily, at the first call; follows the module to its device

    @property
    def roi_box_coder(self) -> BoxCoder:
        return self.roi_head.box_coder

    # ------------------------------------------------------------------ the traced forward
    def trace(
        self,
        images: Tensor,
        image_sizes: Sequence[Size],
        original_sizes: Sequence[Size],
        gt_boxes: Sequence[Tensor] | None = None,
        gt_labels: Sequence[Tensor] | None = None,
        detect: bool = False,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        num_proposals: int | None = None,
    ) -> Trace:
        """Run the detector once and keep every stage.

        Args:
            images: ``(N, 3, H, W)`` normalised, zero-padded.
            image_sizes: ``(h, w)`` of each image before padding; original_sizes: before resizing.
            gt_boxes, gt_labels: N ``(G_i, 4)`` boxes in input coordinates and ``(G_i,)`` labels
                in 1..K: when given, the training branch (targets, sampled RoIs, losses) runs.
            detect: run the detection branch (testing counts, no gradient).
            score_thresh, nms_thresh: override the model's for the detections.
            num_proposals: return up to this many test proposals (e.g. 2000 for proposal
                recall); the detections still come from the testing count, which are the
                first of them (NMS keeps score order).
        """
        features, objectness, rpn_deltas, anchors = self.rpn_forward(images)
        trace = Trace(list(image_sizes), list(original_sizes), features, anchors, objectness, rpn_deltas)
        if gt_boxes is not None and gt_labels is None:
            raise ValueError("trace: gt_boxes were given without gt_labels")
        proposals: tuple[list[Tensor] | None, list[Tensor] | None] = (None, None)
        if gt_boxes is not None and detect:  # a validation step: both counts from one ProposalCreator pass
            proposals = self.proposal_pairs(objectness, rpn_deltas, anchors, image_sizes, original_sizes, self._test_post_nms(num_proposals))
        training = self._training_rois(trace, gt_boxes, gt_labels, proposals[0]) if gt_boxes is not None else None  # type: ignore[arg-type]
        testing = None
        if detect:
            with torch.no_grad():
                testing = self._test_rois(trace, num_proposals, proposals[1])
        train_head = test_head = None
        if training is not None and testing is not None and not torch.is_grad_enabled():
            # A validation step: both branches' RoIs through the RoI head in one call (one pooling,
            # one pass of the layers; each RoI's outputs are its own: the same numbers).
            train_head, test_head = self._roi_head_split(features, (training, testing))
        else:
            if training is not None:
                train_head = self.roi_head(features, training.rois, training.batch_index)
            if testing is not None:
                with torch.no_grad():
                    test_head = self.roi_head(features, testing.rois, testing.batch_index)
        if training is not None:
            trace.training = self._training_losses(trace, training, *train_head)  # type: ignore[misc]
        if testing is not None:
            with torch.no_grad():
                trace.testing = self._test_detections(trace, testing, *test_head, score_thresh, nms_thresh)  # type: ignore[misc]
        return trace

    def losses(
        self,
        images: Tensor,
        image_sizes: Sequence[Size],
        original_sizes: Sequence[Size],
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
    ) -> dict[str, Tensor]:
        """The four losses and their sum, with the training proposal counts
        (:attr:`TrainingStages.losses` of :meth:`trace`).

        Returns:
            ``rpn_cls, rpn_loc, roi_cls, roi_loc, loss`` (differentiable) and the detached counts
            ``num_pos_anchors, num_pos_rois`` (per image, averaged over the batch).
        """
        return self.trace(images, image_sizes, original_sizes, gt_boxes, gt_labels).training.losses  # type: ignore[union-attr]

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        image_sizes: Sequence[Size],
        original_sizes: Sequence[Size],
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        return_proposals: bool = False,
        num_proposals: int | None = None,
    ) -> list[dict[str, Tensor]]:
        """Detections with the testing proposal counts (:attr:`TestStages.detections`).

        Returns:
            per image a dict with ``boxes (D, 4)`` in original image coordinates,
            ``scores (D,)``, ``labels (D,)`` in 1..K, sorted by decreasing score; with
            ``return_proposals`` also ``proposals (R_i, 4)`` in original coordinates, by score
            (up to ``num_proposals``).
        """
        trace = self.trace(
            images, image_sizes, original_sizes, detect=True, score_thresh=score_thresh, nms_thresh=nms_thresh,
            num_proposals=num_proposals if return_proposals else None,
        )
        return detections_with_proposals(trace) if return_proposals else trace.testing.detections  # type: ignore[union-attr]

    # ------------------------------------------------------------------ stages
    def rpn_forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Trunk and RPN head: features ``(N, C, h, w)``, logits ``(N, A, 2)``, deltas ``(N, A, 4)``,
        anchors ``(A, 4)``."""
        with record_function("backbone"):
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            features = self.trunk(images)
        with record_function("rpn_head"):
            logits, deltas = self.rpn(features)
        with record_function("anchors"):
            anchors = self.anchor_generator(features.shape[-2], features.shape[-1])
        return features, logits, deltas, anchors

    def proposals(
        self,
        logits: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        image_sizes: Sequence[Size],
        original_sizes: Sequence[Size],
        training: bool,
        n_post_nms: int | None = None,
    ) -> list[Tensor]:
        """ProposalCreator on each image: a list of N ``(R_i, 4)`` tensors, sorted by score."""
        with record_function("proposal_creator"):
            fg, deltas = _scores_and_deltas(logits, deltas)
            return [
                self.proposal_creator(deltas[i], fg[i], anchors, size, size[0] / orig[0], training=training, n_post_nms=n_post_nms)
                for i, (size, orig) in enumerate(zip(image_sizes, original_sizes))
            ]

    def proposal_pairs(
        self,
        logits: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        image_sizes: Sequence[Size],
        original_sizes: Sequence[Size],
        n_test_post_nms: int | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`proposals` with the training counts and with the testing counts (up to
        ``n_test_post_nms``), the same boxes, from one :meth:`ProposalCreator.both` per image."""
        with record_function("proposal_creator"):
            fg, deltas = _scores_and_deltas(logits, deltas)
            pairs = [
                self.proposal_creator.both(deltas[i], fg[i], anchors, size, size[0] / orig[0], n_test_post_nms=n_test_post_nms)
                for i, (size, orig) in enumerate(zip(image_sizes, original_sizes))
            ]
            return [p[0] for p in pairs], [p[1] for p in pairs]

    def _test_post_nms(self, num_proposals: int | None) -> int | None:
        """How many testing proposals to keep: the testing count, or ``num_proposals`` when more."""
        n_test = self.proposal_creator.n_post_nms["testing"]
        return max(n_test, num_proposals) if num_proposals else None

    def _training_rois(self, trace: Trace, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor], proposals: list[Tensor] | None = None) -> _TrainingRoIs:
        """The training branch up to the RoI head: anchor targets, proposals, sampled RoIs and their targets."""
        n = trace.features.shape[0]
        sizes = trace.image_sizes
        # RPN targets: (N, A) labels and (N, A, 4) deltas.
        with record_function("anchor_target_creator"):
            rpn_targets = [self.anchor_target_creator(trace.anchors, gt_boxes[i], sizes[i]) for i in range(n)]
            anchor_labels = torch.stack([t[0] for t in rpn_targets])
            anchor_targets = torch.stack([t[1] for t in rpn_targets])

        # RoI head targets on the sampled proposals.
        if proposals is None:
            proposals = self.proposals(trace.objectness, trace.rpn_deltas, trace.anchors, sizes, trace.original_sizes, training=True)
        with record_function("proposal_target_creator"):
            sampled = [self.proposal_target_creator(proposals[i], gt_boxes[i], gt_labels[i]) for i in range(n)]
            rois = torch.cat([s[0] for s in sampled])  # (R, 4)
            roi_labels = torch.cat([s[1] for s in sampled])  # (R,)
            matched = torch.cat([s[2] for s in sampled])  # (R, 4) the ground truth of each RoI
            roi_targets = torch.where((roi_labels >= 1)[:, None], self.roi_box_coder.encode(rois, matched), 0.0)
            batch_index = batch_indices([s[0] for s in sampled])
        return _TrainingRoIs(anchor_labels, anchor_targets, proposals, rois, batch_index, roi_labels, roi_targets)

    def _training_losses(self, trace: Trace, part: _TrainingRoIs, class_logits: Tensor, box_deltas: Tensor) -> TrainingStages:
        """The four losses, from the RoI head's outputs on ``part``'s RoIs."""
        n = trace.features.shape[0]
        with record_function("losses"):
            # fp32 under autocast: the losses sum over thousands of items.
            logits, deltas = trace.objectness.float(), trace.rpn_deltas.float()
            cls_logits, roi_deltas = class_logits.float(), box_deltas.float()
            anchor_labels, roi_labels = part.anchor_labels, part.roi_labels
            losses = {
                "rpn_cls": classification_loss(logits.reshape(-1, 2), anchor_labels.reshape(-1), self.focal_gamma, self.focal_alpha),
                "rpn_loc": localisation_loss(deltas.reshape(-1, 4), part.anchor_targets.reshape(-1, 4), anchor_labels.reshape(-1), self.rpn_sigma),
                "roi_cls": classification_loss(cls_logits, roi_labels, self.focal_gamma, self.focal_alpha),
                "roi_loc": localisation_loss(select_class_deltas(roi_deltas, roi_labels), part.roi_targets, roi_labels, self.roi_sigma),
            }
            losses["loss"] = losses["rpn_cls"] + losses["rpn_loc"] + losses["roi_cls"] + losses["roi_loc"]
            losses["num_pos_anchors"] = (anchor_labels == 1).sum().float() / n
            losses["num_pos_rois"] = (roi_labels >= 1).sum().float() / n
        return TrainingStages(
            part.anchor_labels, part.anchor_targets, part.proposals, part.rois, part.batch_index, roi_labels, part.roi_targets, class_logits, box_deltas, losses
        )

    def _test_rois(self, trace: Trace, num_proposals: int | None, all_proposals: list[Tensor] | None = None) -> _TestRoIs:
        """The detection branch up to the RoI head: the testing proposals (up to ``num_proposals``)
        and the RoIs the head sees, the first ``n_test_post_nms`` of each image."""
        if all_proposals is None:
            all_proposals = self.proposals(
                trace.objectness, trace.rpn_deltas, trace.anchors, trace.image_sizes, trace.original_sizes, training=False,
                n_post_nms=self._test_post_nms(num_proposals),
            )
        n_test = self.proposal_creator.n_post_nms["testing"]
        proposals = [p[:n_test] for p in all_proposals]
        return _TestRoIs(all_proposals, torch.cat(proposals), batch_indices(proposals), [p.shape[0] for p in proposals])

    def _test_detections(
        self, trace: Trace, part: _TestRoIs, class_logits: Tensor, box_deltas: Tensor, score_thresh: float | None, nms_thresh: float | None
    ) -> TestStages:
        """Detections per image from the RoI head's outputs on ``part``'s RoIs."""
        score_thresh = self.score_thresh if score_thresh is None else score_thresh
        nms_thresh = self.nms_thresh if nms_thresh is None else nms_thresh
        sizes, originals = trace.image_sizes, trace.original_sizes
        with record_function("postprocess"):
            probs = class_logits.float().softmax(dim=-1)  # (R, K+1)
            boxes = self.roi_box_coder.decode(part.rois[:, None, :], box_deltas.float())  # (R, K+1, 4)
            detections = [
                self.postprocess(probs_i, boxes_i, sizes[i], originals[i], score_thresh, nms_thresh)
                for i, (probs_i, boxes_i) in enumerate(zip(probs.split(part.counts), boxes.split(part.counts)))
            ]
        return TestStages(part.proposals, part.rois, part.batch_index, class_logits, box_deltas, probs, boxes, detections)

    def _roi_head_split(self, features: Tensor, parts: tuple[_TrainingRoIs, _TestRoIs]) -> list[tuple[Tensor, Tensor]]:
        """The RoI head on the RoIs of several branches at once: per branch, its ``class_logits``
        and ``box_deltas``. Pooling, the layers and the classifiers treat each RoI on its own."""
        counts = [p.rois.shape[0] for p in parts]
        class_logits, box_deltas = self.roi_head(features, torch.cat([p.rois for p in parts]), torch.cat([p.batch_index for p in parts]))
        return list(zip(class_logits.split(counts), box_deltas.split(counts)))

    def postprocess(
        self, probs: Tensor, boxes: Tensor, image_size: Size, original_size: Size, score_thresh: float, nms_thresh: float
    ) -> dict[str, Tensor]:
        """One image: drop the background, threshold, per-class NMS in one batched call.

        Args:
            probs: ``(R, K+1)`` class probabilities; boxes: ``(R, K+1, 4)`` class-specific boxes.
        """
        boxes = clip_boxes_to_image(boxes[:, 1:], image_size)  # (R, K, 4)
        scores = probs[:, 1:]  # (R, K)
        labels = torch.arange(1, self.num_classes + 1, device=probs.device).expand_as(scores)
        boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
        keep = (scores > score_thresh).nonzero().squeeze(1)  # one host sync on a GPU, not one per mask
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, nms_thresh)  # sorted by decreasing score
        if self.max_detections is not None:
            keep = keep[: self.max_detections]
        return {"boxes": to_original(boxes[keep], image_size, original_size), "scores": scores[keep], "labels": labels[keep]}


def _scores_and_deltas(logits: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """What ProposalCreator reads of the RPN's ``(N, A, 2)`` logits and ``(N, A, 4)`` deltas:
    the ``(N, A)`` foreground probabilities and the deltas, detached, in fp32."""
    return logits.detach().float().softmax(dim=-1)[..., 1], deltas.detach().float()


def detections_with_proposals(trace: Trace) -> list[dict[str, Tensor]]:
    """:attr:`TestStages.detections` of ``trace`` with each image's ``proposals (R_i, 4)`` in
    original image coordinates added (for proposal recall and the dashboard panel)."""
    assert trace.testing is not None
    return [
        {**det, "proposals": to_original(p, size, orig)}
        for det, p, size, orig in zip(trace.testing.detections, trace.testing.proposals, trace.image_sizes, trace.original_sizes)
    ]


def batch_indices(per_image: Sequence[Tensor]) -> Tensor:
    """``(R,)`` the image index of each row of ``torch.cat(per_image)``."""
    return torch.cat([torch.full((t.shape[0],), i, device=t.device) for i, t in enumerate(per_image)])


def to_original(boxes: Tensor, image_size: Size, original_size: Size) -> Tensor:
    """Map ``(M, 4)`` boxes from the resized image back to the original image."""
    sy = original_size[0] / image_size[0]
    sx = original_size[1] / image_size[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def to_resized(boxes: Tensor, image_size: Size, original_size: Size) -> Tensor:
    """Inverse of :func:`to_original`: ``(M, 4)`` original-image boxes -> resized-image boxes."""
    return to_original(boxes, original_size, image_size)
