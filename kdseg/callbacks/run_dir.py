"""Where a run's files go, for every logger, and the guard that keeps earlier runs intact."""

from __future__ import annotations

import secrets
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger


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


def evaluation_log_root(save_dir: Path, name: str, subcommand: str, ckpt_path: str | None) -> Path | None:
    """The ``save_dir`` an evaluation (``validate``/``test``/``predict``) logs into, as
    ``<returned>/<subcommand>/version_N``; None to keep the configured logger.

    - a checkpoint in a run's ``checkpoints/`` folder: that run folder (``runs/x/version_0/test/...``);
    - otherwise ``save_dir/name`` (``runs/x/test/version_N``), beside no training run's ``version_N``;
    - a logger already named after the subcommand (the results runner's ``<run>/test``): kept.
    """
    if name == subcommand:
        return None
    if ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        return Path(ckpt_path).parent.parent
    return Path(save_dir) / name


def remove_unstarted_run_dir(trainer: pl.Trainer | None) -> None:
    """Removes the CSV / TensorBoard run folder of a run that failed before writing anything (bad
    data is found after Lightning creates ``version_N``), and its ``name``/``save_dir`` parents if
    that left them empty; folders holding any file are never touched."""
    logger = getattr(trainer, "logger", None)
    if not isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return
    directory = Path(logger.log_dir)
    for folder in (directory, Path(logger.root_dir), Path(logger.save_dir)):
        if folder.is_dir() and folder.resolve() != Path.cwd().resolve() and not any(folder.iterdir()):
            folder.rmdir()


def name_wandb_run(logger: Logger) -> None:
    """Before W&B starts: the run id (hence the folder ``save_dir/<project>/<id>`` and the offline
    folder) begins with the config's run name, ``<name>-<random>``, so runs can be told apart; and
    ``save_dir`` exists, since W&B looks for a git repository there and warns ("git root runs does
    not exist") when the folder is missing. Uses WandbLogger's private ``_wandb_init``: no public
    way to set the id after construction (Lightning 2.6)."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger) or logger._experiment is not None:
        return
    init = logger._wandb_init
    if init.get("name") and not init.get("id"):
        init["id"] = logger._id = f"{init['name']}-{secrets.token_hex(4)}"
    if logger.save_dir:
        Path(logger.save_dir).mkdir(parents=True, exist_ok=True)
