"""What a run shows beyond scalars: validation images with boxes, and precision-recall curves.

:class:`DashboardPanels` logs, at every validation, the same few validation images (the first
``num_images`` of the unshuffled split) to wandb as ``val/examples/<i>``, each with three box layers
that the wandb UI can switch on and off:

* ``ground_truth``: the annotated objects (class names; difficult ones captioned so);
* ``proposals``: the RPN's top ``num_proposals`` proposals, captioned with their rank;
* ``predictions``: the detections with class names and scores (``scores.score`` drives the
  score slider).

At the end of training (:meth:`log_pr_curves`) it draws the last validation's precision-recall curves to
``<output_dir>/pr_curves.png`` and logs them to wandb as ``val/pr_curves``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from fasterrcnn.data.transforms import denormalize
from fasterrcnn.evaluation.results import plot_pr_curves


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


class DashboardPanels(L.Callback):
    """Validation image panel (wandb) and precision-recall curves (wandb and a PNG).

    Args:
        class_names: names of classes 1..K.
        mean, std: the input normalisation, to show the images as they were seen.
        output_dir: where ``pr_curves.png`` goes (None: not written).
        num_images: images in the panel (0: no panel).
        num_proposals: top proposals drawn on each.
        max_detections: at most this many detections drawn per image (highest scores).
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
    ) -> None:
        self.class_names = list(class_names)
        self.mean, self.std = tuple(mean), tuple(std)
        self.output_dir = output_dir
        self.num_images = num_images
        self.num_proposals = num_proposals
        self.max_detections = max_detections
        self.class_labels = {i + 1: name for i, name in enumerate(self.class_names)}
        self.proposal_label = {0: "proposal"}
        self.panel: list = []

    @staticmethod
    def _wandb(trainer: L.Trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.panel = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or len(self.panel) >= self.num_images:
            return
        if self._wandb(trainer) is None or not isinstance(outputs, dict) or "detections" not in outputs:
            return
        for i, det in enumerate(outputs["detections"]):
            if len(self.panel) >= self.num_images:
                break
            self.panel.append(self.panel_image(batch, i, det))

    def panel_image(self, batch, i: int, det: dict[str, Tensor]):
        """One ``wandb.Image`` of image ``i`` of ``batch`` (as the network saw it) with its layers."""
        import wandb

        h, w = batch.image_sizes[i]
        oh, ow = batch.original_sizes[i]
        to_input = torch.tensor([w / ow, h / oh, w / ow, h / oh])  # detections are in original coordinates
        image = denormalize(batch.images[i, :, :h, :w].detach().cpu(), self.mean, self.std).permute(1, 2, 0).numpy()
        gt_labels = batch.labels[i].cpu().tolist()
        difficult = batch.difficult[i].cpu().tolist()
        gt = wandb_box_layer(
            batch.boxes[i].detach().cpu(),
            gt_labels,
            [self.class_names[c - 1] + (" (difficult)" if d else "") for c, d in zip(gt_labels, difficult)],
            self.class_labels,
        )
        layers = {"ground_truth": gt}
        if "proposals" in det:
            props = det["proposals"][: self.num_proposals].detach().cpu() * to_input
            layers["proposals"] = wandb_box_layer(props, [0] * len(props), [f"#{r + 1}" for r in range(len(props))], self.proposal_label)
        scores = det["scores"][: self.max_detections].detach().cpu()
        labels = det["labels"][: self.max_detections].cpu().tolist()
        boxes = det["boxes"][: self.max_detections].detach().cpu() * to_input
        layers["predictions"] = wandb_box_layer(
            boxes, labels, [f"{self.class_names[c - 1]} {s:.2f}" for c, s in zip(labels, scores.tolist())], self.class_labels, scores
        )
        return wandb.Image(image, boxes=layers, caption=batch.image_ids[i])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = self._wandb(trainer)
        if trainer.sanity_checking or not trainer.is_global_zero or logger is None or not self.panel:
            return
        # One key per image: wandb shows a list of images of different sizes distorted.
        panel = {f"val/examples/{i}": image for i, image in enumerate(self.panel)}
        logger.experiment.log({**panel, "trainer/global_step": trainer.global_step})
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
        plt.close(fig)
