"""Knowledge-distillation losses for scribble-supervised segmentation (ScribSD / ScribSD+).

All functions are pure: the teacher side is always detached inside, so a teacher tensor that
requires grad (e.g. a co-trained or EMA model output not wrapped in ``no_grad``) never receives
gradient from these losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdseg.losses.entropy import _masked_pixel_mean

__all__ = ["feature_kd_loss", "kd_kl_divergence", "multiscale_kd_loss"]


def kd_kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    teacher_temperature: float | None = None,
) -> Tensor:
    """Pixel-wise Hinton distillation loss ``T^2 * KL(softmax(t/T_t) || softmax(s/T))``.

    ``T_t = T`` (``teacher_temperature=None``) is Hinton's KD. ``T_t < T`` sharpens the teacher's
    soft prediction before it supervises the student (as in UDA / MMT-PSM's sharpening): the
    target still keeps the teacher's class ranking but is more confident than the teacher.

    The KL is summed over classes and averaged over pixels (over the True pixels of ``mask``
    when given). The ``T^2`` factor (Hinton et al., 2015) compensates the ``1/T^2`` shrinkage of
    the soft-target gradients, so the gradient magnitude w.r.t. the student logits stays roughly
    independent of ``T`` and the loss weight need not be re-tuned when ``T`` changes.

    Args:
        student_logits: (B, C, *spatial), e.g. (B, C, H, W); receives gradient.
        teacher_logits: same shape; detached inside (the teacher never gets gradient).
        temperature: softening temperature ``T > 0`` of the student (and of the teacher unless
            ``teacher_temperature`` is given); the loss is scaled by ``T^2``.
        mask: optional (B, *spatial) bool; pixels to distil on. An all-False mask returns an
            exact 0 that stays attached to the student graph (``backward()`` is safe).
        teacher_temperature: ``T_t > 0`` of the teacher's target; None means ``T``.

    Returns:
        Scalar tensor (>= 0; 0 when student == teacher).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    if teacher_temperature <= 0:
        raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 2:
        raise ValueError(f"logits must be (B, C, *spatial), got {tuple(student_logits.shape)}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / teacher_temperature, dim=1)
    # KL(q || p) = sum_c q_c (log q_c - log p_c); from log-probs, so q_c = 0 gives 0, not NaN.
    kl_map = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return (temperature**2) * _masked_pixel_mean(kl_map, mask)


def _check_levels(
    name: str,
    unit: str,
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    weights: Sequence[float],
) -> None:
    if len(student) == 0:
        raise ValueError(f"{name}: need at least one {unit}, got an empty sequence")
    if len(student) != len(teacher):
        raise ValueError(
            f"{name}: got {len(student)} student {unit}s but {len(teacher)} teacher {unit}s"
        )
    if len(weights) != len(student):
        raise ValueError(f"{name}: got {len(weights)} weights for {len(student)} {unit}s")
    if any(w < 0 for w in weights):
        raise ValueError(f"{name}: weights must be >= 0, got {list(weights)}")
    if sum(weights) <= 0:
        raise ValueError(f"{name}: weights must have a positive sum, got {list(weights)}")
    for level, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape:
            raise ValueError(
                f"{name}: {unit} {level} student shape {tuple(s.shape)} != teacher shape "
                f"{tuple(t.shape)}"
            )


def _weighted_mean(losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    total = sum(float(w) * loss for w, loss in zip(weights, losses))
    return total / float(sum(weights))


def multiscale_kd_loss(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    weights: Sequence[float],
    temperature: float,
    teacher_temperature: float | None = None,
) -> Tensor:
    """ScribSD+ multi-scale prediction-level KD: ``sum_s w_s KD_s / sum_s w_s``.

    ``KD_s`` is :func:`kd_kl_divergence` at decoder scale ``s`` (so each scale is averaged over
    its own pixels; coarse scales are not under-weighted by having fewer pixels).

    Args:
        student_logits: one (B, C, H_s, W_s) tensor per scale; resolutions may differ between
            scales.
        teacher_logits: same length; at each scale the same shape as the student's.
        weights: one non-negative weight per scale, positive sum.
        temperature: KD temperature ``T > 0`` (the ``T^2`` factor is applied per scale).
        teacher_temperature: the teacher's ``T_t`` (None: ``T``); see :func:`kd_kl_divergence`.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: empty input, mismatched lengths, bad weights, or a shape mismatch at a scale.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_levels("multiscale_kd_loss", "scale", student_logits, teacher_logits, weights)
    losses = [
        kd_kl_divergence(s, t, temperature=temperature, teacher_temperature=teacher_temperature)
        for s, t in zip(student_logits, teacher_logits)
    ]
    return _weighted_mean(losses, weights)


def feature_kd_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    weights: Sequence[float],
) -> Tensor:
    """Multi-scale feature-level KD (ScribSD): MSE between channel-L2-normalised feature maps.

    Per level: ``mean((normalize(f_s, dim=1) - normalize(f_t, dim=1))^2)`` over all
    B * D * H * W elements, i.e. ``mean_pixels (2 - 2 cos(f_s, f_t)) / D``; then the
    weighted mean over levels. Teacher features are detached inside. Student and teacher must
    have the same channel count at each level (project the student first if they differ).

    Args:
        student_features: one (B, D_l, H_l, W_l) tensor per level.
        teacher_features: same length; same shape as the student's at each level.
        weights: one non-negative weight per level, positive sum.

    Returns:
        Scalar tensor.

    Raises:
        ValueError: empty input, mismatched lengths, bad weights, or a shape mismatch at a level.
    """
    _check_levels("feature_kd_loss", "level", student_features, teacher_features, weights)
    losses = [
        F.mse_loss(F.normalize(s, dim=1), F.normalize(t.detach(), dim=1))
        for s, t in zip(student_features, teacher_features)
    ]
    return _weighted_mean(losses, weights)
