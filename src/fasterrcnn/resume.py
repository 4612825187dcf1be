"""Exact resume: what a checkpoint must hold, besides Lightning's own state, for a killed run to
go on exactly as if it had never stopped.

Lightning's checkpoint has the weights, the optimiser, the LR schedule and the loops' counters
(epoch, batch, global step). Three things it leaves out are added here:

* the random number generators (torch, CUDA, Python, NumPy): the anchor and RoI sampling draw
  from them, so without them a resumed run samples differently (:class:`ExactResume`);
* where the epoch's data order stands: a plain DataLoader restarts a resumed epoch at its first
  batch, in a new order. :class:`ResumableLoader` draws each epoch's order from ``seed + epoch``
  and starts a resumed epoch where the checkpoint left it;
* the data augmentation's random draws: the sampler hands the dataset ``(epoch, index)`` pairs,
  so ``rng: item`` augmentation (``augment=light|strong``) draws image ``index`` of ``epoch`` from
  its own ``(seed, epoch, index)`` stream in whatever process loads it; and each training batch
  is loaded with the torch generator seeded from ``(seed, epoch, batch)``, so the paper's flip
  (``rng: global``) does not depend on when the batch was fetched (Lightning prefetches one
  batch: at a checkpoint the next batch is already loaded).

:class:`ExactResume` keeps its state through Lightning's public callback state
(``state_dict``/``load_state_dict``, saved in every checkpoint). Writing the checkpoints
(``last.ckpt`` every N steps, atomically, and at Ctrl-C) is :mod:`fasterrcnn.checkpointing`.

With ``data.num_workers=0`` (the CPU default) a resumed run is bit-for-bit the run that was not
interrupted (tests/test_faults.py, ``augment=paper`` and ``augment=strong``). With workers,
``rng: item`` augmentation still draws exactly what the main process would
(tests/test_augment_wiring.py); ``augment=paper``'s flips are then drawn from the workers'
generators and a resumed epoch flips differently. Weights, optimiser, schedule and data order
resume exactly either way. Under DDP every rank resumes with rank 0's RNG state (the checkpoint is rank 0's).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
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
    Lightning keeps it under DDP instead of putting its own in its place.

    It yields ``(epoch, index)`` pairs (:class:`fasterrcnn.data.dataset.DetectionDataset` takes
    both): DataLoader workers, persistent ones included, receive the epoch with each index
    instead of a copy of the dataset made before the epoch was set."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self):
        # The order of epoch e is randperm(seed + e), whatever happened before (DistributedSampler).
        return iter([(self.epoch, index) for index in list(super().__iter__())[self.start :]])


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


# ---------------------------------------------------------------------- the callback
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
