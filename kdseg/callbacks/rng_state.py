"""Global random states in every checkpoint, so that a resumed fit draws the same numbers.

Training draws from the global generators at every step: the weak augmentation of each slice in
the data loader (``torch``, in the main process when ``num_workers: 0``), the input noise of Mean
Teacher / UA-MT / ScribSD+, the views of MMT-PSM, dropout. Lightning's checkpoint holds the
weights, optimizer, schedulers, loop counters and (for ``StatefulDataLoader``) the loaders'
positions and shuffling generators, but not these global states: without them a resumed fit
continues the same batches with different augmentations and noise.

The states are taken when the checkpoint is written and put back at ``on_train_start``, i.e.
after Lightning has restored everything else and created the loaders' iterators (creating an
iterator draws its worker base seed from the global generator), right before the first batch.
With ``num_workers > 0`` the workers' generators live in other processes and are not captured:
exact resume is for ``num_workers: 0`` (with workers, batches and positions still resume).

A checkpoint written after an epoch's last batch also needs fresh loader iterators for the next
epoch (see :meth:`RNGStateCheckpoint.on_train_start`); this reaches into Lightning 2.6's fit loop
(``fit_loop._data_fetcher``), so ``tests/test_faults_resume.py`` guards it across upgrades.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch


def capture_rng_states() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's legacy global generator, torch's CPU generator
    and (when initialised) every CUDA device's generator."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        # Tensors and Python scalars only: Lightning's CLI reads checkpoints with weights_only=True.
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states` (a CUDA state is restored only where CUDA is up)."""
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "torch_cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch_cuda"])


class RNGStateCheckpoint(pl.Callback):
    """Saves the global random states with each checkpoint; a resumed fit restores them."""

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "RNGStateCheckpoint"

    def state_dict(self) -> dict[str, Any]:
        # Called by trainer.save_checkpoint: the states at the moment of saving.
        return {"rng_states": capture_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied later (on_train_start): loader and iterator creation still draw in between.
        self._to_restore = state_dict.get("rng_states")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._to_restore is None:
            return
        restore_rng_states(self._to_restore)
        self._to_restore = None
        loop = trainer.fit_loop
        at_epoch_end = loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches
        if at_epoch_end and loop._data_fetcher is not None:
            # Saved after an epoch's last batch: the restored iterators are spent but have not
            # raised StopIteration yet; Lightning would reuse them for the next epoch, where
            # max_size_cycle restarts the labeled stream (drawing one permutation) and then ends
            # the epoch at once. The uninterrupted run starts the next epoch with fresh
            # iterators: do the same, after the states above (each iterator draws a seed).
            iter(loop._data_fetcher)
