"""SIGTERM / SIGINT end a fit with a resumable checkpoint of the current step and a non-zero exit.

Lightning alone ends a fit on SIGTERM with exit status 0 and no checkpoint (``last.ckpt`` stays
at the last validation), and turns Ctrl-C into a ``KeyboardInterrupt`` wherever it lands (inside
an optimizer step too). This callback replaces both handlers once training starts: a signal only
sets a flag; at the end of the current training batch (EMA teacher updated, the natural point
of Lightning's mid-epoch checkpoints) the state is written to ``last.ckpt`` through
:class:`~kdseg.callbacks.latest_checkpoint.LatestCheckpoint`, one ``kdseg:`` line names it, and
the fit ends with exit status ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the shell's
convention. A second Ctrl-C interrupts at once (no checkpoint). A signal during a validation
takes effect after the next training step (the validation is not cut short). Before training
starts (setup, sanity check) Lightning's SIGTERM handling stops the fit; it exits 143 too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kdseg.callbacks.latest_checkpoint import LatestCheckpoint

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterrupted(SIGTERMException):
    """Ends the fit: a ``SystemExit`` with code ``128 + signum`` (Lightning tears down and re-raises)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class GracefulInterrupt(Checkpoint):
    """Stops a fit on SIGTERM / SIGINT after the current step, saving ``last.ckpt`` first.

    A :class:`Checkpoint` subclass so that Lightning runs it after every other callback (the EMA
    teacher update included) and before nothing that changes the state.

    Args:
        latest: the callback that writes ``last.ckpt``; None (checkpointing disabled) = stop
            without a checkpoint.
    """

    def __init__(self, latest: LatestCheckpoint | None = None) -> None:
        self.latest = latest
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if signum == signal.SIGINT:  # a second Ctrl-C is an immediate KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        if self.signum is not None:
            return  # already signalled (a second Ctrl-C must stay immediate)
        for signum in HANDLED_SIGNALS:
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._request_stop)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before Lightning registers its SIGTERM handler, which then calls this one too.
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # From here on only this handler: Lightning's would cut a validation short and exit 0.
        self._install()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.signum is None:
            return
        name = signal.Signals(self.signum).name
        step = trainer.global_step
        if self.latest is not None:
            path = os.path.abspath(self.latest.save_latest(trainer))
            message = f"kdseg: {name} at step {step}: state saved; resume with --ckpt_path={path}"
        else:
            message = f"kdseg: {name} at step {step}: stopped without a checkpoint (checkpointing is disabled)"
        if trainer.is_global_zero:
            print(message, file=sys.stderr, flush=True)
        raise RunInterrupted(self.signum)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning's own SIGTERM stop (a signal during setup or the sanity check, before the
        # first training step) is a SystemExit with code None, i.e. exit 0: make it 143 as well.
        if isinstance(exception, SIGTERMException) and not isinstance(exception, RunInterrupted):
            exception.code = 128 + signal.SIGTERM
            if trainer.is_global_zero:
                print("kdseg: SIGTERM before the first training step: stopped, nothing saved", file=sys.stderr, flush=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
