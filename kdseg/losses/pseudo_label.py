"""Dynamically Mixed Pseudo Label Supervision (DMPLS; Luo et al., MICCAI 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdseg.losses.dice import soft_dice_loss

__all__ = ["dmpls_loss", "dynamically_mixed_pseudo_label"]


def dynamically_mixed_pseudo_label(logits_a: Tensor, logits_b: Tensor, beta: float) -> Tensor:
    """Hard pseudo label ``argmax_c(beta * softmax(a) + (1 - beta) * softmax(b))``.

    Computed under ``no_grad`` (it is a target): the result never carries gradient.

    Args:
        logits_a: (B, C, *spatial) logits of decoder / branch A.
        logits_b: same shape, decoder / branch B.
        beta: mixing weight of branch A, in [0, 1].

    Returns:
        (B, *spatial) int64 label map.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            f"logits_a and logits_b must have the same shape, got {tuple(logits_a.shape)} "
            f"and {tuple(logits_b.shape)}"
        )
    with torch.no_grad():
        prob_a = torch.softmax(logits_a, dim=1)
        prob_b = torch.softmax(logits_b, dim=1)
        return (beta * prob_a + (1.0 - beta) * prob_b).argmax(dim=1)


def dmpls_loss(
    logits_a: Tensor,
    logits_b: Tensor,
    generator: torch.Generator | None = None,
    *,
    beta: float | None = None,
    squared_pred: bool = True,
) -> Tensor:
    """DMPLS pseudo-supervision loss of the two decoders of a dual-branch network.

    ``beta ~ U(0, 1)`` is drawn afresh at each call (from ``generator`` if given), the mixed
    hard pseudo label ``pl`` is built with :func:`dynamically_mixed_pseudo_label`, and the loss is
    ``0.5 * (dice(softmax(a), pl) + dice(softmax(b), pl))`` as in the official WSL4MIS DMPLS
    training script (``train_weakly_supervised_pCE_DMPLS``), which uses the Dice, not CE, loss
    on the pseudo label (with ``beta = random.random() + 1e-10``); the partial-CE scribble term
    is separate.

    Args:
        logits_a: (B, C, *spatial) logits of the main decoder.
        logits_b: same shape, auxiliary decoder.
        generator: optional ``torch.Generator`` for the draw of ``beta`` (reproducibility). Its
            device is used for the draw.
        beta: fix the mixing weight instead of drawing it (tests, ablations).
        squared_pred: passed to :func:`~kdseg.losses.dice.soft_dice_loss`. Default True
            reproduces the WSL4MIS ``DiceLoss`` (``sum p^2`` in the denominator).

    Returns:
        Scalar tensor; gradient flows into both logits through the softmax, never through ``pl``.
    """
    if beta is None:
        device = generator.device if generator is not None else torch.device("cpu")
        beta = float(torch.rand((), generator=generator, device=device))
    pseudo = dynamically_mixed_pseudo_label(logits_a, logits_b, beta)
    loss_a = soft_dice_loss(torch.softmax(logits_a, dim=1), pseudo, squared_pred=squared_pred)
    loss_b = soft_dice_loss(torch.softmax(logits_b, dim=1), pseudo, squared_pred=squared_pred)
    return 0.5 * (loss_a + loss_b)
