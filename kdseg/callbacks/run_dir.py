"""Where a run's files go, for every logger, and the guard that keeps earlier runs intact."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_dir(trainer: pl.Trainer) -> Path:
    """The run's own folder: the CSV / TensorBoard version folder, ``save_dir/name/version`` for
    other loggers (W&B: ``runs/<project>/<run id>``, where Lightning also puts checkpoints), or
    ``default_root_dir`` without a logger (e.g. ``fast_dev_run``)."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return Path(logger.log_dir)
    save_dir = logger.save_dir or trainer.default_root_dir
    return Path(save_dir) / str(logger.name) / str(logger.version)


def ensure_new_run_dir(directory: Path) -> None:
    """Refuses to start in a run folder that already holds files (e.g. a config pinning
    ``logger.version``): Lightning would overwrite its metrics and checkpoints."""
    if directory.is_dir() and any(directory.iterdir()):
        raise FileExistsError(
            f"{directory}: this run folder already holds an earlier run's files; pick another "
            "logger version / save_dir (kdseg never overwrites a run)"
        )
