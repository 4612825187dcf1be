"""The LightningModule: Faster R-CNN's four losses for training, losses and VOC mAP for validation."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from fasterrcnn.build import OPTIMIZER_TARGETS, UnsafeConfigError, build_model, check_config, safe_instantiate
from fasterrcnn.data.batch import DetectionBatch
from fasterrcnn.evaluation.metrics import DetectionMetrics
from fasterrcnn.model import LOSS_KEYS, detections_with_proposals

STAT_KEYS = ("num_pos_anchors", "num_pos_rois")

# What configure_optimizers reads from ``optim`` (conf/optim/*.yaml and conf/train.yaml's
# optim.scale_lr_with_world_size); the config is the one place for their values.
OPTIM_KEYS = (
    "optimizer",
    "lr",
    "weight_decay",
    "bias_lr_factor",
    "bias_weight_decay",
    "lr_decay",
    "lr_decay_epochs",
    "warmup_steps",
    "scale_lr_with_world_size",
)

NONFINITE_POLICIES = ("stop", "skip")
# The log prefix of each validation loader: the validation split, then the shifted split
# (data.val_shift, fasterrcnn.data.datamodule.VOCDataModule.val_dataloader).
VAL_PREFIXES = ("val", "val_shift")


class NonFiniteLossError(FloatingPointError):
    """A training loss was NaN or infinite (``fault.on_nonfinite_loss=stop``)."""


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
        optim: the optimiser (``optimizer``, a ``_partial_`` node of
            :data:`fasterrcnn.build.OPTIMIZER_TARGETS`), its parameter-group rules and schedule
            (:data:`OPTIM_KEYS`; ``conf/optim/*.yaml``). Needed only to train.
        use_07_metric: VOC2007 11-point AP (True) or VOC2010+ all-point AP for ``val/map``.
        evaluation: what each validation computes besides VOC AP (``recall_counts``,
            ``recall_ious``, ``coco``; see ``conf/train.yaml``).
        on_nonfinite_loss: ``stop`` (raise :class:`NonFiniteLossError` before the weights
            change) or ``skip`` (no update from that batch; counted in ``train/skipped_steps``).
    """

    def __init__(
        self,
        model_cfg: dict,
        optim: dict | None = None,
        use_07_metric: bool = True,
        evaluation: dict | None = None,
        on_nonfinite_loss: str = "stop",
        pretrained: bool | None = None,
    ) -> None:
        super().__init__()
        if on_nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"fault.on_nonfinite_loss must be one of {NONFINITE_POLICIES}, not {on_nonfinite_loss!r}")
        self.save_hyperparameters(ignore=["pretrained"])
        self.model = build_model(model_cfg, pretrained=pretrained)
        self.optim = dict(optim or {})
        self.class_names = list(model_cfg["classes"])
        evaluation = {k: v for k, v in (evaluation or {}).items() if k in ("recall_counts", "recall_ious", "coco")}
        self.evaluator = DetectionMetrics(self.class_names, use_07_metric, **evaluation)
        # validation loader 0 (val/...) and, under data.val_shift, 1: the shifted split (val_shift/...)
        self.evaluators = (self.evaluator, DetectionMetrics(self.class_names, use_07_metric, **evaluation))
        # per validation prefix: (the summed losses (len(LOSS_KEYS),), images), see _add_val_losses
        self._val_loss_sums: dict[str, tuple[Tensor, int]] = {}
        self.use_07_metric = use_07_metric
        # The last validation's precision-recall curves (for the dashboard's end-of-run panel).
        self.pr_curves: dict = {}
        self.on_nonfinite_loss = on_nonfinite_loss
        self.skipped_steps = 0

    @classmethod
    def load(cls, checkpoint_path: str, map_location: str | torch.device = "cpu") -> FasterRCNNModule:
        """Rebuild a trained module from a checkpoint (loaded with ``weights_only=True``),
        without fetching ImageNet weights again.

        Nothing in the checkpoint runs: only the constructor's own hyper-parameters are passed
        on, the model is built from :data:`fasterrcnn.build.ALLOWED_TARGETS` only
        (:func:`fasterrcnn.build.build_model`) and ``optim`` may name no ``_target_`` but
        :data:`fasterrcnn.build.OPTIMIZER_TARGETS` (it is not built here, but a training from
        the module would); anything else raises :class:`fasterrcnn.build.UnsafeConfigError`
        naming the file, the key and the value."""
        expected = ("model_cfg", "optim", "use_07_metric", "evaluation", "on_nonfinite_loss")
        ckpt = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
        hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        if not isinstance(hparams, dict) or "state_dict" not in ckpt:
            raise ValueError(f"{checkpoint_path}: not a checkpoint of this project (no hyper_parameters and state_dict)")
        unknown = sorted(repr(k) for k in hparams if type(k) is not str or k not in expected)
        if unknown:
            raise UnsafeConfigError(f"{checkpoint_path}: refused, hyper_parameters has unknown key(s) {', '.join(unknown)} (expected only {', '.join(expected)})")
        try:
            check_config(hparams.get("optim"), "optim", allowed=OPTIMIZER_TARGETS)
            module = cls(**hparams, pretrained=False)
        except UnsafeConfigError as err:
            raise UnsafeConfigError(f"{checkpoint_path}: {err}") from err
        module.load_state_dict(ckpt["state_dict"])
        return module

    @property
    def _attached_trainer(self) -> L.Trainer | None:
        """The Trainer, or None when the module runs without one (tests call its steps directly)."""
        try:
            return self.trainer
        except RuntimeError:  # LightningModule.trainer: "not attached to a `Trainer`"
            return None

    # ------------------------------------------------------------------ steps
    def _losses(self, batch: DetectionBatch) -> dict[str, Tensor]:
        boxes, labels = training_targets(batch)
        return self.model.losses(batch.images, batch.image_sizes, batch.original_sizes, boxes, labels)

    def training_step(self, batch: DetectionBatch, batch_idx: int) -> Tensor | None:
        out = self._losses(batch)
        # The step's one host sync: a NaN/inf loss must be caught before backward and the
        # optimiser step carry it into the weights and the momentum. Under DDP all ranks decide
        # together (one rank skipping alone would leave the others waiting in backward).
        trainer = self._attached_trainer
        local = bool(torch.isfinite(out["loss"]))
        finite = trainer.strategy.reduce_boolean_decision(local, all=True) if trainer is not None else local
        if not finite:
            return self._nonfinite_loss(batch, batch_idx, out, elsewhere=local)
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=len(batch))
        # The other scalars only on the steps the logger records (each self.log costs ~1 ms on CPU).
        every = trainer.log_every_n_steps if trainer is not None else 1
        if (self.global_step + 1) % every == 0 or every <= 1:
            self.log_dict({f"train/{k}": out[k].detach() for k in LOSS_KEYS[:-1] + STAT_KEYS}, batch_size=len(batch))
        return out["loss"]

    def _nonfinite_loss(self, batch: DetectionBatch, batch_idx: int, out: dict[str, Tensor], elsewhere: bool = False) -> None:
        """Stop with the step, the images and the losses, or skip the step (returning None skips
        backward and the optimiser's update; the step still counts, the schedule moves on).
        ``elsewhere``: this rank's loss is finite, another DDP rank's is not."""
        losses = ", ".join(f"{k}={float(out[k].detach()):.4g}" for k in LOSS_KEYS)
        where = f"global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}), images {list(batch.image_ids)}"
        if elsewhere:
            where = f"another DDP rank at {where.replace('images', 'this rank had images')}"
        if self.on_nonfinite_loss == "stop":
            raise NonFiniteLossError(
                f"non-finite training loss at {where}: {losses}. The weights are those before this step;"
                " fault.on_nonfinite_loss=skip skips such steps instead."
            )
        self.skipped_steps += 1
        rank_zero_warn(f"skipping the step at {where}: non-finite loss ({losses}); {self.skipped_steps} skipped so far")
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=len(batch))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)

    def on_validation_epoch_start(self) -> None:
        for evaluator in self.evaluators:
            evaluator.reset()
        self._val_loss_sums.clear()

    def _add_val_losses(self, prefix: str, out: dict[str, Tensor], count: int) -> None:
        """Sum one step's validation losses (``count`` images); they are logged once, as means,
        at the end of the validation (one ``self.log`` per step and loss cost ~1 ms each on CPU)."""
        step = torch.stack([out[k].detach().float() for k in LOSS_KEYS]) * count
        total, images = self._val_loss_sums.get(prefix, (0, 0))
        self._val_loss_sums[prefix] = (total + step, images + count)

    def validation_step(self, batch: DetectionBatch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Losses, detections and proposal recall from one trunk pass, one proposal pass and one
        RoI head call (:meth:`FasterRCNN.trace` with both branches); returns the detections (with proposals) for callbacks such as the
        dashboard's image panel. Under ``data.val_shift`` the second loader (``dataloader_idx``
        1) is the shifted split, logged as ``val_shift/...``."""
        prefix, evaluator = VAL_PREFIXES[dataloader_idx], self.evaluators[dataloader_idx]
        boxes, labels = training_targets(batch)
        n_proposals = evaluator.max_proposals
        trace = self.model.trace(batch.images, batch.image_sizes, batch.original_sizes, boxes, labels, detect=True, num_proposals=n_proposals)
        self._add_val_losses(prefix, trace.training.losses, len(batch))  # type: ignore[union-attr]
        detections = detections_with_proposals(trace) if n_proposals is not None else trace.testing.detections  # type: ignore[union-attr]
        evaluator.update_batch(detections, batch)
        return {"detections": detections}

    def on_validation_epoch_end(self) -> None:
        """``val/map`` and the rest of :class:`DetectionMetrics` over the whole split; the same
        as ``val_shift/...`` over the shifted split when it is validated too (the best
        checkpoint is still chosen on ``val/map``)."""
        for index, (prefix, evaluator) in enumerate(zip(VAL_PREFIXES, self.evaluators)):
            if index >= self._num_val_loaders():
                break
            total, images = self._val_loss_sums.get(prefix, (None, 0))
            if images:
                # The mean over this process's images; under DDP the mean of the processes' means
                # (sync_dist), as Lightning's per-step logging gave.
                means = (total / images).tolist()
                self.log_dict({f"{prefix}/{k}": v for k, v in zip(LOSS_KEYS, means)}, sync_dist=True)
            evaluator.sync(num_images=self._val_set_size(index))
            result = evaluator.compute()
            self.log(f"{prefix}/map", result.pop("map"), prog_bar=index == 0)
            self.log_dict({f"{prefix}/{k}": v for k, v in result.items() if not math.isnan(v)})
            self.log(f"{prefix}/num_images", float(evaluator.num_images))
        self.pr_curves = self.evaluator.pr_curves()

    def _val_loaders(self) -> list:
        trainer = self._attached_trainer
        loaders = trainer.val_dataloaders if trainer is not None else None
        return [] if loaders is None else list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]

    def _num_val_loaders(self) -> int:
        """1, or 2 with the shifted split (1 without a Trainer: tests call the steps directly)."""
        return max(1, min(len(self._val_loaders()), len(VAL_PREFIXES)))

    def _val_set_size(self, index: int = 0) -> int | None:
        """The number of images of validation loader ``index`` (before a distributed sampler pads them)."""
        loaders = self._val_loaders()
        try:
            return len(loaders[index].dataset) if index < len(loaders) else None
        except (AttributeError, TypeError):
            return None

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """``optim.optimizer`` (a ``_partial_`` target: the reference's SGD, or AdamW) over two
        parameter groups: weights get ``lr`` and ``weight_decay``, biases ``bias_lr_factor`` x lr
        and ``bias_weight_decay``; lr falls by ``lr_decay`` at each epoch of ``lr_decay_epochs``
        (0-based), after ``warmup_steps`` of linear warm-up; under DDP lr is x the number of
        processes when ``scale_lr_with_world_size`` (the linear scaling rule)."""
        o = self.optim
        missing = [key for key in OPTIM_KEYS if key not in o]
        if missing:
            raise ValueError(f"optim: missing {', '.join(missing)} (conf/optim/*.yaml and conf/train.yaml hold them)")
        trainer = self._attached_trainer
        lr = o["lr"]
        if o["scale_lr_with_world_size"] and trainer is not None and trainer.world_size > 1:
            lr *= trainer.world_size
            rank_zero_info(f"lr {o['lr']:g} x {trainer.world_size} processes = {lr:g} (optim.scale_lr_with_world_size)")
        weights, biases = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (biases if name.endswith(".bias") else weights).append(p)
        groups = [
            {"params": weights, "lr": lr, "weight_decay": o["weight_decay"]},
            {"params": biases, "lr": lr * o["bias_lr_factor"], "weight_decay": o["bias_weight_decay"]},
        ]
        # Only torch.optim.SGD / AdamW, even from our own config: the same rule as a checkpoint's.
        # Plain lists (not ListConfig) as arguments: the optimiser's state goes into checkpoints
        # read back with weights_only=True.
        make = safe_instantiate(o["optimizer"], "optim.optimizer", allowed=OPTIMIZER_TARGETS, _convert_="all")
        optimizer = make(groups, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """The lr multiplier for optimiser step ``step`` (warm-up times step decay)."""
        o = self.optim
        trainer = self._attached_trainer
        per_epoch = trainer.num_training_batches if trainer is not None else math.inf
        epoch = step // per_epoch if math.isfinite(per_epoch) and per_epoch > 0 else 0
        decay = o["lr_decay"] ** sum(epoch >= e for e in o["lr_decay_epochs"])
        warmup = min(1.0, (step + 1) / o["warmup_steps"]) if o["warmup_steps"] else 1.0
        return decay * warmup
