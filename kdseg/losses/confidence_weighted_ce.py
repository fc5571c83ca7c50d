"""Confidence-weighted cross-entropy to pseudo-labels: ACTION's ``L_unsup`` (ReCo's weighting)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["confidence_weighted_cross_entropy"]


def confidence_weighted_cross_entropy(
    logits: Tensor, pseudo_label: Tensor, confidence: Tensor, threshold: float, weighting: str
) -> Tensor:
    """``L_unsup``: cross-entropy against pseudo-labels, weighted by the teacher's confidence.

    Args:
        logits: ``(B, C, H, W)`` student scores on the perturbed view.
        pseudo_label: ``(B, H, W)`` long, the teacher's argmax (mixed like the images).
        confidence: ``(B, H, W)`` the teacher's max probability (mixed like the images).
        threshold: confidence a pixel needs to count as confident.
        weighting: ``confident_fraction``: every pixel of image ``b`` is weighted by the fraction
            of confident pixels of ``b`` (ReCo / the ACTION code); ``threshold``: only confident
            pixels count (FixMatch), weight 1 each.

    Returns:
        ``mean_{b, p} w_{b,p} * CE_{b,p}`` over all pixels.
    """
    ce = F.cross_entropy(logits, pseudo_label, reduction="none")
    confident = (confidence >= threshold).to(ce.dtype)
    if weighting == "confident_fraction":
        weight = confident.flatten(1).mean(dim=1)[:, None, None]
    elif weighting == "threshold":
        weight = confident
    else:
        raise ValueError(f"unsup_weighting must be 'confident_fraction' or 'threshold', got {weighting!r}")
    return (weight * ce).mean()
