"""``metrics.json``: every run's summary, read by sweeps, scripts and people.

Keys (stable; documented in the README):

* ``status``: ``running``, ``completed``, ``failed`` or ``interrupted``;
* ``error``: the error message of a failed run, else null;
* ``monitor``: the metric that picks the best checkpoint (``val/map``); null under
  ``selection=none``, where nothing is picked and ``best`` is the final model;
* ``selected_on``: the sets whose validations picked ``best`` and the best checkpoint,
  ``{"sets": ["VOC2007/test"], "is_test": true}``; ``is_test`` says they are the test sets too,
  so ``best`` is optimistic about the test result; null under ``selection=none``;
* ``final``: the metrics of the last validation (``val/map``, ``val/loss``, ``val/rpn_cls``, ...,
  ``val/ap/<class>``), with its ``epoch`` and ``step``;
* ``best``: the same for the validation with the highest ``monitor``;
* ``epochs``, ``steps``: training progress when the file was written;
* ``train_time_s``: wall-clock seconds of training (all parts of a resumed run);
* ``threads``: the CPU threads the run used (``threads=auto``: :mod:`fasterrcnn.threads`);
* ``time_s``: the wall clock split into ``startup`` (the run's start, ``src/train.py``'s first line, to the fit: imports, data
  generation, checks), ``training`` (the training loop less its validations), ``validation``
  (every validation loop) and ``total`` (since the run's start);
* ``skipped_steps``: steps skipped for a non-finite loss (``fault.on_nonfinite_loss=skip``);
* ``skipped_samples``: bad samples left out under ``data.on_bad_sample=skip``, per stage and
  problem kind, ``{"train": {"missing_image": 2, "unreadable_image": 1}, "val": {}, "test": {}}``
  (the DataModule's ``skipped_by_kind``: dropped in setup, or replaced while reading; under DDP
  the reading part is rank 0's share, and after a resume the part since the resume); also
  logged at the end of training as ``skipped_samples/<stage>`` and
  ``skipped_samples/<stage>/<kind>``;
* ``warnings``: what went wrong without stopping the run, one dict each with ``kind``,
  ``step`` and ``message``; ``kind`` ``diverging_loss``: a training loss that grew without
  bound but stayed finite (by default above 10 x its early median, or above 1e4:
  :class:`fasterrcnn.callbacks.DivergenceWarning`), with its ``loss``; [] when none;
* ``resumed_from``: the checkpoint a resumed run started from, else null;
* ``anchor_fit``: under ``anchor=auto`` the fitted anchors and their coverage before and after
  (:mod:`fasterrcnn.analysis.anchor_fit`), else absent;
* ``init_from``: a fine-tuning run's start (:mod:`fasterrcnn.finetune`), else null:
  ``{"path", "loaded": <tensors copied whole>, "class_specific": [<tensors mapped by row>],
  "mapped": {class: [checkpoint label, this run's label]}, "reinitialised": [classes],
  "dropped": [the checkpoint's classes not in this run], "source_classes": [...]}``; kept
  across a resume (it is in the checkpoints);
* ``checkpoints``: paths of the ``best`` and ``last`` checkpoints;
* ``overrides``: the command-line overrides of the run; ``output_dir``: its folder.

:func:`read_run` and :func:`find_runs` read the files back (a run folder, a Hydra sweep folder).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from fasterrcnn.callbacks import DivergenceWarning
from fasterrcnn.checkpointing import LastCheckpoint


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


MISSING = "missing"  # the status of a run folder without a (readable) metrics.json


@dataclass
class Run:
    """One run's ``metrics.json`` as read back; ``num`` is its job number in a sweep."""

    num: int | None
    path: Path
    status: str
    error: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    epochs: int | None = None
    train_time_s: float | None = None
    selected_on: dict[str, Any] | None = None


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["anchor=k9", "+x=1", "~y"]`` -> ``{"anchor": "k9", "x": "1", "~y": ""}`` (order kept)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if key.startswith("~"):  # a deletion: keep the marker, it is part of what the run did
            out[str(item) if not sep else key] = value
            continue
        out[key.lstrip("+")] = value
    return out


