"""``last.ckpt`` that always holds the latest training state.

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only at the validations
where its top-k checkpoint was saved, i.e. where the monitored metric improved: after a validation
that did not improve, ``last.ckpt`` is an older state, so resuming from it silently loses steps,
and evaluating it is evaluating the best checkpoint. This callback is a second, monitor-free
checkpoint that rewrites ``last.ckpt`` at every save trigger (every validation) and at the end of
training, so "last" means what users expect. :class:`~kdseg.callbacks.interrupt.GracefulInterrupt`
also writes it, through :meth:`LatestCheckpoint.save_latest`, when a signal stops the fit.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class LatestCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``: the state at the latest validation and at the end of ``fit``.

    Args:
        dirpath: the checkpoint folder; None means Lightning's default (the run folder's
            ``checkpoints/``, the same as the best-checkpoint callback's default).
    """

    CHECKPOINT_NAME_LAST = "last"

    def __init__(self, dirpath: str | Path | None = None) -> None:
        super().__init__(
            dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, monitor=None, save_top_k=1,
            save_last=False, enable_version_counter=False, auto_insert_metric_name=False,
        )

    @property
    def state_key(self) -> str:
        # Distinct from the best-checkpoint callback's key, so both states survive a resume.
        return "LatestCheckpoint"

    def save_latest(self, trainer: pl.Trainer) -> str:
        """Writes the current state to ``last.ckpt`` now; returns its path."""
        path = self.format_checkpoint_name(self._monitor_candidates(trainer))
        self._save_checkpoint(trainer, path)
        return path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last steps after the last validation are part of the final state too.
        if trainer.fast_dev_run or self._last_global_step_saved == trainer.global_step:
            return
        self.save_latest(trainer)
