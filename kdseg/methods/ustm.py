"""``ustm``: uncertainty-aware self-ensembling and transformation-consistent mean teacher for
scribble supervision (Liu, Yuan, Zhang, Yang, Wang, Zhang, Zhang, "Weakly-supervised medical
image segmentation via uncertainty-aware self-ensembling and transformation-consistent model"
(USTM), 2022), as implemented in WSL4MIS ``train_weakly_supervised_ustm_2D``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kdseg.losses.segmentation import partial_cross_entropy, sigmoid_rampup
from kdseg.losses.uncertainty import (
    encoder_dropout_logits,
    masked_softmax_mse,
    noisy_teacher_passes,
    uncertainty_threshold,
)
from kdseg.methods.base import TeacherStudentMethod


class USTM(TeacherStudentMethod):
    """``L = L_pce + w(t) * L_tc``.

    ``L_tc`` (transformation consistency): the slices are rotated by ``k * 90`` degrees (random
    ``k`` per step); the EMA teacher segments the rotated slices plus noise, the student's
    prediction on the original slices is rotated the same way, and their softmax squared
    difference counts only where the teacher's predictive entropy over ``mc_passes`` noisy passes
    is below ``uncertainty_threshold`` (ramped from 0.75 to 1.0 of ``max_entropy``).
    ``w(t) = consistency_weight * sigmoid_rampup(t, consistency_rampup_steps)``, ramping to 1.0
    over 60k steps as WSL4MIS ``code/train_weakly_supervised_ustm_2D.py``
    (``get_current_consistency_weight``: ``1.0 * sigmoid_rampup(iter_num // 1000, 60)``; kdseg
    ramps per step instead of per 1000 steps, a smoother curve with the same end points).

    Choices: WSL4MIS's EMA teacher is never put in eval mode, so its ``UNet`` encoder dropout
    (``code/networks/unet.py``) is active in every pass; kdseg applies the same rates to the smp
    encoder's stage outputs (:func:`~kdseg.losses.uncertainty.encoder_dropout_logits`;
    ``teacher_dropout: false`` leaves input noise only) and keeps eval-mode BatchNorm, as every
    kdseg teacher. As there, the consistency target is one further noisy teacher pass (all
    passes run as one batched forward). ``max_entropy`` defaults to ln 2, the value WSL4MIS uses even with 4
    classes (``ln 4`` would admit more pixels); set it to ``null`` for ``ln(num_classes)``.

    Args:
        consistency_weight: final ``w``; consistency_rampup_steps: its sigmoid ramp-up.
        mc_passes: teacher passes for the uncertainty; noise_std / noise_clip: their input noise.
        threshold_rampup_steps: ramp of the uncertainty threshold (the run length in WSL4MIS).
        max_entropy: the threshold's scale.
        teacher_dropout: dropout in the teacher's passes (WSL4MIS's encoder rates).
    """

    required_supervision = "scribble"

    def __init__(
        self,
        consistency_weight: float = 1.0,
        consistency_rampup_steps: int = 60000,
        mc_passes: int = 8,
        noise_std: float = 0.1,
        noise_clip: float = 0.2,
        threshold_rampup_steps: int = 60000,
        max_entropy: float | None = math.log(2),
        teacher_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.consistency_weight = consistency_weight
        self.consistency_rampup_steps = consistency_rampup_steps
        self.mc_passes = mc_passes
        self.noise_std = noise_std
        self.noise_clip = noise_clip
        self.threshold_rampup_steps = threshold_rampup_steps
        self.max_entropy = max_entropy if max_entropy is not None else math.log(self.num_classes)
        self.teacher_dropout = teacher_dropout

    def teacher_pass(self, image: Tensor) -> Tensor:
        """One stochastic teacher pass: logits ``(N, C, H, W)`` of ``image`` ``(N, 1, H, W)``."""
        if self.teacher_dropout:
            return encoder_dropout_logits(self.ema_teacher, image)
        return self.teacher_forward(image).logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled = batch["labeled"]
        image, scribble = labeled["image"], labeled["target"]
        logits = self.student(image).logits
        L_pce = partial_cross_entropy(logits, scribble, self.scribble_ignore_index)

        k = int(torch.randint(0, 4, ()))
        rotated = torch.rot90(image, k, dims=(2, 3))
        teacher_logits, uncertainty = noisy_teacher_passes(
            self.teacher_pass, rotated, self.mc_passes, self.noise_std, self.noise_clip
        )
        threshold = uncertainty_threshold(self.global_step, self.threshold_rampup_steps, self.max_entropy)
        mask = (uncertainty < threshold).float()
        L_tc = masked_softmax_mse(torch.rot90(logits, k, dims=(2, 3)), teacher_logits, mask)

        weight = self.consistency_weight * sigmoid_rampup(self.global_step, self.consistency_rampup_steps)
        loss = L_pce + weight * L_tc
        self.log_dict({"train/loss": loss, "train/L_pce": L_pce, "train/L_tc": L_tc,
                       "train/certain_fraction": mask.mean(), "train/consistency_weight": weight})
        return loss
