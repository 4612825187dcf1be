"""How many CPU threads a run uses, on an idle or a busy machine.

On a 2-core machine a training step with 2 OpenMP threads is fastest while the machine is
idle, and several times slower when another CPU-bound process runs: each parallel region ends
at a barrier, and the thread whose core is taken makes the other wait (spinning, by default,
which takes CPU from the competitor and from us). Two parts:

* :func:`passive_wait_policy` (``OMP_WAIT_POLICY=PASSIVE`` unless the user set it), called by
  the entry points before torch starts: a waiting thread sleeps instead of spinning;
* :class:`ThreadGovernor` (``trainer_threads: auto``): training measures its own steps and,
  every ``every_n_steps``, tries one thread fewer (or more) for ``trial_steps``, keeping the
  faster count. An idle machine keeps all threads (the trial costs a few slower steps); a busy
  one drops to the count that is fastest under the load, and comes back when the load goes.

The figures are in docs/speed.md ("A busy machine").
"""

from __future__ import annotations

import os
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def passive_wait_policy() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` for this process, unless set; effective only before the
    OpenMP runtime starts (import torch after this)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def resolve_threads(threads: int | str | None) -> int | None:
    """``trainer_threads`` as a count: an int is used as it is, ``auto``/None leave torch's
    default (the governor adjusts it in training)."""
    if threads in (None, "auto"):
        return None
    count = int(threads)
    if count < 1:
        raise ValueError(f"trainer_threads must be a positive integer or 'auto', not {threads!r}")
    return count


class ThreadGovernor(L.Callback):
    """Chooses the number of intra-op threads of training by measuring steps.

    Args:
        every_n_steps: how often the other count is tried.
        trial_steps: steps measured for each count (the first step after a change is not
            counted: it warms the new thread pool).
        max_threads: the most threads to use (default: torch's count at the start).
    """

    def __init__(self, every_n_steps: int = 200, trial_steps: int = 10, max_threads: int | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.trial_steps = trial_steps
        self.max_threads = max_threads
        self.threads = 0
        self._times: dict[int, list[float]] = {}
        self._trial: int | None = None  # the count on trial, when one runs
        self._skip = 0
        self._start = 0.0
        self.history: list[tuple[int, int, float, float]] = []  # (step, kept, kept median s, other median s)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.max_threads = self.max_threads or torch.get_num_threads()
        self.threads = self.max_threads
        torch.set_num_threads(self.threads)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._start
        current = torch.get_num_threads()
        if self._skip:
            self._skip -= 1
        else:
            samples = self._times.setdefault(current, [])
            samples.append(elapsed)
            del samples[: -self.trial_steps]  # the latest steps only
        if self.max_threads is None or self.max_threads < 2:
            return
        step = trainer.global_step
        if self._trial is None and step > 0 and step % self.every_n_steps == 0:
            self._trial = self.threads - 1 if self.threads > 1 else self.threads + 1
            self._times[self._trial] = []
            self._switch(self._trial)
        elif self._trial is not None and len(self._times.get(self._trial, [])) >= self.trial_steps:
            kept, trial = self._times.get(self.threads, []), self._times[self._trial]
            kept_median, trial_median = (statistics.median(kept) if kept else float("inf")), statistics.median(trial)
            if trial_median < kept_median:
                rank_zero_info(f"threads: {self._trial} instead of {self.threads} ({trial_median * 1e3:.0f} vs {kept_median * 1e3:.0f} ms a step)")
                self.threads = self._trial
            self.history.append((step, self.threads, min(kept_median, trial_median), max(kept_median, trial_median)))
            self._trial = None
            self._switch(self.threads)

    def _switch(self, count: int) -> None:
        torch.set_num_threads(count)
        self._skip = 1
