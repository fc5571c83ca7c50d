"""The EMA teacher: exact formula, warm-up, buffers, no gradient, inside a real training loop."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from kdseg.callbacks.ema import EMATeacher, ema_decay_at, ema_update_
from kdseg.data.datamodule import PhantomDataModule
from kdseg.methods import MeanTeacher, NetworkConfig

TINY = NetworkConfig(encoder_depth=3, decoder_channels=[16, 8, 8])


def test_decay_warmup_values() -> None:
    assert ema_decay_at(0, 0.99) == 0.0  # first update copies the student
    assert ema_decay_at(1, 0.99) == pytest.approx(0.5)
    assert ema_decay_at(9, 0.99) == pytest.approx(0.9)
    assert ema_decay_at(10_000, 0.99) == 0.99


def test_update_moves_teacher_by_exactly_the_formula() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn_like(p))
        teacher[1].running_mean.fill_(3.0)
        student[1].running_mean.fill_(1.0)
        student[1].num_batches_tracked.fill_(7)
    t_before = [p.clone() for p in teacher.parameters()]
    s_params = [p.clone() for p in student.parameters()]
    ema_update_(teacher, student, 0.9)
    for t0, s, t1 in zip(t_before, s_params, teacher.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s)
        assert not torch.equal(t1, t0)  # the teacher really moved (PyMIC's bug: it stays put)
    torch.testing.assert_close(teacher[1].running_mean, torch.full((2,), 0.9 * 3.0 + 0.1 * 1.0))
    assert int(teacher[1].num_batches_tracked) == 7


def test_teacher_in_training_follows_formula_and_gets_no_gradient(tmp_path) -> None:
    pl.seed_everything(0)
    data = PhantomDataModule(
        num_train_patients=3, num_val_patients=1, num_test_patients=1, num_slices=2, phantom_size=32,
        image_size=32, batch_size=2, labeled_patients=1, unlabeled_batch_size=2,
    )
    model = MeanTeacher(network=TINY, ema_decay=0.6, consistency_rampup_steps=0)

    class Recorder(pl.Callback):
        """Replays the formula next to the real callback, from the teacher before each update."""

        def __init__(self) -> None:
            self.expected = copy.deepcopy(model.ema_teacher)
            self.checked = 0

        def _check(self, trainer, pl_module) -> None:
            # The real callback has updated the teacher after step `global_step`: replay it.
            decay = ema_decay_at(trainer.global_step - 1, 0.6)
            ema_update_(self.expected, pl_module.student, decay)
            for (name, t), e in zip(pl_module.ema_teacher.named_parameters(), self.expected.parameters()):
                torch.testing.assert_close(t, e, rtol=0, atol=0, msg=name)
                assert t.grad is None and not t.requires_grad
            assert not pl_module.ema_teacher.training
            self.checked += 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step > 0:
                self._check(trainer, pl_module)

        def on_train_end(self, trainer, pl_module):
            self._check(trainer, pl_module)

    recorder = Recorder()
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, callbacks=[recorder], default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    assert recorder.checked == 3
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.ema_teacher.parameters()}
    # After step 1 (decay 0) the teacher would equal the student; after 3 steps it must lag.
    assert any(
        not torch.equal(t, s) for t, s in zip(model.ema_teacher.parameters(), model.student.parameters())
    )


def test_callback_rejects_bad_decay() -> None:
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(decay=1.5)
