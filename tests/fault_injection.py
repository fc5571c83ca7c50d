"""Callbacks that interrupt a fit at a chosen step, for the resume and signal tests (given to
the CLI as ``--trainer.callbacks+=fault_injection.<Name>``; ``tests/`` must be importable)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from kdseg.callbacks.interrupt import GracefulInterrupt


class SignalAtStep(pl.Callback):
    """Sends ``signum`` to this process at the end of training step ``step`` (1-based global step)."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class KillAtStep(pl.Callback):
    """``kill -9`` of this process as training step ``step + 1`` starts (no handler can run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtSanityCheck(pl.Callback):
    """Sends SIGTERM to this process as the sanity-check validation starts (before training)."""

    def on_sanity_check_start(self, trainer: pl.Trainer, *args: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


class WaitAtStep(pl.Callback):
    """At the end of step ``step`` writes ``flag_file`` and waits (at most ``timeout`` s) until a
    signal has reached :class:`GracefulInterrupt`: another process sends it a real signal."""

    def __init__(self, step: int, flag_file: str, timeout: float = 120.0) -> None:
        self.step = step
        self.flag_file = flag_file
        self.timeout = timeout

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        Path(self.flag_file).write_text(str(os.getpid()))
        stopper = next(c for c in trainer.callbacks if isinstance(c, GracefulInterrupt))
        deadline = time.monotonic() + self.timeout
        while stopper.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)

