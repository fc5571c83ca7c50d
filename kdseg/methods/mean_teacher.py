"""``mean_teacher``: Tarvainen & Valpola (NeurIPS 2017), as in SSL4MIS ``train_mean_teacher_2D``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdseg.data.augment import clipped_gaussian_noise
from kdseg.losses.segmentation import ce_dice_loss, softmax_mse
from kdseg.methods.base import TeacherStudentMethod
from kdseg.schedules import sigmoid_rampup


class MeanTeacher(TeacherStudentMethod):
    """``L = L_sup(labeled) + w(t) * L_cons``, ``L_cons = softmax_mse(student(u), teacher(u + noise))``.

    Following SSL4MIS: the student sees labeled and unlabeled slices in one forward pass (so its
    BatchNorm statistics cover both), the teacher sees the unlabeled slices plus Gaussian noise
    ``clamp(N(0, noise_std^2), -noise_clip, noise_clip)``, ``L_sup = (CE + Dice) / 2`` and
    ``w(t) = consistency_weight * sigmoid_rampup(t, consistency_rampup_steps)``. SSL4MIS ramps
    over ``iter // 150`` against 200, i.e. about 30000 steps; here the ramp is in steps directly.

    Args:
        consistency_weight: final consistency weight (0.1 in SSL4MIS).
        consistency_rampup_steps: steps of the sigmoid ramp-up.
        noise_std, noise_clip: the teacher's input noise.
        (other arguments: see :class:`~kdseg.methods.base.TeacherStudentMethod`)
    """

    uses_unlabeled = True
    required_supervision = "dense"

    def __init__(
        self,
        consistency_weight: float = 0.1,
        consistency_rampup_steps: int = 30000,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.consistency_weight = consistency_weight
        self.consistency_rampup_steps = consistency_rampup_steps
        self.noise_std = noise_std
        self.noise_clip = noise_clip

    def consistency_weight_at(self, step: int) -> float:
        return self.consistency_weight * sigmoid_rampup(step, self.consistency_rampup_steps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        n_labeled = labeled["image"].shape[0]
        logits = self.student(torch.cat([labeled["image"], unlabeled["image"]])).logits
        L_sup = ce_dice_loss(logits[:n_labeled], labeled["target"])

        noisy = clipped_gaussian_noise(unlabeled["image"], self.noise_std, self.noise_clip)
        teacher_logits = self.teacher_forward(noisy).logits
        L_cons = softmax_mse(logits[n_labeled:], teacher_logits)

        weight = self.consistency_weight_at(self.global_step)
        loss = L_sup + weight * L_cons
        self.log_dict(
            {"train/loss": loss, "train/L_sup": L_sup, "train/L_cons": L_cons, "train/consistency_weight": weight},
            prog_bar=False,
        )
        return loss
