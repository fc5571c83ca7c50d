"""The ``kdseg`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

Model and data are chosen by ``class_path`` (any method with any compatible data module);
experiments live in ``experiments/`` as config files, composable (later files override earlier
ones): a data layer, a method layer, a budget and optionally an ablation, e.g.
``--config experiments/data/acdc_semi.yaml --config experiments/methods/mean_teacher.yaml
--config experiments/budgets/acdc_semi.yaml`` (the map: experiments/README.md).

``num_classes`` and ``scribble_ignore_index`` are data arguments, linked to the model's
(``LightningCLI.link_arguments``): given once, they cannot disagree.

With ``--ckpt_path``, LightningCLI replaces the model arguments by the checkpoint's saved
hyperparameters (``LightningCLI._parse_ckpt_path``); kdseg keeps every model argument the user gave
(config files or command line) that differs from the saved one, and says so. Checkpoints are
loaded with ``weights_only=True`` (:mod:`kdseg.checkpoints`). ``validate``/``test``/``predict``
log into ``<run>/<subcommand>/version_N`` of the checkpoint's run, never beside training runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from kdseg.callbacks.atomic_io import AtomicCheckpointIO
from kdseg.callbacks.interrupt import GracefulInterrupt
from kdseg.callbacks.latest_checkpoint import LatestCheckpoint
from kdseg.callbacks.prediction_writer import VolumePredictionWriter
import kdseg.data  # noqa: F401  (imported so that --help lists every data module)
import kdseg.methods  # noqa: F401  (imported so that --help lists every method)
from kdseg.callbacks.rng_state import RNGStateCheckpoint
from kdseg.callbacks.run_dir import (
    ensure_new_run_dir,
    evaluation_log_root,
    name_wandb_run,
    remove_unstarted_run_dir,
    run_dir,
)
from kdseg.checkpoints import load_checkpoint
from kdseg.data.volume import DataError

EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")
#: Every run's stack of config layers (run name, e.g. ``phantom/mean_teacher`` -> layer paths).
STACKS_FILE = Path(__file__).resolve().parents[1] / "experiments" / "stacks.yaml"
# Given once in the data layer, copied to the model (a model without the argument, e.g. a Mask R-CNN
# method and the scribble ignore value, is left alone).
LINKED_DATA_ARGUMENTS = ("num_classes", "scribble_ignore_index")
DESCRIPTION = (
    "kdseg: label-efficient medical image segmentation by knowledge distillation (ScribSD+, "
    "ACTION, MMT-PSM and their baselines on ACDC and ISBI 2014). A run is a stack of config "
    "layers (data, method, budget, ablation; experiments/README.md), e.g. `kdseg fit --config "
    "experiments/data/phantom_semi.yaml --config experiments/methods/mean_teacher.yaml --config "
    "experiments/budgets/phantom.yaml --config experiments/budgets/phantom/mean_teacher.yaml`; "
    "`kdseg fit --help` lists the methods (--model) and data modules (--data)."
)


def differing_arguments(saved: dict[str, Any], given: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, given value)`` for each given argument whose value differs from
    the saved one (nested dicts compared key by key; a key the checkpoint lacks counts as differing)."""
    out = []
    for key, value in given.items():
        name, old = f"{prefix}{key}", saved.get(key, "<not saved>")
        if isinstance(value, dict) and isinstance(old, dict):
            out += differing_arguments(old, value, name + ".")
        elif value != old:
            out.append((name, old, value))
    return out


