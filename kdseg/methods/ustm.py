"""``ustm``: USTM, Liu, Yuan, Zhang, Yang, Wang, Zhang, Zhang, "Weakly-supervised medical image
segmentation via uncertainty-aware self-ensembling and transformation-consistent model", 2022,
as WSL4MIS ``code/train_weakly_supervised_ustm_2D.py``.

Loss::

    L = L_pce + w(t) * L_tc,   w(t) = consistency_weight * sigmoid_rampup(t, consistency_rampup_steps)
    L_tc = masked_softmax_mse(rot_k(student(x)), teacher(rot_k(x) + noise), U < H(t))

``k`` is a random multiple of 90 degrees per step; ``U`` is the teacher's predictive entropy over
``mc_passes`` noisy passes and ``H(t)`` ramps from 0.75 to 1.0 of ``max_entropy``.

Departures and choices (each with its reason):

- ``w(t)`` ramps per step over 60k steps (WSL4MIS: ``sigmoid_rampup(iter_num // 1000, 60)``): a smoother curve, same end points.
- Dropout at WSL4MIS's encoder rates on the smp encoder's stage outputs: smp's encoder has no dropout of its own.
- The teacher keeps eval-mode BatchNorm, as every kdseg teacher (WSL4MIS never puts it in eval mode).
- All teacher passes, the target included, run as one batched forward: one forward instead of T + 1.
- ``max_entropy = ln 2`` as WSL4MIS even with 4 classes (``ln 4`` would admit more pixels); ``null`` gives ``ln(num_classes)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kdseg.losses.segmentation import partial_cross_entropy
from kdseg.losses.uncertainty import (
    encoder_dropout_logits,
    masked_softmax_mse,
    noisy_teacher_passes,
)
from kdseg.methods.base import TeacherStudentMethod
from kdseg.schedules import sigmoid_rampup, uncertainty_threshold


class USTM(TeacherStudentMethod):
    """USTM: ``L = L_pce + w(t) * L_tc`` (see the module docstring).

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
