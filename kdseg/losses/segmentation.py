"""Supervised and consistency losses of the baselines (SSL4MIS / WSL4MIS conventions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.losses.dice import soft_dice_loss


def ce_dice_loss(logits: Tensor, target: Tensor, ignore_index: int | None = None) -> Tensor:
    """``(CE + Dice) / 2`` on dense labels, the supervised loss of SSL4MIS (whose ``DiceLoss``
    squares the probabilities in the denominator: ``squared_pred=True``).

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)`` long class indices; ``ignore_index`` pixels excluded.
    """
    ce = F.cross_entropy(logits, target, ignore_index=-100 if ignore_index is None else ignore_index)
    dice = soft_dice_loss(
        torch.softmax(logits, dim=1), target, ignore_index=ignore_index, squared_pred=True
    )
    return 0.5 * (ce + dice)


def partial_cross_entropy(logits: Tensor, scribble: Tensor, ignore_index: int) -> Tensor:
    """pCE: cross-entropy over annotated (scribbled) pixels only.

    Args:
        logits: ``(B, C, H, W)``.
        scribble: ``(B, H, W)`` long; ``ignore_index`` marks unannotated pixels.

    Raises:
        ValueError: when no pixel of the batch is annotated (the loss would be NaN).
    """
    if not bool((scribble != ignore_index).any()):
        raise ValueError(
            "partial cross-entropy got a batch with no annotated pixel (every scribble value is "
            f"the ignore value {ignore_index}): check the scribbles of the labeled data"
        )
    return F.cross_entropy(logits, scribble, ignore_index=ignore_index)


def softmax_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean squared difference of softmax probabilities (Mean Teacher consistency).

    Args:
        student_logits, teacher_logits: ``(B, C, H, W)``; the teacher side is detached.
    """
    return F.mse_loss(
        torch.softmax(student_logits, dim=1), torch.softmax(teacher_logits.detach(), dim=1)
    )

