"""A test-only callback: each DDP rank saves its student and teacher at the end of training."""

import os
from pathlib import Path

import lightning.pytorch as pl
import torch


class StateDump(pl.Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(os.environ["KDSEG_TEST_DUMP_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        state = {
            "student": {k: v.detach().cpu() for k, v in pl_module.student.state_dict().items()},
            "teacher": {k: v.detach().cpu() for k, v in pl_module.ema_teacher.state_dict().items()},
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
        }
        torch.save(state, out / f"rank{trainer.global_rank}.pt")
