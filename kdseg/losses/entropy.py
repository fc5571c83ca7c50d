"""Entropy minimisation (Grandvalet & Bengio, NeurIPS 2005) for unlabelled / unannotated pixels.

Also home of the small pixel-reduction helper shared by the distillation losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["entropy_map", "entropy_minimization"]


def _check_mask(values: Tensor, mask: Tensor | None) -> None:
    """Raise unless ``mask`` is None or a bool tensor shaped like ``values`` (B, *spatial)."""
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != values.shape:
        raise ValueError(
            f"mask must have shape (B, *spatial) = {tuple(values.shape)}, got {tuple(mask.shape)}"
        )


def _masked_pixel_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of a per-pixel map ``values`` (B, *spatial), over all pixels or over ``mask``.

    Args:
        values: (B, *spatial) float per-pixel loss.
        mask: None, or (B, *spatial) bool; only True pixels are averaged.

    Returns:
        Scalar. With an all-False mask it is an exact 0 that is still attached to the graph of
        ``values`` (an empty sum), so ``backward()`` works and yields zero gradients.
    """
    _check_mask(values, mask)
    if mask is None:
        return values.mean()
    selected = values[mask]
    return selected.sum() / max(selected.numel(), 1)


def entropy_map(logits: Tensor) -> Tensor:
    """Per-pixel Shannon entropy ``-sum_c p_c log p_c`` (nats) of ``softmax(logits)``.

    Args:
        logits: (B, C, *spatial) raw network outputs.

    Returns:
        (B, *spatial) entropy, in [0, log C]. Computed from ``log_softmax`` so saturated logits
        give 0 * finite = 0 instead of 0 * log(0) = NaN.
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def entropy_minimization(logits: Tensor, mask: Tensor | None = None, normalized: bool = False) -> Tensor:
    """Entropy minimisation: pixel mean of ``-sum_c p_c log p_c`` (Grandvalet & Bengio 2005).

    ``normalized=True`` divides by ``ln C`` (range [0, 1]), which is what WSL4MIS
    ``code/utils/losses.py`` ``entropy_loss`` computes. Unlike that function no ``+1e-6`` goes
    inside the log (``log_softmax`` is exact and finite); the difference is below 1e-5.

    Args:
        logits: (B, C, *spatial) raw network outputs (softmax is applied here).
        mask: optional (B, *spatial) bool; average only over True pixels (e.g. unannotated
            pixels). An empty mask gives 0, still attached to the graph.
        normalized: divide by ``ln C``.

    Returns:
        Scalar tensor; ``log C`` (1 if ``normalized``) for uniform predictions, ~0 for confident
        ones.
    """
    mean_entropy = _masked_pixel_mean(entropy_map(logits), mask)
    if normalized:
        num_classes = logits.shape[1]
        if num_classes < 2:
            raise ValueError(f"normalized entropy needs at least 2 classes, got {num_classes}")
        return mean_entropy / math.log(num_classes)
    return mean_entropy
