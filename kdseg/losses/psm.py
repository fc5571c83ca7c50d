"""Perturbation-sensitive mining (PSM) of MMT-PSM (Zhou et al., MICCAI 2020, arXiv 2007.10787).

The EMA teacher classifies the same RoIs on K perturbed views of an unlabeled image. Where the K
answers disagree the RoI is *perturbation sensitive*: a hard example. PSM distils the teacher's
(sharpened) mean prediction into the student on all positive RoIs (RoIs matched to a teacher
pseudo-label) and on the most sensitive negative RoIs only, about half as many as positives,
which are up-weighted. Pure functions, no module state:

- ``sensitivity``: :func:`perturbation_sensitivity`
  ``s_r = sum_c std_k p_k(c | r)`` over the K views (unbiased std, as the public code's
  ``torch.std``; K = 1 gives 0 for every RoI, i.e. no ranking signal).
- selection: :func:`select_sensitive_negatives` keeps ``floor(ratio * #positives)`` negatives of
  the highest sensitivity (``random=True``: a uniformly random subset, the "without PSM" ablation).
  Ties (e.g. K = 1) are broken at random.
- target: :func:`sharpen` of the teacher's mean logits over views, ``softmax(mean_k z_k / T)``
  (T = 0.5), which equals the usual sharpening ``p^(1/T) / sum p^(1/T)`` of ``softmax(mean z)``.
- ``L_psm``: :func:`psm_distillation_loss`
  ``L_psm = 1/C * mean_{r in kept} w_r * sum_c -t_rc log softmax(z^s_r)_c``
  with ``w_r = 1`` for positives and ``negative_weight`` (1.5) for mined negatives. The ``1/C``
  (C = number of classes, background included) follows the public code, so its loss weights
  carry over unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "perturbation_sensitivity",
    "psm_distillation_loss",
    "select_sensitive_negatives",
    "sharpen",
]


def perturbation_sensitivity(probs: Tensor) -> Tensor:
    """Per-RoI ``sensitivity``: the sum over classes of the std over views of class probabilities.

    Args:
        probs: ``(K, R, C)`` class probabilities of R RoIs on K perturbed views.

    Returns:
        ``(R,)``; zeros when ``K == 1`` (a single view has no spread).
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be (K, R, C), got shape {tuple(probs.shape)}")
    if probs.shape[0] < 2:
        return probs.new_zeros(probs.shape[1])
    return probs.std(dim=0, correction=1).sum(dim=-1)


def select_sensitive_negatives(
    sensitivity: Tensor,
    is_positive: Tensor,
    ratio: float = 0.5,
    generator: torch.Generator | None = None,
    random: bool = False,
) -> Tensor:
    """Indices of the negative RoIs PSM keeps: the ``floor(ratio * #positives)`` most sensitive.

    Args:
        sensitivity: ``(R,)`` from :func:`perturbation_sensitivity`.
        is_positive: ``(R,)`` bool, RoIs matched to a pseudo-label (the others are negatives).
        ratio: negatives kept per positive (0.5 in MMT-PSM: pos : neg = 2 : 1).
        generator: for the random tie-break / random selection (reproducible tests).
        random: choose the negatives uniformly at random instead (ablation "without PSM").

    Returns:
        int64 ``(N,)`` indices into the R RoIs, by decreasing sensitivity (random order when
        ``random``); empty when there is no positive or no negative.
    """
    if sensitivity.dim() != 1 or is_positive.shape != sensitivity.shape:
        raise ValueError(
            f"sensitivity (R,) and is_positive (R,) expected, got {tuple(sensitivity.shape)} and "
            f"{tuple(is_positive.shape)}"
        )
    if ratio < 0:
        raise ValueError(f"ratio must be >= 0, got {ratio}")
    is_positive = is_positive.bool()
    negatives = torch.nonzero(~is_positive).flatten()
    count = min(int(int(is_positive.sum()) * ratio), int(negatives.numel()))
    if count == 0:
        return negatives.new_zeros(0)
    # A random permutation first, then a stable sort: equal sensitivities come out in random order.
    perm = torch.randperm(negatives.numel(), generator=generator).to(negatives.device)
    negatives = negatives[perm]
    if random:
        return negatives[:count]
    order = torch.sort(sensitivity[negatives], descending=True, stable=True).indices
    return negatives[order[:count]]


def sharpen(logits: Tensor, temperature: float = 0.5) -> Tensor:
    """Sharpened class distribution ``softmax(logits / T)`` (= ``p^(1/T)`` renormalised).

    Args:
        logits: ``(..., C)``.
        temperature: T > 0; T < 1 sharpens, T = 1 is the plain softmax.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits / temperature, dim=-1)


def psm_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    is_positive: Tensor,
    negative_index: Tensor,
    temperature: float = 0.5,
    negative_weight: float = 1.5,
) -> Tensor:
    """``L_psm``: soft cross-entropy from the sharpened teacher mean to the student on kept RoIs.

    Args:
        student_logits: ``(R, C)`` the student's RoI class logits (one view), or ``(S, R, C)`` for
            S student views (the loss is averaged over them).
        teacher_logits: ``(K, R, C)`` the teacher's logits on K views (detached here).
        is_positive: ``(R,)`` bool; every positive RoI is kept.
        negative_index: int64 indices of the negatives kept (:func:`select_sensitive_negatives`).
        temperature: sharpening temperature of the target.
        negative_weight: ``w_r`` of the kept negatives (1.5 in MMT-PSM; positives have 1).

    Returns:
        Scalar ``1/C * mean_r w_r * CE(t_r, s_r)`` over kept RoIs; an exact 0 connected to the
        student's graph when nothing is kept (no pseudo-label in the batch).
    """
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher_logits must be (K, R, C), got {tuple(teacher_logits.shape)}")
    student = student_logits if student_logits.dim() == 3 else student_logits.unsqueeze(0)
    if student.shape[1:] != teacher_logits.shape[1:]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} do not match teacher logits "
            f"{tuple(teacher_logits.shape)} (same RoIs and classes needed)"
        )
    positives = torch.nonzero(is_positive.bool()).flatten()
    keep = torch.cat([positives, negative_index.to(positives.device).long()])
    if keep.numel() == 0:
        return student.sum() * 0.0
    num_classes = teacher_logits.shape[-1]
    target = sharpen(teacher_logits.detach().mean(dim=0)[keep], temperature)  # (N, C)
    weight = torch.ones(keep.numel(), device=student.device, dtype=student.dtype)
    weight[positives.numel():] = negative_weight
    log_probs = F.log_softmax(student[:, keep], dim=-1)  # (S, N, C)
    cross_entropy = -(target.unsqueeze(0) * log_probs).sum(dim=-1)  # (S, N)
    return (cross_entropy * weight).mean(dim=-1).mean() / num_classes
