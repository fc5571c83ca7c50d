"""Teacher uncertainty by Monte-Carlo input perturbation (UA-MT, USTM)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from kdseg.losses.segmentation import sigmoid_rampup


@torch.no_grad()
def mc_predictive_entropy(
    predict: Callable[[Tensor], Tensor], image: Tensor, passes: int = 8, noise_std: float = 0.1,
    noise_clip: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """Mean softmax over ``passes`` noisy forward passes and its entropy.

    The passes run as one batched forward of ``passes * B`` images (SSL4MIS runs T/2 forwards of
    2B). Noise is ``clamp(N(0, noise_std^2), -noise_clip, noise_clip)``.

    Args:
        predict: maps ``(N, C_in, H, W)`` images to ``(N, C, H, W)`` logits.
        image: ``(B, C_in, H, W)``.

    Returns:
        ``(mean_probs (B, C, H, W), entropy (B, 1, H, W))`` in nats.
    """
    batch = image.repeat(passes, 1, 1, 1)
    noisy = batch + (torch.randn_like(batch) * noise_std).clamp(-noise_clip, noise_clip)
    probs = torch.softmax(predict(noisy).float(), dim=1)
    mean = probs.reshape(passes, image.shape[0], *probs.shape[1:]).mean(dim=0)
    entropy = -(mean * torch.log(mean + 1e-6)).sum(dim=1, keepdim=True)
    return mean, entropy


def uncertainty_threshold(step: int, total_steps: int, max_entropy: float = math.log(2)) -> float:
    """UA-MT's ramped threshold ``(0.75 + 0.25 * sigmoid_rampup(step, total_steps)) * max_entropy``:
    only the most certain pixels count early, nearly all later."""
    return (0.75 + 0.25 * sigmoid_rampup(step, total_steps)) * max_entropy


def masked_consistency(student_probs: Tensor, teacher_probs: Tensor, mask: Tensor) -> Tensor:
    """``sum(mask * (p_s - p_t)^2) / (2 * sum(mask))`` as in SSL4MIS / WSL4MIS (the 2 and the sum
    over classes are theirs); ``mask`` is ``(B, 1, H, W)`` float."""
    distance = (student_probs - teacher_probs.detach()) ** 2
    return (mask * distance).sum() / (2 * mask.sum() + 1e-16)