def _merged(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with ``given`` laid over it, nested dicts merged key by key."""
    out = dict(saved)
    for key, value in given.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def stack_layers(run: str) -> list[Path]:
    """The config layers of ``run`` in experiments/stacks.yaml (absolute paths, in order)."""
    import yaml

    stacks = yaml.safe_load(STACKS_FILE.read_text())
    if run not in stacks:
        raise ConfigError(f"{STACKS_FILE}: no stack {run!r} (runs: {', '.join(stacks)})")
    return [STACKS_FILE.parents[1] / layer for layer in stacks[run]]


def stack_arguments(run: str) -> list[str]:
    """``--config=<layer>`` for each layer of ``run`` (experiments/stacks.yaml)."""
    return [f"--config={layer}" for layer in stack_layers(run)]


class ConfigError(DataError):
    """A model or data argument its class refused (the message is the class's own)."""


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
    """Adds the best-by-validation-Dice checkpoint, the prediction writer, run-folder guards, safe
    checkpoint loading and the user's model arguments kept over a checkpoint's."""

    def parse_arguments(self, parser, args) -> None:  # type: ignore[no-untyped-def]
        super().parse_arguments(parser, args)
        # Only what the user gave (config files, command line), without defaults: kept over the
        # checkpoint's hyperparameters in _parse_ckpt_path.
        self._given = parser.parse_args(args, defaults=False) if not isinstance(args, dict) else None

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or ckpt_path in ("best", "last", "hpc") or str(ckpt_path).startswith("registry"):
            return
        hparams = dict(load_checkpoint(ckpt_path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        if not hparams or class_path is None:
            return super()._parse_ckpt_path()
        given = self._given[subcommand].get("model") if self._given is not None else None
        given = given.as_dict() if given is not None and hasattr(given, "as_dict") else {}
        given_class = given.get("class_path")
        if given_class and given_class.rsplit(".", 1)[-1] != class_path.rsplit(".", 1)[-1]:
            raise ConfigError(f"{ckpt_path}: the checkpoint is a {class_path} but the model given is "
                              f"{given_class}: drop --model / use the run's config.yaml")
        typed = dict(given.get("init_args") or {})
        data = self.config[subcommand].get("data")
        data_args = (data.get("init_args") if data is not None else None) or {}
        for name in LINKED_DATA_ARGUMENTS:
            # Linked from the data layer, not taken from the checkpoint: a checkpoint trained for
            # other classes would not load (or would mislabel the scribbles), so say so here.
            if name in data_args and name in hparams:
                if hparams[name] != data_args[name]:
                    raise ConfigError(f"{ckpt_path}: the checkpoint was trained with {name}={hparams[name]!r} "
                                      f"but data.init_args.{name} is {data_args[name]!r}")
                hparams.pop(name)
            typed.pop(name, None)
        for key, old, new in differing_arguments(hparams, typed):
            print(f"kdseg: model.init_args.{key}={new!r} (given) replaces the checkpoint's {old!r}",
                  file=sys.stderr, flush=True)
        # As LightningCLI does, the saved hyperparameters become dict_kwargs; the given ones on top.
        model = {"class_path": class_path, "dict_kwargs": _merged(hparams, typed)}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            cause: BaseException = error
            while cause.__cause__ is not None:
                cause = cause.__cause__
            if cause is error or not isinstance(cause, ValueError):
                raise
            # jsonargparse wraps a constructor's ValueError in a long Union error: keep the clear one.
            raise ConfigError(str(cause)) from cause

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
        for name in LINKED_DATA_ARGUMENTS:
            parser.link_arguments(f"data.init_args.{name}", f"model.init_args.{name}")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        logger = config.get("logger")
        if self.subcommand in EVALUATION_SUBCOMMANDS and isinstance(logger, (CSVLogger, TensorBoardLogger)):
            # An evaluation logs under the run it evaluates, not as a new run beside training runs.
            ckpt_path = self.config[self.subcommand].get("ckpt_path")
            root = evaluation_log_root(Path(logger.save_dir), str(logger.name), self.subcommand, ckpt_path)
            if root is not None:
                config["logger"] = type(logger)(save_dir=str(root), name=self.subcommand)
        name_wandb_run(config.get("logger"))
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

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            remove_unstarted_run_dir(self.trainer)  # bad data: no empty version_N left behind
            raise

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            if kwargs.get("weights_only") is False:
                raise ConfigError("--weights_only=false: kdseg loads checkpoints with weights_only=True "
                                  "only (a checkpoint that needs more could run code)")
            kwargs["weights_only"] = True  # Lightning's own --ckpt_path loading: safe, not torch's default
        return kwargs

    def _after_evaluation(self) -> None:
        if self.trainer.is_global_zero:
            print(f"kdseg: {self.subcommand} outputs in {run_dir(self.trainer)}", flush=True)

    after_validate = after_test = _after_evaluation

    def after_predict(self) -> None:
        self._after_evaluation()
        writers = [c for c in self.trainer.callbacks if isinstance(c, VolumePredictionWriter)]
        if writers and self.trainer.is_global_zero:
            print(f"kdseg: predictions in {writers[0].output_dir}", flush=True)

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
        parser_kwargs={"parser_mode": "omegaconf", "description": DESCRIPTION},
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
