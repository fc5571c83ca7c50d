"""The one base of every method, semantic or instance, and the EMA teacher they share.

:class:`Method` saves the constructor arguments, then builds the networks in this order (which
fixes the order in which initial weights are drawn)::

    save_hyperparameters() -> configure_models() -> configure_heads(student) -> configure_teacher()

It owns the optimizer and schedule, the checks before training and the validation / test loop
around the family's evaluator; each family (:mod:`kdseg.methods.base`,
:mod:`kdseg.methods.instance_base`) builds its student, scores a batch and summarises an epoch.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from kdseg.callbacks.ema import EMATeacher
from kdseg.callbacks.run_dir import run_dir
from kdseg.evaluation import Evaluator, write_test_results
from kdseg.schedules import warmup_poly

# The EMA teacher is in eval mode on purpose (see EMATeacherMixin); Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

__all__ = ["EMATeacherMixin", "Method", "dataclass_hparam"]

C = TypeVar("C")


def dataclass_hparam(cls: type[C], value: C | dict[str, Any]) -> C:
    """A dataclass argument read back from ``self.hparams``: the object itself, or rebuilt from the
    plain dict LightningCLI saves in its place (so ``hparams.yaml`` is plain YAML)."""
    return value if isinstance(value, cls) else cls(**value)


class Method(pl.LightningModule):
    """A ``student`` trained by a subclass's ``training_step``. Reads ``lr``, ``momentum``,
    ``weight_decay``, ``poly_power`` and, where declared, ``optimizer`` (default ``sgd``),
    ``lr_warmup_steps`` / ``lr_warmup_factor`` (default: none) from ``self.hparams``."""

    #: whether ``training_step`` needs the unlabeled stream.
    uses_unlabeled: bool = False
    #: ``"dense"``, ``"scribble"`` or None (any).
    required_supervision: str | None = None
    #: how to give the data an unlabeled stream (the error message of a missing one).
    unlabeled_hint: str = "give the data module unlabeled samples"

    student: nn.Module
    evaluator: Evaluator[Any]

    def __init__(self) -> None:
        super().__init__()
        # Collects the arguments of every subclass's __init__ on the call stack.
        self.save_hyperparameters()
        self.configure_models()
        self.configure_heads(self.student)
        self.configure_teacher()

    # -- construction hooks --------------------------------------------------------------------------
    def configure_models(self) -> None:
        """Hook: build ``self.student`` and ``self.evaluator`` from ``self.hparams``."""
        raise NotImplementedError

    def configure_heads(self, network: nn.Module) -> None:
        """Hook: register the method's extra heads on the student (a teacher copies them)."""

    def configure_teacher(self) -> None:
        """Hook: build a teacher from the finished student (see :class:`EMATeacherMixin`)."""

    def inference_network(self) -> nn.Module:
        """The network evaluated at validation / test / predict."""
        return self.student

    # -- checks before training ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        method = type(self).__name__
        supervision = getattr(datamodule, "supervision", None)
        if self.required_supervision and supervision != self.required_supervision:
            raise ValueError(
                f"{method} needs data.supervision={self.required_supervision!r}, got {supervision!r}"
            )
        if self.uses_unlabeled and not getattr(datamodule, "has_unlabeled", False):
            raise ValueError(f"{method} {self.unlabeled_hint}")

    # -- optimisation --------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything with ``requires_grad`` outside the EMA teacher."""
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("ema_teacher.")]

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with momentum (or AdamW) and the :func:`~kdseg.schedules.warmup_poly` learning-rate
        factor, stepped every optimizer step over the run's ``estimated_stepping_batches``."""
        hp = self.hparams
        if hp.get("optimizer", "sgd") == "sgd":
            optimizer = torch.optim.SGD(
                self.trainable_parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup, factor = int(hp.get("lr_warmup_steps", 0)), float(hp.get("lr_warmup_factor", 1.0))
        power = hp.poly_power
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_poly(step, total, power, warmup, factor)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ----------------------------------------------------------------------------------
    #: logged metrics also shown in the progress bar.
    progress_bar_metrics: tuple[str, ...] = ()

    def evaluate_batch(self, batch: Any, stage: str) -> None:
        """Hook: add the rows of one ``val`` / ``test`` batch to ``self.evaluator``."""
        raise NotImplementedError

    def summarise(self, rows: list[Any], stage: str) -> tuple[dict[str, float], tuple[Any, ...] | None]:
        """Hook: the epoch's metrics, logged as ``<stage>/<name>``, and at test the arguments of
        :func:`~kdseg.evaluation.write_test_results` after the directory."""
        raise NotImplementedError

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate_batch(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate_batch(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    def _end_evaluation(self, stage: str) -> None:
        rows = self.evaluator.gathered()  # a collective under DDP: every rank calls it
        if not rows:
            return
        metrics, report = self.summarise(rows, stage)
        for name, value in metrics.items():
            key = f"{stage}/{name}"
            self.log(key, value, prog_bar=key in self.progress_bar_metrics)
        if report is not None and self.trainer.is_global_zero:
            write_test_results(self.results_dir(), *report)

    def results_dir(self) -> Path:
        """The run directory: the logger's version folder, or ``default_root_dir`` without one."""
        directory = run_dir(self.trainer)
        directory.mkdir(parents=True, exist_ok=True)
        return directory


class EMATeacherMixin:
    """The EMA teacher of every teacher-student method: ``self.ema_teacher``, a deep copy of the
    student made after its heads, without gradients, always in eval mode, updated by the
    :class:`~kdseg.callbacks.ema.EMATeacher` callback it adds itself; a submodule, so checkpoints
    hold it. Reads ``ema_decay`` and ``eval_network`` (``student`` or ``teacher``)."""

    def configure_teacher(self) -> None:
        eval_network = self.hparams.eval_network
        if eval_network not in ("student", "teacher"):
            raise ValueError(f"eval_network must be 'student' or 'teacher', got {eval_network!r}")
        self.ema_decay = self.hparams.ema_decay
        self.eval_network = eval_network
        self.ema_teacher = copy.deepcopy(self.student)
        self.ema_teacher.requires_grad_(False)
        self.ema_teacher.eval()

    def configure_callbacks(self) -> list[pl.Callback]:
        return [*super().configure_callbacks(), EMATeacher(decay=self.ema_decay)]

    def train(self, mode: bool = True):  # type: ignore[no-untyped-def]
        super().train(mode)
        self.ema_teacher.eval()  # Lightning switches every submodule to train mode: not the teacher
        return self

    def inference_network(self) -> nn.Module:
        return self.ema_teacher if self.eval_network == "teacher" else self.student

    @torch.no_grad()
    def teacher_forward(self, image: Tensor) -> Any:
        """The teacher's output, computed without a graph."""
        return self.ema_teacher(image)
