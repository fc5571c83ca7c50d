"""Mask-guided feature distillation (MGD) of MMT-PSM (Zhou et al., MICCAI 2020, arXiv 2007.10787).

Student and teacher FPN features, each passed through its own 1x1 adaptor (the teacher's adaptor
is the EMA of the student's), are pulled together only where the teacher sees foreground: the
union of the teacher's predicted instance masks, pasted into the input image and pooled to each
FPN level. Background, where most of a cytology image is, does not dominate the loss.

``L_mgd`` (:func:`mask_guided_feature_distillation`)::

    L_mgd = mean over views k and levels l of
            sum_{b,c,y,x} M_l[b,y,x] * (A_s(F^s_l) - A_t(F^t_{k,l}))^2[b,c,y,x] / (C_l * sum M_l + eps)

``M_l`` (:func:`foreground_masks_per_level`): the image-space foreground mask average-pooled to
level l's size and binarised at 0.5 (as the public code). Without the gate (``masks=None``) the
mask is all ones and the loss is the plain mean squared difference of the adapted features.
Features of flipped teacher views must be flipped back by the caller before this function.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["foreground_masks_per_level", "mask_guided_feature_distillation"]


def foreground_masks_per_level(
    foreground: Tensor, sizes: Sequence[tuple[int, int]], threshold: float = 0.5
) -> list[Tensor]:
    """The image-space foreground pooled to each feature level.

    Args:
        foreground: ``(B, H, W)`` bool or [0, 1] float, in the (padded) input frame of the features.
        sizes: ``(h, w)`` of each level.
        threshold: a feature cell is foreground when more than this fraction of it is.

    Returns:
        One float ``(B, 1, h, w)`` tensor of 0/1 per level.
    """
    if foreground.dim() != 3:
        raise ValueError(f"foreground must be (B, H, W), got shape {tuple(foreground.shape)}")
    fg = foreground.float().unsqueeze(1)
    return [(F.adaptive_avg_pool2d(fg, tuple(size)) > threshold).float() for size in sizes]


def mask_guided_feature_distillation(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor] | Sequence[Sequence[Tensor]],
    masks: Sequence[Tensor] | None,
    eps: float = 1e-7,
) -> Tensor:
    """``L_mgd`` on adapted features (see the module docstring).

    Args:
        student_feats: per level ``(B, C_l, h_l, w_l)``, the student's adapted features.
        teacher_feats: per level tensors of the same shapes (one teacher view), or a list of such
            lists (K views; the loss is averaged over views). Detached here.
        masks: per level ``(B, 1, h_l, w_l)`` 0/1 foreground masks; None = no gate.
        eps: keeps an empty mask at an exact 0 loss.

    Returns:
        The scalar loss; 0 (with the student's graph) where no level has foreground.
    """
    if not student_feats:
        raise ValueError("no feature level given")
    views: Sequence[Sequence[Tensor]]
    views = [teacher_feats] if isinstance(teacher_feats[0], Tensor) else teacher_feats  # type: ignore[list-item]
    if masks is not None and len(masks) != len(student_feats):
        raise ValueError(f"{len(masks)} masks for {len(student_feats)} feature levels")
    terms = []
    for view in views:
        if len(view) != len(student_feats):
            raise ValueError(f"teacher view has {len(view)} levels, student {len(student_feats)}")
        for level, (s, t) in enumerate(zip(student_feats, view)):
            if s.shape != t.shape:
                raise ValueError(f"level {level}: student {tuple(s.shape)} != teacher {tuple(t.shape)}")
            squared = (s - t.detach()) ** 2
            if masks is None:
                terms.append(squared.mean())
                continue
            m = masks[level].to(s.dtype)
            if m.shape[0] != s.shape[0] or m.shape[-2:] != s.shape[-2:]:
                raise ValueError(f"level {level}: mask {tuple(m.shape)} does not fit features {tuple(s.shape)}")
            terms.append((squared * m).sum() / (s.shape[1] * m.sum() + eps))
    return torch.stack(terms).mean()
