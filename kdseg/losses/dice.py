"""Soft Dice loss of probabilities against a hard label map (SSL4MIS/WSL4MIS ``DiceLoss`` style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_dice_loss"]


def soft_dice_loss(
    probs: Tensor,
    target: Tensor,
    ignore_index: int | None = None,
    smooth: float = 1e-5,
    squared_pred: bool = False,
) -> Tensor:
    """Mean over classes of ``1 - (2 sum p g + s) / (sum p + sum g + s)``.

    As in SSL4MIS/WSL4MIS ``DiceLoss``, each class's sums run over the whole batch (all images
    and pixels pooled, not per image), every class including background counts, and the class
    losses are averaged with equal weight. A class absent from both prediction and target gives
    ``1 - s/s = 0``.

    Args:
        probs: (B, C, *spatial) probabilities (e.g. ``softmax(logits, 1)``); not re-normalised.
        target: (B, *spatial) integer labels in ``[0, C)``, or ``ignore_index``.
        ignore_index: label of pixels to exclude from every sum (e.g. unannotated scribble
            pixels); None = no pixel is excluded.
        smooth: ``s``, added to numerator and denominator.
        squared_pred: use ``sum p^2`` instead of ``sum p`` in the denominator. The SSL4MIS /
            WSL4MIS ``DiceLoss`` actually does this (``z_sum = sum(score * score)``; for the
            one-hot target ``g^2 = g``); pass True to reproduce that code exactly.

    Returns:
        Scalar tensor in [0, 1].
    """
    if probs.dim() < 2:
        raise ValueError(f"probs must be (B, C, *spatial), got {tuple(probs.shape)}")
    if target.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(
            f"target must have shape (B, *spatial) = {tuple(probs.shape[:1] + probs.shape[2:])}, "
            f"got {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer label map, got dtype {target.dtype}")
    num_classes = probs.shape[1]
    if ignore_index is None:
        valid = torch.ones_like(target, dtype=torch.bool)
    else:
        valid = target != ignore_index
    labels = torch.where(valid, target, torch.zeros_like(target))
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"target labels must be in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"got values in [{int(target.min())}, {int(target.max())}]"
        )
    # (B, *spatial, C) -> (B, C, *spatial), zeroed at ignored pixels.
    onehot = F.one_hot(labels.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    weight = valid.unsqueeze(1).to(probs.dtype)
    onehot = onehot * weight
    p = probs * weight
    reduce_dims = [0, *range(2, probs.dim())]
    intersect = (p * onehot).sum(dim=reduce_dims)
    pred_sum = (p * p if squared_pred else p).sum(dim=reduce_dims)
    target_sum = onehot.sum(dim=reduce_dims)
    dice = (2.0 * intersect + smooth) / (pred_sum + target_sum + smooth)
    return (1.0 - dice).mean()
