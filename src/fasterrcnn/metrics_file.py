"""``metrics.json``: every run's summary, read by sweeps, scripts and people.

Keys (stable; documented in the README):

* ``status``: ``running``, ``completed``, ``failed`` or ``interrupted``;
* ``error``: the error message of a failed run, else null;
* ``monitor``: the metric that picks the best checkpoint (``val/map``);
* ``final``: the metrics of the last validation (``val/map``, ``val/loss``, ``val/rpn_cls``, ...,
  ``val/ap/<class>``), with its ``epoch`` and ``step``;
* ``best``: the same for the validation with the highest ``monitor``;
* ``epochs``, ``steps``: training progress when the file was written;
* ``train_time_s``: wall-clock seconds of training (all parts of a resumed run);
* ``skipped_steps``: steps skipped for a non-finite loss (``fault.on_nonfinite_loss=skip``);
* ``resumed_from``: the checkpoint a resumed run started from, else null;
* ``checkpoints``: paths of the ``best`` and ``last`` checkpoints;
* ``overrides``: the command-line overrides of the run; ``output_dir``: its folder.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from fasterrcnn.callbacks import LastCheckpoint


def json_safe(value: Any) -> Any:
    """A value for JSON: tensors become numbers and NaN becomes null (JSON has no NaN), also
    inside dicts."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(path: str, data: dict) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def read_metrics(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


class MetricsFile(L.Callback):
    """Keeps ``metrics.json`` up to date after every validation and at the end of the run.

    Its state (``best``, ``final``, training time) travels in the checkpoints, so a resumed run
    keeps what the interrupted part had found.
    """

    def __init__(self, path: str, monitor: str = "val/map", overrides: list[str] | None = None, output_dir: str | None = None) -> None:
        self.path = path
        self.monitor = monitor
        self.start = time.time()
        self.time_before = 0.0  # training seconds of the parts before a resume
        self.data: dict[str, Any] = {
            "status": "running",
            "error": None,
            "monitor": monitor,
            "final": {},
            "best": {},
            "epochs": 0,
            "steps": 0,
            "train_time_s": 0.0,
            "skipped_steps": 0,
            "resumed_from": None,
            "checkpoints": {"best": None, "last": None},
            "overrides": list(overrides or []),
            "output_dir": output_dir,
        }

    def write(self, trainer: L.Trainer | None = None, **updates: Any) -> None:
        self.data.update(updates)
        if trainer is not None:
            self.data["epochs"] = trainer.current_epoch
            self.data["steps"] = trainer.global_step
            self.data["skipped_steps"] = getattr(trainer.lightning_module, "skipped_steps", 0)
            ckpt = trainer.checkpoint_callback
            # last.ckpt is written by fasterrcnn.callbacks.LastCheckpoint, best by ModelCheckpoint.
            last = next((cb.last_model_path for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
            if ckpt is not None:
                last = last or ckpt.last_model_path or None
            self.data["checkpoints"] = {"best": ckpt.best_model_path or None if ckpt is not None else None, "last": last}
        self.data["train_time_s"] = round(self.time_before + time.time() - self.start, 2)
        if rank_zero_only.rank == 0:  # under DDP the file is rank 0's
            write_json(self.path, self.data)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.data["best"], "final": self.data["final"], "train_time_s": self.time_before + time.time() - self.start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data["best"], self.data["final"] = state_dict["best"], state_dict["final"]
        self.time_before = state_dict["train_time_s"]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.time()
        if trainer.is_global_zero:
            self.write(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: json_safe(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not metrics:
            return
        metrics["epoch"] = trainer.current_epoch
        metrics["step"] = trainer.global_step
        self.data["final"] = metrics
        score, best = metrics.get(self.monitor), self.data["best"].get(self.monitor)
        if score is not None and (best is None or score > best):
            self.data["best"] = dict(metrics)
        self.write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.write(trainer, status="interrupted" if trainer.interrupted else "completed")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            interrupted = isinstance(exception, KeyboardInterrupt)
            self.write(trainer, status="interrupted" if interrupted else "failed", error=None if interrupted else repr(exception))
