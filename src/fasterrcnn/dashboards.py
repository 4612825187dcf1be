"""What a run shows beyond scalars: validation images with boxes, and precision-recall curves.

:class:`DashboardPanels` logs, at every validation, the same few validation images (the first
``num_images`` of the unshuffled split) as ``val/examples/<i>``, with three sets of boxes:

* ``ground_truth``: the annotated objects (class names; difficult ones captioned so);
* ``proposals``: the RPN's top ``num_proposals`` proposals (wandb captions them with their rank);
* ``predictions``: the detections with class names and scores.

To wandb each image goes with the three as box layers that its UI switches on and off (and
``scores.score`` drives the score slider). TensorBoard has neither, so there the image is drawn
three times side by side, ground truth | proposals | predictions, the predictions being those
scoring at least ``min_score`` (:func:`tensorboard_panel`).

At the end of training (:meth:`log_pr_curves`) it draws the last validation's precision-recall
curves to ``<output_dir>/pr_curves.png`` and logs the figure as ``val/pr_curves`` (wandb and
TensorBoard); TensorBoard also gets one interactive curve per class, ``val/pr_curve/<class>``
(:func:`pr_curve_counts`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from fasterrcnn.data.transforms import denormalize
from fasterrcnn.evaluation.results import plot_pr_curves
from fasterrcnn.visualize import class_color, default_font, draw_detections

# TensorBoard panel: proposals in one colour (none of the class colours), a white gap between
# the three drawings and a title strip above each.
PROPOSAL_COLOR = "#ff00ff"
PANEL_GAP = 4
TITLE_HEIGHT = 16
# TensorBoard's per-class PR curves: counts at these score thresholds (0, 0.01, ..., 1).
PR_THRESHOLDS = 101


def wandb_box_layer(boxes: Tensor, class_ids: Sequence[int], captions: Sequence[str], class_labels: dict[int, str], scores: Tensor | None = None) -> dict:
    """``(B, 4)`` pixel boxes -> one wandb box layer (``{"box_data": [...], "class_labels": ...}``)."""
    data = []
    for i, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        box = {
            "position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2},
            "domain": "pixel",
            "class_id": int(class_ids[i]),
            "box_caption": captions[i],
        }
        if scores is not None:
            box["scores"] = {"score": float(scores[i])}
        data.append(box)
    return {"box_data": data, "class_labels": class_labels}


@dataclass
class PanelSample:
    """One panel image as the network saw it (resized), all boxes ``(B, 4)`` in its pixels, on the CPU.

    ``proposals`` in rank order (None when the validation returned none); ``boxes``, ``labels``
    (1..K) and ``scores``: the detections in score order.
    """

    image_id: str
    image: Tensor  # (3, h, w) uint8
    gt_boxes: Tensor
    gt_labels: list[int]
    gt_difficult: list[bool]
    proposals: Tensor | None
    boxes: Tensor
    labels: list[int]
    scores: Tensor


def _draw_boxes(image: Tensor, boxes: Tensor, texts: list[str] | None, colors: list[str]) -> Tensor:
    """``(3, H, W)`` uint8 with ``boxes`` outlined, pixel-rounded as :func:`fasterrcnn.visualize.draw_detections`."""
    import inspect

    from torchvision.utils import draw_bounding_boxes

    if boxes.shape[0] == 0:
        return image.clone()
    lo = boxes[:, :2].floor()
    hi = torch.maximum(boxes[:, 2:].ceil() - 1, lo)
    font = default_font()
    size = max(10, round(min(image.shape[-2:]) / 40))
    filled = {"fill_labels": True, "label_colors": "white"} if texts and "fill_labels" in inspect.signature(draw_bounding_boxes).parameters else {}
    return draw_bounding_boxes(image, torch.cat((lo, hi), 1), labels=texts, colors=colors, width=1, font=font, font_size=size if font else None, **filled)


def tensorboard_panel(sample: PanelSample, class_names: Sequence[str], min_score: float = 0.3) -> Tensor:
    """``(3, TITLE_HEIGHT + h, 3 w + 2 PANEL_GAP)`` uint8: the image drawn three times, with the
    ground truth (class names), the proposals (one colour, no captions: they are many) and the
    predictions scoring at least ``min_score`` ("name 0.93"), each under a title."""
    from PIL import Image, ImageDraw, ImageFont

    gt = _draw_boxes(
        sample.image,
        sample.gt_boxes,
        [class_names[c - 1] + (" (difficult)" if d else "") for c, d in zip(sample.gt_labels, sample.gt_difficult)],
        [class_color(c) for c in sample.gt_labels],
    )
    proposals = sample.proposals if sample.proposals is not None else torch.zeros(0, 4)
    props = _draw_boxes(sample.image, proposals, None, [PROPOSAL_COLOR] * len(proposals))
    keep = sample.scores >= min_score
    labels = torch.tensor(sample.labels, dtype=torch.long)[keep]
    preds = draw_detections(sample.image, sample.boxes[keep], labels, sample.scores[keep], class_names, line_width=1)
    shown = f"top {len(proposals)}" if sample.proposals is not None else "none returned"
    titles = ("ground truth", f"proposals ({shown})", f"predictions (score >= {min_score:g})")
    h, w = sample.image.shape[-2:]
    canvas = Image.new("RGB", (3 * w + 2 * PANEL_GAP, TITLE_HEIGHT + h), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.truetype(default_font(), 11) if default_font() else ImageFont.load_default()
    for k, (drawing, title) in enumerate(zip((gt, props, preds), titles)):
        x = k * (w + PANEL_GAP)
        canvas.paste(Image.fromarray(drawing.permute(1, 2, 0).numpy()), (x, TITLE_HEIGHT))
        draw.text((x + 2, 1), title, fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def pr_curve_counts(scores: Tensor, tp: Tensor, fp: Tensor, npos: int, num_thresholds: int = PR_THRESHOLDS) -> dict[str, np.ndarray]:
    """TensorBoard's raw PR-curve arrays for one class from its VOC matching: ``scores``, ``tp``,
    ``fp`` ``(D,)`` in decreasing score order (a detection of a difficult object is neither) and
    ``npos`` non-difficult objects. Counts are of the detections scoring at least each of
    ``num_thresholds`` thresholds ``0, 1/(n-1), ..., 1`` (as TensorBoard indexes them); a missed
    object is a false negative; ``true_negative_counts`` is 0 (detection has no negatives to count).

    >>> c = pr_curve_counts(torch.tensor([0.9, 0.6, 0.2]), torch.tensor([True, False, True]), torch.tensor([False, True, False]), 4, 3)
    >>> c["true_positive_counts"].tolist(), c["false_positive_counts"].tolist(), c["recall"].tolist()
    ([2.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.25, 0.0])
    """
    thresholds = torch.linspace(0, 1, num_thresholds, dtype=torch.double)
    # detections scoring >= t: scores are decreasing, so count them on the negated (increasing) scores
    kept = torch.searchsorted(-scores.double(), -thresholds, right=True)
    cum_tp = torch.cat((torch.zeros(1, dtype=torch.double), tp.double().cumsum(0)))
    cum_fp = torch.cat((torch.zeros(1, dtype=torch.double), fp.double().cumsum(0)))
    tps, fps = cum_tp[kept], cum_fp[kept]
    return {
        "true_positive_counts": tps.numpy(),
        "false_positive_counts": fps.numpy(),
        "true_negative_counts": np.zeros(num_thresholds),
        "false_negative_counts": (npos - tps).numpy(),
        # as TensorBoard's own add_pr_curve: 0 where nothing is detected
        "precision": (tps / torch.clamp(tps + fps, min=1e-7)).numpy(),
        "recall": (tps / max(npos, 1)).numpy(),
    }


class DashboardPanels(L.Callback):
    """Validation image panel and precision-recall curves (wandb, TensorBoard and a PNG).

    Args:
        class_names: names of classes 1..K.
        mean, std: the input normalisation, to show the images as they were seen.
        output_dir: where ``pr_curves.png`` goes (None: not written).
        num_images: images in the panel (0: no panel).
        num_proposals: top proposals drawn on each.
        max_detections: at most this many detections drawn per image (highest scores).
        min_score: TensorBoard's panel draws only the detections scoring at least this (wandb's
            has a score slider instead).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        output_dir: str | None = None,
        num_images: int = 4,
        num_proposals: int = 20,
        max_detections: int = 50,
        min_score: float = 0.3,
    ) -> None:
        self.class_names = list(class_names)
        self.mean, self.std = tuple(mean), tuple(std)
        self.output_dir = output_dir
        self.num_images = num_images
        self.num_proposals = num_proposals
        self.max_detections = max_detections
        self.min_score = min_score
        self.class_labels = {i + 1: name for i, name in enumerate(self.class_names)}
        self.proposal_label = {0: "proposal"}
        self.panel: list[PanelSample] = []

    @staticmethod
    def _wandb(trainer: L.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    @staticmethod
    def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.panel = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or len(self.panel) >= self.num_images:
            return
        if (self._wandb(trainer) is None and self._tensorboard(trainer) is None) or not isinstance(outputs, dict) or "detections" not in outputs:
            return
        for i, det in enumerate(outputs["detections"]):
            if len(self.panel) >= self.num_images:
                break
            self.panel.append(self.panel_sample(batch, i, det))

    def panel_sample(self, batch, i: int, det: dict[str, Tensor]) -> PanelSample:
        """Image ``i`` of ``batch`` as the network saw it, with its boxes in the same pixels."""
        h, w = batch.image_sizes[i]
        oh, ow = batch.original_sizes[i]
        to_input = torch.tensor([w / ow, h / oh, w / ow, h / oh])  # detections are in original coordinates
        proposals = det["proposals"][: self.num_proposals].detach().cpu() * to_input if "proposals" in det else None
        return PanelSample(
            image_id=batch.image_ids[i],
            image=denormalize(batch.images[i, :, :h, :w].detach().cpu(), self.mean, self.std),
            gt_boxes=batch.boxes[i].detach().cpu(),
            gt_labels=batch.labels[i].cpu().tolist(),
            gt_difficult=[bool(d) for d in batch.difficult[i].cpu().tolist()],
            proposals=proposals,
            boxes=det["boxes"][: self.max_detections].detach().cpu() * to_input,
            labels=det["labels"][: self.max_detections].cpu().tolist(),
            scores=det["scores"][: self.max_detections].detach().cpu(),
        )

    def wandb_image(self, sample: PanelSample):
        """One ``wandb.Image`` with the three box layers."""
        import wandb

        gt = wandb_box_layer(
            sample.gt_boxes,
            sample.gt_labels,
            [self.class_names[c - 1] + (" (difficult)" if d else "") for c, d in zip(sample.gt_labels, sample.gt_difficult)],
            self.class_labels,
        )
        layers = {"ground_truth": gt}
        if sample.proposals is not None:
            props = sample.proposals
            layers["proposals"] = wandb_box_layer(props, [0] * len(props), [f"#{r + 1}" for r in range(len(props))], self.proposal_label)
        layers["predictions"] = wandb_box_layer(
            sample.boxes,
            sample.labels,
            [f"{self.class_names[c - 1]} {s:.2f}" for c, s in zip(sample.labels, sample.scores.tolist())],
            self.class_labels,
            sample.scores,
        )
        return wandb.Image(sample.image.permute(1, 2, 0).numpy(), boxes=layers, caption=sample.image_id)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.panel:
            return
        wandb_logger, tensorboard = self._wandb(trainer), self._tensorboard(trainer)
        if wandb_logger is not None:
            # One key per image: wandb shows a list of images of different sizes distorted.
            panel = {f"val/examples/{i}": self.wandb_image(sample) for i, sample in enumerate(self.panel)}
            wandb_logger.experiment.log({**panel, "trainer/global_step": trainer.global_step})
        if tensorboard is not None:
            for i, sample in enumerate(self.panel):
                image = tensorboard_panel(sample, self.class_names, self.min_score)
                tensorboard.experiment.add_image(f"val/examples/{i}", image, trainer.global_step, dataformats="CHW")
        self.panel = []

    def log_pr_curves(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Draw the last validation's curves (call once training and its final validation are done)."""
        curves = getattr(pl_module, "pr_curves", None)
        if not trainer.is_global_zero or not curves:
            return
        import matplotlib.pyplot as plt

        metrics = trainer.callback_metrics
        aps = {name: float(metrics.get(f"val/ap/{name}", float("nan"))) for name in curves}
        path = os.path.join(self.output_dir, "pr_curves.png") if self.output_dir else None
        fig = plot_pr_curves(curves, aps, path, title=f"validation at step {trainer.global_step}: precision-recall (AP)")
        logger = self._wandb(trainer)
        if logger is not None:
            import wandb

            logger.experiment.log({"val/pr_curves": wandb.Image(fig), "trainer/global_step": trainer.global_step})
        tensorboard = self._tensorboard(trainer)
        if tensorboard is not None:
            writer = tensorboard.experiment
            writer.add_figure("val/pr_curves", fig, trainer.global_step, close=False)
            # The VOC matching of the last validation (fasterrcnn.evaluation.voc.VOCEvaluator.class_pr).
            voc = getattr(getattr(pl_module, "evaluator", None), "voc", None)
            for label, name in enumerate(self.class_names, start=1):
                if voc is None or name not in curves:  # no curve for a class without ground truth
                    continue
                counts = pr_curve_counts(*voc.class_pr(label))
                writer.add_pr_curve_raw(f"val/pr_curve/{name}", **counts, global_step=trainer.global_step, num_thresholds=PR_THRESHOLDS)
            # Lightning closed the writer after the last validation; this reopened it, and nothing
            # writes after this: close it again (a multirun process would keep every job's open).
            writer.close()
        plt.close(fig)
