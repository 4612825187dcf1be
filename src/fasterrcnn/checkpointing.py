"""Checkpoints on disk: ``last.ckpt`` always the latest state, Ctrl-C as a clean stop with a
checkpoint, and writes that a kill cannot truncate.

:class:`LastCheckpoint` keeps ``checkpoints/last.ckpt`` the latest state (also mid-epoch) and
turns Ctrl-C into a stop at the end of the current step with that file written;
:class:`AtomicCheckpointIO` writes checkpoints so that a kill during a save never leaves a
truncated one, and reads them with ``torch.load(weights_only=True)``. What a checkpoint must
hold for the resumed run to be exact is :mod:`fasterrcnn.resume`.

Only public Lightning APIs: :meth:`lightning.Trainer.save_checkpoint` and the strategy's
``reduce_boolean_decision``.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def save_full_checkpoint(trainer: L.Trainer, path: str) -> None:
    """``trainer.save_checkpoint`` with everything a resume needs (optimiser, schedule, callbacks).

    ``weights_only=False`` here is Lightning's "save more than the weights", nothing to do with
    ``torch.load``'s flag of the same name: left unset, Lightning logs "`weights_only` was not set,
    defaulting to `False`" at every save, which reads as if the checkpoints were loaded unsafely
    (they are loaded with ``torch.load(weights_only=True)``: :class:`AtomicCheckpointIO`,
    :meth:`fasterrcnn.lit.FasterRCNNModule.load`)."""
    trainer.save_checkpoint(path, weights_only=False)


class LastCheckpoint(Checkpoint):
    """``path`` (the run's ``checkpoints/last.ckpt``) always holds the run's latest state: it is
    written every ``every_n_steps`` training steps (0: never mid-epoch), after each validation
    and when training ends. (Lightning's ModelCheckpoint writes ``last`` after a validation only
    when that validation also saved a top-k checkpoint.)

    Ctrl-C (SIGINT) stops training at the end of the current step and writes ``path`` there, so
    the run resumes exactly; metrics.json says ``interrupted``. A second Ctrl-C stops at once
    without a checkpoint, as does Ctrl-C during validation (an evaluation cut short has nothing
    to resume from): the previous ``last.ckpt`` stays. Under DDP only rank 0 listens to SIGINT
    and every rank learns of it at the end of the same step (one boolean all-reduce per step, as
    Lightning itself broadcasts its SIGTERM flag every step), so they all save and stop together.

    A :class:`Checkpoint`, so Lightning runs it after the other callbacks (its checkpoints then
    hold their states after the same hook); list it after the best-model ModelCheckpoint.
    """

    def __init__(self, path: str, every_n_steps: int = 0) -> None:
        self.path = path
        self.every_n_steps = every_n_steps
        self.last_model_path: str | None = None
        self.requested = False
        self._saved_step = -1
        self._previous: Any = None

    def _save(self, trainer: L.Trainer) -> None:
        save_full_checkpoint(trainer, self.path)
        self.last_model_path, self._saved_step = self.path, trainer.global_step

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        """Whether Ctrl-C was pressed, the same answer on every rank (rank 0's)."""
        if trainer.world_size == 1:
            return self.requested
        return trainer.strategy.reduce_boolean_decision(self.requested, all=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stop_requested(trainer):
            # The state a periodic checkpoint of this step would hold.
            self._save(trainer)
            rank_zero_info(f"Ctrl-C: saved {self.path} at step {trainer.global_step}")
            raise KeyboardInterrupt(f"Ctrl-C at step {trainer.global_step}")
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saved_step != trainer.global_step:
            self._save(trainer)

    # ------------------------------------------------------------------ Ctrl-C
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again: stop now, without one)", flush=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if os.path.isfile(self.path):  # a resumed run
            self.last_model_path = self.path
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        handler = self._on_sigint if trainer.global_rank == 0 else signal.SIG_IGN
        self._previous = signal.signal(signal.SIGINT, handler)

    def _restore_sigint(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"Ctrl-C during validation at step {trainer.global_step}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_sigint()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to ``<path>.tmp`` and renames it, so a run killed during a save keeps
    its previous checkpoint instead of a truncated one; reads one (``ckpt_path``, a resume) with
    ``torch.load(weights_only=True)`` unless told otherwise, so a resumed checkpoint cannot run
    code either."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        tmp = f"{path}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True if weights_only is None else weights_only)
