"""The LightningModule: Faster R-CNN's four losses for training, losses and VOC mAP for validation."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from fasterrcnn.build import build_model
from fasterrcnn.data.datamodule import DetectionBatch
from fasterrcnn.evaluation.voc import VOCEvaluator

LOSS_KEYS = ("rpn_cls", "rpn_loc", "roi_cls", "roi_loc", "loss")
STAT_KEYS = ("num_pos_anchors", "num_pos_rois")

DEFAULT_OPTIM = {
    "optimizer": "sgd",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "bias_lr_factor": 2.0,
    "bias_weight_decay": 0.0,
    "lr_decay": 0.1,
    "lr_decay_epochs": [10],
    "warmup_steps": 0,
    "betas": (0.9, 0.999),
}


def training_targets(batch: DetectionBatch) -> tuple[list[Tensor], list[Tensor]]:
    """Ground truth for the losses: difficult objects are left out (they only matter to the
    evaluation, which ignores them)."""
    boxes = [b[~d] for b, d in zip(batch.boxes, batch.difficult)]
    labels = [lab[~d] for lab, d in zip(batch.labels, batch.difficult)]
    return boxes, labels


class FasterRCNNModule(L.LightningModule):
    """Wraps :class:`fasterrcnn.model.FasterRCNN` for Lightning.

    Args:
        model_cfg: the detector's config (:func:`fasterrcnn.build.model_config`), stored in the
            checkpoint so :meth:`load` can rebuild the model anywhere.
        optim: SGD and schedule settings (see ``conf/optim/sgd.yaml``).
        use_07_metric: VOC2007 11-point AP (True) or VOC2010+ all-point AP for ``val/map``.
    """

    def __init__(self, model_cfg: dict, optim: dict | None = None, use_07_metric: bool = True, pretrained: bool | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["pretrained"])
        self.model = build_model(model_cfg, pretrained=pretrained)
        self.optim = {**DEFAULT_OPTIM, **(optim or {})}
        self.class_names = list(model_cfg["classes"])
        self.evaluator = VOCEvaluator(self.class_names)
        self.use_07_metric = use_07_metric

    @classmethod
    def load(cls, checkpoint_path: str, map_location: str | torch.device = "cpu") -> FasterRCNNModule:
        """Rebuild a trained module from a checkpoint (loaded with ``weights_only=True``),
        without fetching ImageNet weights again."""
        ckpt = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
        module = cls(**ckpt["hyper_parameters"], pretrained=False)
        module.load_state_dict(ckpt["state_dict"])
        return module

    # ------------------------------------------------------------------ steps
    def _losses(self, batch: DetectionBatch) -> dict[str, Tensor]:
        boxes, labels = training_targets(batch)
        return self.model.losses(batch.images, batch.image_sizes, batch.original_sizes, boxes, labels)

    def training_step(self, batch: DetectionBatch, batch_idx: int) -> Tensor:
        out = self._losses(batch)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=len(batch))
        # The other scalars only on the steps the logger records (each self.log costs ~1 ms on CPU).
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % every == 0 or every <= 1:
            self.log_dict({f"train/{k}": out[k].detach() for k in LOSS_KEYS[:-1] + STAT_KEYS}, batch_size=len(batch))
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def validation_step(self, batch: DetectionBatch, batch_idx: int) -> None:
        out = self._losses(batch)
        self.log_dict({f"val/{k}": out[k] for k in LOSS_KEYS}, batch_size=len(batch))
        detections = self.model.predict(batch.images, batch.image_sizes, batch.original_sizes)
        for det, gt_boxes, gt_labels, gt_difficult in zip(detections, batch.original_boxes, batch.labels, batch.difficult):
            self.evaluator.update(det["boxes"], det["scores"], det["labels"], gt_boxes, gt_labels, gt_difficult)

    def on_validation_epoch_end(self) -> None:
        result = self.evaluator.compute(use_07_metric=self.use_07_metric)
        self.log("val/map", result["map"], prog_bar=True)
        for name, ap in result["ap"].items():
            if not math.isnan(ap):
                self.log(f"val/ap/{name}", ap)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """The reference's SGD (or AdamW, ``optim.optimizer=adamw``): biases get ``bias_lr_factor``
        x lr and ``bias_weight_decay``; lr falls by ``lr_decay`` at each epoch of
        ``lr_decay_epochs`` (0-based), after ``warmup_steps`` of linear warm-up."""
        o = self.optim
        weights, biases = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (biases if name.endswith(".bias") else weights).append(p)
        groups = [
            {"params": weights, "lr": o["lr"], "weight_decay": o["weight_decay"]},
            {"params": biases, "lr": o["lr"] * o["bias_lr_factor"], "weight_decay": o["bias_weight_decay"]},
        ]
        if o["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], foreach=True)
        elif o["optimizer"] == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), foreach=True)
        else:
            raise ValueError(f"optim.optimizer must be 'sgd' or 'adamw', not {o['optimizer']!r}")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """The lr multiplier for optimiser step ``step`` (warm-up times step decay)."""
        o = self.optim
        per_epoch = self.trainer.num_training_batches if self._trainer is not None else math.inf
        epoch = step // per_epoch if math.isfinite(per_epoch) and per_epoch > 0 else 0
        decay = o["lr_decay"] ** sum(epoch >= e for e in o["lr_decay_epochs"])
        warmup = min(1.0, (step + 1) / o["warmup_steps"]) if o["warmup_steps"] else 1.0
        return decay * warmup
