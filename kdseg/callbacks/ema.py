"""EMA teacher update, shared by every teacher-student method.

``teacher <- decay_t * teacher + (1 - decay_t) * student`` after each optimizer step, with the
warm-up of Tarvainen & Valpola (2017) as used in SSL4MIS::

    decay_t = min(1 - 1 / (t + 1), decay)        # t = 0-based index of the step just taken

so the first update copies the student and the teacher does not lag behind a random start.

Buffers are handled explicitly: floating buffers (BatchNorm ``running_mean`` / ``running_var``)
are averaged with the same ``decay_t`` and integer buffers (``num_batches_tracked``) are copied.
The teacher is kept in eval mode, so its forward passes never change its own statistics; its
statistics are those of the student, smoothed. (SSL4MIS instead runs the teacher in train mode and
lets it collect its own statistics; with EMA'd buffers the teacher is a pure function of the
student's trajectory, which is what makes DDP ranks and resumed runs bit-identical.)

The averaging itself is ``torch.optim.swa_utils.get_ema_multi_avg_fn`` (a fused ``foreach``
lerp). Note: PyMIC >= 0.4.1 ships an EMA whose teacher never moves (an out-of-place ``add``); the
tests check that this one moves the teacher by exactly the formula.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


def ema_decay_at(step: int, decay: float) -> float:
    """``min(1 - 1 / (step + 1), decay)``: the warmed-up decay for the 0-based ``step``."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In place: ``teacher = decay * teacher + (1 - decay) * student`` for parameters and float
    buffers; integer buffers are copied. Both modules must have the same structure."""
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError("teacher and student have different parameter lists")
    update = get_ema_multi_avg_fn(decay)
    if teacher_params:
        update(teacher_params, [p.detach() for p in student_params], None)
    teacher_float, student_float = [], []
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers(), strict=True):
        if torch.is_floating_point(t_buf):
            teacher_float.append(t_buf)
            student_float.append(s_buf)
        else:
            t_buf.copy_(s_buf)
    if teacher_float:
        update(teacher_float, student_float, None)


class EMATeacher(pl.Callback):
    """Updates ``pl_module.ema_teacher`` from ``pl_module.student`` after each optimizer step.

    Methods add it themselves (``configure_callbacks``), so a config cannot forget it.

    Args:
        decay: the EMA decay after warm-up (0.99 in SSL4MIS, ACTION and MMT-PSM).
    """

    def __init__(self, decay: float = 0.99) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return f"EMATeacher(decay={self.decay})"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in ("student", "ema_teacher"):
            if not isinstance(getattr(pl_module, name, None), nn.Module):
                raise TypeError(f"EMATeacher needs `{name}` on {type(pl_module).__name__}")
        # Resumed runs continue from the restored step.
        self._last_step = trainer.global_step
        pl_module.ema_teacher.eval()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Only when an optimizer step really happened (gradient accumulation skips some batches).
        if trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        decay_t = ema_decay_at(trainer.global_step - 1, self.decay)
        ema_update_(pl_module.ema_teacher, pl_module.student, decay_t)
        pl_module.ema_teacher.eval()
