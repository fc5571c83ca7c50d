"""``ua_mt``: Uncertainty-Aware Mean Teacher, Yu, Wang, Li, Fu, Heng, "Uncertainty-aware
Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation", MICCAI 2019, in 2D as
SSL4MIS ``code/train_uncertainty_aware_mean_teacher_2D.py``.

Loss::

    L = L_sup + w(t) * L_cons,   L_cons = masked_softmax_mse(student(u), teacher(u + noise), U < H(t))
    H(t) = (0.75 + 0.25 * sigmoid_rampup(t, threshold_rampup_steps)) * H_max

``U`` is the predictive entropy of the mean of ``mc_passes`` (T = 8) noisy, dropout-active
teacher passes; ``L_sup`` and ``w(t)`` as :mod:`kdseg.methods.mean_teacher`.

Departures and choices (each with its reason):

- Dropout at SSL4MIS's encoder rates on the smp encoder's stage outputs: smp's encoder has no dropout of its own.
- The teacher keeps eval-mode BatchNorm, as every kdseg teacher (SSL4MIS never puts it in eval mode).
- The T passes and the target pass run as one batched forward of ``(T + 1) * B`` images: one forward instead of T + 1.
- ``H_max = ln 2`` as SSL4MIS's 2D script although ACDC has 4 classes: ``ln 4`` would mask almost nothing
  (``experiments/results/notes/uncertainty_teachers.md``); ``max_entropy: null`` gives ``ln(num_classes)``.
- The threshold ramps over ``threshold_rampup_steps`` (SSL4MIS: the run length, ``max_iterations``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kdseg.losses.segmentation import ce_dice_loss
from kdseg.losses.uncertainty import (
    encoder_dropout_logits,
    masked_softmax_mse,
    noisy_teacher_passes,
)
from kdseg.methods.mean_teacher import MeanTeacher
from kdseg.schedules import uncertainty_threshold

__all__ = ["UncertaintyAwareMeanTeacher"]


class UncertaintyAwareMeanTeacher(MeanTeacher):
    """UA-MT: :class:`~kdseg.methods.mean_teacher.MeanTeacher` whose consistency counts only the
    pixels where the teacher is certain, ``U < H(t)`` (see the module docstring).

    Args:
        mc_passes: T, the teacher's noisy passes for the uncertainty.
        threshold_rampup_steps: steps of the threshold's sigmoid ramp.
        max_entropy: ``H_max``; None = ``ln(num_classes)``.
        teacher_dropout: dropout in the teacher's passes (SSL4MIS's encoder rates).
        (other arguments: see :class:`~kdseg.methods.mean_teacher.MeanTeacher`)
    """

    def __init__(
        self,
        mc_passes: int = 8,
        threshold_rampup_steps: int = 30000,
        max_entropy: float | None = math.log(2),
        teacher_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mc_passes < 1:
            raise ValueError(f"mc_passes must be >= 1, got {mc_passes}")
        self.mc_passes = mc_passes
        self.threshold_rampup_steps = threshold_rampup_steps
        self.max_entropy = math.log(self.num_classes) if max_entropy is None else max_entropy
        self.teacher_dropout = teacher_dropout

    def uncertainty_threshold_at(self, step: int) -> float:
        return uncertainty_threshold(step, self.threshold_rampup_steps, self.max_entropy)

    def teacher_with_uncertainty(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """``(teacher_logits, uncertainty)`` of ``image`` ``(B, 1, H, W)``: see
        :func:`~kdseg.losses.uncertainty.noisy_teacher_passes`."""
        return noisy_teacher_passes(self.teacher_pass, image, self.mc_passes, self.noise_std, self.noise_clip)

    def teacher_pass(self, image: Tensor) -> Tensor:
        """One stochastic teacher pass: logits ``(N, C, H, W)`` of ``image`` ``(N, 1, H, W)``."""
        if self.teacher_dropout:
            return encoder_dropout_logits(self.ema_teacher, image)
        return self.teacher_forward(image).logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        n_labeled = labeled["image"].shape[0]
        logits = self.student(torch.cat([labeled["image"], unlabeled["image"]])).logits
        L_sup = ce_dice_loss(logits[:n_labeled], labeled["target"])

        teacher_logits, uncertainty = self.teacher_with_uncertainty(unlabeled["image"])
        threshold = self.uncertainty_threshold_at(self.global_step)
        mask = (uncertainty < threshold).to(logits.dtype)
        L_cons = masked_softmax_mse(logits[n_labeled:], teacher_logits, mask)

        weight = self.consistency_weight_at(self.global_step)
        loss = L_sup + weight * L_cons
        self.log_dict({
            "train/loss": loss, "train/L_sup": L_sup, "train/L_cons": L_cons,
            "train/consistency_weight": weight, "train/uncertainty_threshold": threshold,
            "train/certain_fraction": mask.mean(),
        })
        return loss
