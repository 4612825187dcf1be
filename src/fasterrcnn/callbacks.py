"""Faults: what a checkpoint must hold for a killed run to go on exactly, and Ctrl-C.

Lightning's checkpoint has the weights, the optimiser, the LR schedule and the loops' counters
(epoch, batch, global step). Three things it leaves out are added here:

* the random number generators (torch, CUDA, Python, NumPy): the anchor and RoI sampling draw
  from them, so without them a resumed run samples differently (:class:`ExactResume`);
* where the epoch's data order stands: a plain DataLoader restarts a resumed epoch at its first
  batch, in a new order. :class:`ResumableLoader` draws each epoch's order from ``seed + epoch``
  and starts a resumed epoch where the checkpoint left it;
* the data augmentation's random draws: each training batch is loaded with the torch generator
  seeded from ``(seed, epoch, batch)``, so a flip does not depend on when the batch was fetched
  (Lightning prefetches one batch: at a checkpoint the next batch is already loaded).

:class:`LastCheckpoint` keeps ``checkpoints/last.ckpt`` the latest state (also mid-epoch) and
turns Ctrl-C into a stop at the end of the current step with that file written;
:class:`AtomicCheckpointIO` writes checkpoints so that a kill during a save never leaves a
truncated one.

With ``data.num_workers=0`` (the CPU default) a resumed run is bit-for-bit the run that was not
interrupted (tests/test_faults.py). With workers the flips are drawn in the worker processes
and a resumed epoch flips differently; weights, optimiser, schedule and data order still resume
exactly. Under DDP every rank resumes with rank 0's RNG state (the checkpoint is rank 0's).
"""

from __future__ import annotations

import os
import random
import signal
import threading
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler


# ---------------------------------------------------------------------- RNG states
def rng_states() -> dict[str, Any]:
    """The states of every generator a training step may draw from, as tensors and tuples only
    (checkpoints are loaded with ``weights_only=True``)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------------- data order
class ResumableSampler(DistributedSampler):
    """A :class:`DistributedSampler` (one replica without DDP) that can start its epoch at any
    sample: ``start`` samples of this replica's order are left out. Being a DistributedSampler,
    Lightning keeps it under DDP instead of putting its own in its place."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self):
        # The order of epoch e is randperm(seed + e), whatever happened before (DistributedSampler).
        return iter(list(super().__iter__())[self.start :])


class ResumableLoader(DataLoader):
    """The training DataLoader of a run that can be killed and resumed exactly.

    ``position`` (the run's :class:`ExactResume`) says where a resumed epoch starts; each batch is
    loaded under the torch generator seeded from ``(seed, epoch, batch index)``.
    """

    def __init__(self, *args: Any, position: ExactResume | None = None, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position
        self.seed = seed

    @classmethod
    def wrap(cls, loader: DataLoader, position: ExactResume | None, seed: int) -> ResumableLoader:
        """The same loader (dataset, batch size, collate, workers) with a resumable order."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler = ResumableSampler(
            loader.dataset,
            num_replicas=torch.distributed.get_world_size() if distributed else 1,
            rank=torch.distributed.get_rank() if distributed else 0,
            shuffle=isinstance(loader.sampler, RandomSampler),
            seed=seed,
        )
        return cls(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            persistent_workers=loader.persistent_workers,
            # Its own generator for the workers' base seed, which DataLoader otherwise draws from
            # the global generator each epoch (and a resumed run starts fewer epochs).
            generator=torch.Generator().manual_seed(seed),
            position=position,
            seed=seed,
        )

    def _batch_seed(self, epoch: int, index: int) -> int:
        return (self.seed * 1_000_003 + epoch * 100_003 + index) % (2**63)

    def __iter__(self):
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        epoch, start = sampler.epoch, 0
        if self.position is not None:
            epoch, start = self.position.take_start(sampler.epoch)
        # Lightning sets the epoch only after it made the first iterator of a resumed fit.
        sampler.set_epoch(epoch)
        sampler.start = start * (self.batch_size or 1)
        iterator = super().__iter__()
        index = start
        while True:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._batch_seed(epoch, index))
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
            yield batch
            index += 1

    # Lightning saves a "stateful" loader's state and warns about resuming mid-epoch with any
    # other. The position itself is kept by ExactResume, which alone sees which batches were
    # trained (the loader has already handed out the prefetched one).
    def state_dict(self) -> dict[str, Any]:
        return {} if self.position is None else {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


# ---------------------------------------------------------------------- callbacks
class ExactResume(L.Callback):
    """Saves the RNG states and the data position in every checkpoint; a resumed fit restores the
    RNG states just before its first step and starts the data where the checkpoint left it."""

    def __init__(self) -> None:
        self.epoch, self.batch = 0, 0  # where the data order goes on: epoch, batch index
        self._resume: tuple[int, int] | None = None
        self._rng: dict[str, Any] | None = None

    def take_start(self, epoch: int) -> tuple[int, int]:
        """``(epoch, first batch)`` for the loader's next iterator: the checkpoint's position once
        after a resume, else ``(epoch, 0)``."""
        start, self._resume = self._resume, None
        return start if start is not None else (epoch, 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            self.epoch, self.batch = trainer.current_epoch + 1, 0
        else:
            self.epoch, self.batch = trainer.current_epoch, batch_idx + 1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the model was built and the first batch fetched: from here on a resumed run
        # draws what the uninterrupted one drew after the checkpoint.
        if self._rng is not None:
            set_rng_states(self._rng)
            self._rng = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch, self.batch = state_dict["epoch"], state_dict["batch"]
        self._resume = (self.epoch, self.batch)
        self._rng = state_dict["rng"]


class LastCheckpoint(Checkpoint):
    """``path`` (the run's ``checkpoints/last.ckpt``) always holds the run's latest state: it is
    written every ``every_n_steps`` training steps (0: never mid-epoch), after each validation
    and when training ends. (Lightning's ModelCheckpoint writes ``last`` after a validation only
    when that validation also saved a top-k checkpoint.)

    Ctrl-C (SIGINT) stops training at the end of the current step and writes ``path`` there, so
    the run resumes exactly; metrics.json says ``interrupted``. A second Ctrl-C stops at once
    without a checkpoint, as does Ctrl-C during validation (an evaluation cut short has nothing
    to resume from): the previous ``last.ckpt`` stays. Under DDP only rank 0 listens to SIGINT;
    the launcher stops the other ranks.

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
        trainer.save_checkpoint(self.path)
        self.last_model_path, self._saved_step = self.path, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.requested:
            # The state a periodic checkpoint of this step would hold. Not trainer.save_checkpoint:
            # its barrier would wait for DDP ranks that are not stopping.
            trainer.strategy.save_checkpoint(trainer._checkpoint_connector.dump_checkpoint(), self.path)
            self.last_model_path = self.path
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
    its previous checkpoint instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        tmp = f"{path}.tmp"
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)
