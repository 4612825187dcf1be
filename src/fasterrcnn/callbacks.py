"""The run's callbacks from the ``callbacks`` config group (``conf/callbacks/default.yaml``), and
the diverging-loss warning.

Each callback is a ``_target_`` node of ``cfg.callbacks``, in the order Lightning is given them
(as lightning-hydra-template's ``instantiate_callbacks``); ``callbacks.<name>=null`` leaves one
out. Objects known only at run time (``MetricsFile``'s overrides, the monitor that
``selection`` picks) are passed by name as keyword arguments. The config tree is the project's
own ``conf/`` with command-line overrides: these targets are not an untrusted file's (a
checkpoint's config never reaches here; see :mod:`fasterrcnn.build` for those).

Where the others live: exact resume in :mod:`fasterrcnn.resume`, ``last.ckpt`` and Ctrl-C in
:mod:`fasterrcnn.checkpointing`, ``metrics.json`` in :mod:`fasterrcnn.metrics_file`, the image
panel and PR curves in :mod:`fasterrcnn.dashboards`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from omegaconf import DictConfig


def instantiate_callbacks(cfg: DictConfig | Mapping | None, runtime: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, L.Callback]:
    """The callbacks of ``cfg`` (``cfg.callbacks``: name -> ``_target_`` node or null), by name,
    in their config order.

    Args:
        runtime: ``{name: {argument: value}}``, keyword arguments for the named callbacks that
            only the run knows (they override the node's values). A name not in ``cfg`` (or
            null there) is ignored, so a callback removed from the config needs no special case.

    Raises:
        ValueError: a node without ``_target_``.
    """
    runtime = runtime or {}
    out: dict[str, L.Callback] = {}
    for name, node in (cfg or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ValueError(f"callbacks.{name}: a callback node needs a _target_ (or null to leave it out), got {node}")
        out[str(name)] = instantiate(node, **runtime.get(str(name), {}))
    return out


class DivergenceWarning(L.Callback):
    """Warns once when the training loss grows without bound while staying finite (a NaN or an
    infinity is ``fault.on_nonfinite_loss``'s), and records it in ``metrics.json``'s
    ``warnings``.

    The loss is looked at every ``every_n_steps`` steps only (the steps the logger records): the
    step has already waited for its loss (the non-finite check), so reading it costs no extra
    host sync, and other steps read nothing. The first ``window`` looked-at losses set the
    baseline (their median); afterwards a loss above ``factor`` x that baseline warns, and at any
    step a loss above ``max_loss``. Under DDP rank 0's loss is watched. Its state (the baseline,
    whether it warned) is in the checkpoints, so a resumed run warns as the uninterrupted one.

    Args:
        every_n_steps: look at the loss of every N-th global step (``trainer.log_every_n_steps``).
        window: losses in the baseline.
        factor: a loss above ``factor`` x the baseline is diverging.
        max_loss: a loss above this is diverging, whatever the baseline (null: no bound).
    """

    def __init__(self, every_n_steps: int = 20, window: int = 5, factor: float = 10.0, max_loss: float | None = 1.0e4) -> None:
        if every_n_steps < 1 or window < 1 or factor <= 1:
            raise ValueError(f"DivergenceWarning: every_n_steps and window must be >= 1 and factor > 1, not {every_n_steps}, {window}, {factor}")
        self.every_n_steps = every_n_steps
        self.window = window
        self.factor = factor
        self.max_loss = max_loss
        self.early: list[float] = []  # the first `window` losses looked at
        self.warnings: list[dict[str, Any]] = []  # for metrics.json (fasterrcnn.metrics_file.MetricsFile)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.warnings or not trainer.is_global_zero or trainer.global_step % self.every_n_steps:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # a skipped step (fault.on_nonfinite_loss=skip)
        value = float(loss)
        baseline = statistics.median(self.early) if len(self.early) >= self.window else None
        if baseline is None:
            self.early.append(value)
        reason = None
        if self.max_loss is not None and value > self.max_loss:
            reason = f"above {self.max_loss:g}"
        elif baseline is not None and value > self.factor * baseline:
            reason = f"above {self.factor:g} x {baseline:.4g}, the median of the first {self.window} losses looked at"
        if reason is None:
            return
        message = (
            f"the training loss is diverging: {value:.4g} at global step {trainer.global_step} (epoch {trainer.current_epoch}), {reason}."
            " The run goes on; a lower optim.lr (or optim.warmup_steps) usually cures it."
        )
        self.warnings.append({"kind": "diverging_loss", "step": trainer.global_step, "loss": value, "message": message})
        rank_zero_warn(message)

    def state_dict(self) -> dict[str, Any]:
        return {"early": list(self.early), "warnings": [dict(w) for w in self.warnings]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.early = list(state_dict["early"])
        self.warnings = [dict(w) for w in state_dict["warnings"]]