def _hydra_overrides(folder: Path) -> list[str]:
    import yaml  # PyYAML comes with omegaconf

    path = folder / ".hydra" / "overrides.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    return [str(x) for x in data] if isinstance(data, list) else []


def read_run(folder: str | os.PathLike, num: int | None = None) -> Run:
    """The run in ``folder``: its ``metrics.json`` or, where the run was killed before writing
    one, status ``missing`` with the overrides from Hydra's ``.hydra/overrides.yaml``."""
    folder = Path(folder)
    data, error = None, None
    if (folder / "metrics.json").is_file():
        try:
            data = read_metrics(str(folder / "metrics.json"))
        except (OSError, ValueError) as err:
            error = f"unreadable metrics.json: {err}"
    if not isinstance(data, dict):
        error = error or "no metrics.json (killed before training started?)"
        return Run(num, folder, MISSING, error=error, overrides=parse_overrides(_hydra_overrides(folder)))
    overrides = data.get("overrides")
    return Run(
        num,
        folder,
        status=str(data.get("status") or "unknown"),
        error=data.get("error"),
        overrides=parse_overrides(_hydra_overrides(folder) if overrides is None else overrides),
        best=data.get("best") or {},
        final=data.get("final") or {},
        steps=data.get("steps"),
        epochs=data.get("epochs"),
        train_time_s=data.get("train_time_s"),
        selected_on=data.get("selected_on"),
    )


def find_runs(sweep: str | os.PathLike) -> list[Run]:
    """The runs of a Hydra sweep folder (one folder per job, named by its job number, holding a
    ``metrics.json`` or ``.hydra/``), sorted by job number; [] when there are none."""
    sweep = Path(sweep)
    dirs = [p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()] if sweep.is_dir() else []
    dirs = [p for p in dirs if (p / "metrics.json").is_file() or (p / ".hydra").is_dir()]
    return [read_run(p, int(p.name)) for p in sorted(dirs, key=lambda p: int(p.name))]


