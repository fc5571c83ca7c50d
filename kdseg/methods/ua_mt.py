"""``ua_mt``: Uncertainty-Aware Mean Teacher, Yu et al. (MICCAI 2019), as in SSL4MIS
``train_uncertainty_aware_mean_teacher_2D``."""

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
    uncertainty_threshold,
)
from kdseg.methods.mean_teacher import MeanTeacher

__all__ = ["UncertaintyAwareMeanTeacher"]


class UncertaintyAwareMeanTeacher(MeanTeacher):
    """``L = L_sup + w(t) * L_cons``, ``L_cons = masked_softmax_mse(student(u), teacher(u + noise), U < H(t))``.

    As :class:`~kdseg.methods.mean_teacher.MeanTeacher` (same supervised loss, teacher input
    noise, consistency weight ramp ``w(t)``), but the consistency only counts pixels where the
    teacher is certain: the teacher segments ``mc_passes`` (T = 8) noisy copies of the unlabeled
    batch with its encoder dropout active, the predictive entropy ``U`` of their mean probability
    is the uncertainty, and pixels with
    ``U >= H(t) = (0.75 + 0.25 * sigmoid_rampup(t, threshold_rampup_steps)) * H_max`` are
    masked out (the threshold rises from 75% to 100% of ``H_max``, so more pixels join over time).

    Reference: SSL4MIS ``code/train_uncertainty_aware_mean_teacher_2D.py``. Its EMA teacher is
    never switched to eval mode, so the dropout of its ``UNet`` encoder (``code/networks/unet.py``)
    is active in all T passes and in the target pass; the threshold is ``(0.75 + 0.25 *
    sigmoid_rampup(iter_num, max_iterations)) * np.log(2)``.

    Choices (each with its reason):

    - Stochasticity as SSL4MIS: Gaussian input noise ``clamp(N(0, noise_std^2), -noise_clip,
      noise_clip)`` plus element-wise dropout at SSL4MIS's encoder rates
      (:func:`~kdseg.losses.uncertainty.encoder_dropout_logits`; applied to the smp encoder's
      stage outputs, as that encoder has no dropout). ``teacher_dropout: false`` leaves input
      noise only. Departure: kdseg's teacher keeps eval-mode BatchNorm (running statistics), as
      every kdseg teacher (:class:`~kdseg.methods.base.TeacherStudentMethod`).
    - The T passes plus the consistency target (one more noisy pass, as in SSL4MIS) run as one
      batched teacher forward of ``(T + 1) * B`` images.
    - ``H_max = ln 2`` as SSL4MIS's 2D script (kept there from the binary 3D original) although
      ACDC has 4 classes: with ``ln 4`` the threshold would start above ``ln 2`` and mask almost
      nothing (``experiments/results/notes/uncertainty_teachers.md``). ``max_entropy: null``
      gives ``ln(num_classes)``.
    - The threshold ramp runs over ``threshold_rampup_steps`` (SSL4MIS: ``max_iterations``).
    - The consistency is normalised as in SSL4MIS (:func:`~kdseg.losses.uncertainty.masked_softmax_mse`).

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
