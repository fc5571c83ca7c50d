"""``ua_mt``: Uncertainty-Aware Mean Teacher, Yu et al. (MICCAI 2019), as in SSL4MIS
``train_uncertainty_aware_mean_teacher_2D``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kdseg.losses.segmentation import ce_dice_loss, sigmoid_rampup
from kdseg.methods.mean_teacher import MeanTeacher

__all__ = ["UncertaintyAwareMeanTeacher", "masked_softmax_mse", "predictive_entropy"]


def predictive_entropy(mc_probs: Tensor, eps: float = 1e-6) -> Tensor:
    """Entropy of the mean of Monte-Carlo predictions.

    Args:
        mc_probs: ``(T, B, C, H, W)`` softmax probabilities of ``T`` stochastic passes.
        eps: inside the log, as in SSL4MIS (``log(p + 1e-6)``).

    Returns:
        ``(B, 1, H, W)``: ``-sum_c mean_t(p) * log(mean_t(p) + eps)``; 0 for a certain pixel,
        ``ln(C)`` for a uniform one.
    """
    mean = mc_probs.mean(dim=0)
    return -(mean * torch.log(mean + eps)).sum(dim=1, keepdim=True)


def masked_softmax_mse(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """SSL4MIS's UA-MT consistency: ``sum(mask * (softmax(s) - softmax(t))^2) / (2 sum(mask) + 1e-16)``.

    Args:
        student_logits, teacher_logits: ``(B, C, H, W)``; the teacher side is detached.
        mask: ``(B, 1, H, W)`` float, 1 where the teacher is certain enough.

    The squared difference is summed over classes and divided by twice the number of kept pixels
    (the factor 2 comes from SSL4MIS, whose 3D binary original had 2 channels); a fully masked
    batch gives 0.
    """
    dist = (torch.softmax(student_logits, dim=1) - torch.softmax(teacher_logits.detach(), dim=1)) ** 2
    return (mask * dist).sum() / (2 * mask.sum() + 1e-16)


class UncertaintyAwareMeanTeacher(MeanTeacher):
    """``L = L_sup + w(t) * masked_softmax_mse(student(u), teacher(u + noise), U < H(t))``.

    As :class:`~kdseg.methods.mean_teacher.MeanTeacher` (same supervised loss, teacher input
    noise, consistency weight ramp ``w(t)``), but the consistency only counts pixels where the
    teacher is certain: the teacher segments ``mc_samples`` (T = 8) noisy copies of the unlabeled
    batch, the predictive entropy ``U`` of their mean probability is the uncertainty, and pixels
    with ``U >= H(t) = (0.75 + 0.25 * sigmoid_rampup(t, uncertainty_rampup_steps)) * H_max`` are
    masked out (the threshold rises from 75% to 100% of ``H_max``, so more pixels join over time).

    Choices (each with its reason):

    - Stochasticity: kdseg keeps the EMA teacher in eval mode (see
      :class:`~kdseg.methods.base.TeacherStudentMethod`) and the smp U-Net has no dropout, so the
      T passes differ only by their Gaussian input noise
      ``clamp(N(0, noise_std^2), -noise_clip, noise_clip)`` (the noise of SSL4MIS's 2D script).
      SSL4MIS's teacher also runs in train mode with its UNet's encoder dropout active, so its
      passes vary more; expect fewer pixels masked here at the same threshold.
    - The T passes plus the consistency target (one more noisy pass, as in SSL4MIS) run as one
      batched teacher forward of ``(T + 1) * B`` images.
    - ``H_max = ln(C)``, the largest possible entropy of ``C`` classes, so the threshold means the
      same for any class count. SSL4MIS's 2D script uses ``ln 2`` (kept from the binary 3D
      original); set ``max_entropy: 0.6931`` to reproduce it.
    - The threshold ramp runs over ``uncertainty_rampup_steps`` (SSL4MIS: ``max_iterations``).
    - The consistency is normalised as in SSL4MIS (:func:`masked_softmax_mse`).

    Args:
        mc_samples: T, the teacher's noisy passes for the uncertainty.
        uncertainty_rampup_steps: steps of the threshold's sigmoid ramp.
        max_entropy: ``H_max``; None = ``ln(num_classes)``.
        (other arguments: see :class:`~kdseg.methods.mean_teacher.MeanTeacher`)
    """

    def __init__(
        self,
        mc_samples: int = 8,
        uncertainty_rampup_steps: int = 30000,
        max_entropy: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        self.mc_samples = mc_samples
        self.uncertainty_rampup_steps = uncertainty_rampup_steps
        self.max_entropy = math.log(self.num_classes) if max_entropy is None else max_entropy

    def uncertainty_threshold_at(self, step: int) -> float:
        return (0.75 + 0.25 * sigmoid_rampup(step, self.uncertainty_rampup_steps)) * self.max_entropy

    def _noise(self, x: Tensor) -> Tensor:
        return (torch.randn_like(x) * self.noise_std).clamp(-self.noise_clip, self.noise_clip)

    @torch.no_grad()
    def teacher_with_uncertainty(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """One batched teacher pass over ``T + 1`` noisy copies of ``image`` ``(B, 1, H, W)``.

        Returns:
            ``(teacher_logits, uncertainty)``: the first copy's logits ``(B, C, H, W)`` (the
            consistency target) and the predictive entropy of the other ``T`` ``(B, 1, H, W)``.
        """
        b = image.shape[0]
        copies = image.repeat(self.mc_samples + 1, 1, 1, 1)
        logits = self.teacher_forward(copies + self._noise(copies)).logits
        mc_probs = torch.softmax(logits[b:].float(), dim=1)
        mc_probs = mc_probs.reshape(self.mc_samples, b, *mc_probs.shape[1:])
        return logits[:b], predictive_entropy(mc_probs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        n_labeled = labeled["image"].shape[0]
        logits = self.student(torch.cat([labeled["image"], unlabeled["image"]])).logits
        supervised = ce_dice_loss(logits[:n_labeled], labeled["target"])

        teacher_logits, uncertainty = self.teacher_with_uncertainty(unlabeled["image"])
        threshold = self.uncertainty_threshold_at(self.global_step)
        mask = (uncertainty < threshold).to(logits.dtype)
        consistency = masked_softmax_mse(logits[n_labeled:], teacher_logits, mask)

        weight = self.consistency_weight_at(self.global_step)
        loss = supervised + weight * consistency
        self.log_dict({
            "train/loss": loss, "train/supervised": supervised, "train/consistency": consistency,
            "train/consistency_weight": weight, "train/uncertainty_threshold": threshold,
            "train/certain_fraction": mask.mean(),
        })
        return loss
