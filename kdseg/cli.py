"""The ``kdseg`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

Model and data are chosen by ``class_path`` (any method with any compatible data module);
experiments live in ``experiments/`` as config files, composable (later files override earlier
ones, e.g. ``--config experiments/acdc/mean_teacher.yaml --config experiments/profiles/cpu.yaml``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from kdseg.callbacks.atomic_io import AtomicCheckpointIO
from kdseg.callbacks.interrupt import GracefulInterrupt
from kdseg.callbacks.latest_checkpoint import LatestCheckpoint
from kdseg.callbacks.prediction_writer import VolumePredictionWriter
from kdseg.callbacks.rng_state import RNGStateCheckpoint
from kdseg.callbacks.run_dir import ensure_new_run_dir, run_dir
from kdseg.data.volume import DataError


class RunConfigSaver(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's own folder (for every logger,
    W&B included) and refuses to overwrite one."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Without a logger there is no run folder of its own to keep the config in.
        if self.already_saved or trainer.fast_dev_run or trainer.logger is None:
            return
        directory = run_dir(trainer)
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            target = directory / self.config_filename
            if target.exists():
                raise FileExistsError(f"{target} exists: kdseg never overwrites a run's config")
            self.parser.save(self.config, target, skip_none=False, overwrite=False, multifile=self.multifile)
        self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class KdsegCLI(LightningCLI):
    """Adds the best-by-validation-Dice checkpoint, the prediction writer and run-folder guards."""

    def add_arguments_to_parser(self, parser) -> None:  # type: ignore[no-untyped-def]
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/dice_mean",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-step{step}-dice{val/dice_mean:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(VolumePredictionWriter, "prediction_writer")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        # `--trainer.enable_checkpointing false` means no checkpoint: drop the default one.
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        # `checkpoint.save_last`: last.ckpt is written by LatestCheckpoint (the latest state),
        # not by Lightning's save_last, which keeps the state of the latest *improvement*.
        best = next((c for c in callbacks if type(c) is ModelCheckpoint), None)
        latest = None
        if best is not None and best.save_last:
            best.save_last = False
            latest = LatestCheckpoint(best.dirpath)
            callbacks = [*callbacks, latest]
        # Exact resume (global random states) and SIGTERM/SIGINT -> last.ckpt + exit 143/130.
        callbacks = [*callbacks, RNGStateCheckpoint(), GracefulInterrupt(latest)]
        # Every checkpoint is written atomically (a kill while saving keeps the previous file).
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config = {**config, "plugins": [*plugins, AtomicCheckpointIO()]}
        return super()._instantiate_trainer(config, callbacks)

    def before_fit(self) -> None:
        trainer = self.trainer
        if trainer.fast_dev_run:
            return
        if trainer.logger is not None:  # without a logger only checkpoints are written (checked below)
            ensure_new_run_dir(run_dir(trainer))
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath is not None:
            dirpath = Path(checkpoint.dirpath)
            if dirpath.is_dir() and any(dirpath.glob("*.ckpt")):
                raise FileExistsError(
                    f"{dirpath} already holds checkpoints of an earlier run: set another "
                    "--checkpoint.dirpath (kdseg never overwrites checkpoints)"
                )


    def after_fit(self) -> None:
        """Prints the validation Dice the run reached and where its best checkpoint is."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        dice = trainer.callback_metrics.get("val/dice_mean")
        lines = [f"kdseg: run folder {run_dir(trainer)}"]
        if dice is not None:
            lines.append(f"kdseg: last validation Dice (mean over classes and volumes) = {float(dice):.4f}")
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_score is not None:
            lines.append(
                f"kdseg: best {checkpoint.monitor} = {float(checkpoint.best_model_score):.4f} "
                f"({checkpoint.best_model_path})"
            )
        print("\n".join(lines), flush=True)


def main(args: list[str] | None = None, run: bool = True) -> KdsegCLI:
    """Entry point of the ``kdseg`` console script (``run=False``: parse and instantiate only,
    with ``args`` then given without a subcommand)."""
    return KdsegCLI(
        # Any LightningModule / LightningDataModule by class_path: semantic methods
        # (kdseg.methods.*) and instance methods share the CLI and its guarantees.
        model_class=pl.LightningModule,
        datamodule_class=pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_callback=RunConfigSaver,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "runs", "name": "kdseg"},
            },
        },
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=run,
    )


def console() -> None:
    """The ``kdseg`` console script: bad input ends with one clear line, not a traceback."""
    try:
        main()
    except (DataError, FileExistsError, FileNotFoundError) as error:
        print(f"kdseg: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    console()