def process_start_time() -> float:
    """When this process started (epoch seconds), from ``/proc`` where there is one, else now."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class MetricsFile(L.Callback):
    """Keeps ``metrics.json`` up to date after every validation and at the end of the run.

    Its state (``best``, ``final``, training time) travels in the checkpoints, so a resumed run
    keeps what the interrupted part had found.
    """

    def __init__(
        self,
        path: str,
        monitor: str | None = "val/map",
        overrides: list[str] | None = None,
        output_dir: str | None = None,
        selected_on: dict[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.monitor = monitor
        self.start = time.time()
        self.time_before = 0.0  # training seconds of the parts before a resume
        self.process_start = process_start_time()
        self.fit_start: float | None = None
        self.train_start: float | None = None
        self.validation_start: float | None = None
        self.validation_s = 0.0  # this part's validation loops (the sanity check and the last validate included)
        self.validation_in_training = 0.0
        self.train_end: float | None = None
        self.times_before = {"training": 0.0, "validation": 0.0}
        self.data: dict[str, Any] = {
            "status": "running",
            "error": None,
            "monitor": monitor,
            "selected_on": selected_on if monitor is not None else None,
            "final": {},
            "best": {},
            "epochs": 0,
            "steps": 0,
            "train_time_s": 0.0,
            "threads": None,
            "time_s": {"startup": None, "training": 0.0, "validation": 0.0, "total": None},
            "skipped_steps": 0,
            "skipped_samples": {"train": {}, "val": {}, "test": {}},
            "warnings": [],
            "resumed_from": None,
            "init_from": None,
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
            skipped = getattr(trainer.datamodule, "skipped_by_kind", None)  # fasterrcnn.data.VOCDataModule
            if skipped is not None:
                self.data["skipped_samples"] = {stage: dict(kinds) for stage, kinds in skipped.items()}
            self.data["warnings"] = [dict(w) for cb in trainer.callbacks if isinstance(cb, DivergenceWarning) for w in cb.warnings]
            ckpt = trainer.checkpoint_callback
            # last.ckpt is written by fasterrcnn.checkpointing.LastCheckpoint, best by ModelCheckpoint.
            last = next((cb.last_model_path for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
            if ckpt is not None:
                last = last or ckpt.last_model_path or None
            self.data["checkpoints"] = {"best": ckpt.best_model_path or None if ckpt is not None else None, "last": last}
        self.data["train_time_s"] = round(self.time_before + time.time() - self.start, 2)
        self.data["time_s"] = self.time_split()
        if rank_zero_only.rank == 0:  # under DDP the file is rank 0's
            write_json(self.path, self.data)

    def time_split(self) -> dict[str, float | None]:
        """Wall-clock seconds of the run: ``startup`` (the process start to the fit: imports,
        data generation and checks, building), ``validation`` (every validation loop, the
        sanity check and the last validate included), ``training`` (the training loop less the
        validations inside it) and ``total`` (the process so far); training and validation add
        up over the parts of a resumed run."""
        now = time.time()
        running = now - self.validation_start if self.validation_start is not None else 0.0
        training = 0.0
        if self.train_start is not None:
            training = (self.train_end or now) - self.train_start - self.validation_in_training - (running if self.train_end is None else 0.0)
        startup = self.fit_start - self.process_start if self.fit_start is not None else None
        return {
            "startup": None if startup is None else round(startup, 2),
            "training": round(self.times_before["training"] + max(training, 0.0), 2),
            "validation": round(self.times_before["validation"] + self.validation_s + running, 2),
            "total": round(now - self.process_start, 2),
        }

    def state_dict(self) -> dict[str, Any]:
        split = self.time_split()
        return {
            "best": self.data["best"],
            "final": self.data["final"],
            "init_from": self.data.get("init_from"),
            "train_time_s": self.time_before + time.time() - self.start,
            "time_s": {"training": split["training"], "validation": split["validation"]},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.data["best"], self.data["final"] = state_dict["best"], state_dict["final"]
        self.data["init_from"] = state_dict.get("init_from")  # None in checkpoints from before fine-tuning
        self.time_before = state_dict["train_time_s"]
        self.times_before = dict(state_dict.get("time_s", self.times_before))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.time()
        self.fit_start = self.start
        if trainer.is_global_zero:
            self.write(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_start = time.time()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validation_start = time.time()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.validation_start is not None:
            seconds = time.time() - self.validation_start
            self.validation_s += seconds
            if self.train_start is not None and self.train_end is None:
                self.validation_in_training += seconds
            self.validation_start = None
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: json_safe(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "val_shift/"))}
        if not metrics:
            return
        metrics["epoch"] = trainer.current_epoch
        metrics["step"] = trainer.global_step
        self.data["final"] = metrics
        score, best = metrics.get(self.monitor), self.data["best"].get(self.monitor)
        if self.monitor is None or (score is not None and (best is None or score > best)):
            self.data["best"] = dict(metrics)
        self.write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_end = time.time()
        if trainer.is_global_zero:
            self.write(trainer, status="interrupted" if trainer.interrupted else "completed")
            self.log_skipped_samples(trainer)

    def log_skipped_samples(self, trainer: L.Trainer) -> None:
        """``skipped_samples`` to the loggers: ``skipped_samples/<stage>`` (0 when none) and
        ``skipped_samples/<stage>/<kind>``."""
        values = {}
        for stage, kinds in self.data["skipped_samples"].items():
            values[f"skipped_samples/{stage}"] = float(sum(kinds.values()))
            values.update({f"skipped_samples/{stage}/{kind}": float(count) for kind, count in kinds.items()})
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            interrupted = isinstance(exception, KeyboardInterrupt)
            self.write(trainer, status="interrupted" if interrupted else "failed", error=None if interrupted else repr(exception))
