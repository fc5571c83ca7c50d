"""Instance masks predicted on a resized image, brought back to the ground truth's native size.

ISBI 2014 images are 512 px; kdseg may train and predict at a smaller ``image_size`` (CPU
budgets), but the literature scores AJI / mAP at 512 px, as ACDC volumes are scored at their own
size. The predicted masks are therefore resized to the native size before scoring.

Choice: **bilinear on the mask probabilities, then ``>= 0.5``** (not nearest on binary masks).
Mask R-CNN's masks are probabilities that torchvision itself pastes into the image by bilinear
resizing (``roi_heads.paste_masks_in_image``), kdseg thresholding them at 0.5 afterwards;
resizing the probabilities once more and thresholding last keeps the boundary's sub-pixel
position, whereas nearest-neighbour upsampling of a binary mask gives staircase boundaries on
the coarse grid (2x2 blocks at the 256 -> 512 px scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["masks_to_size"]


def masks_to_size(probabilities: Tensor, size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Binary masks ``(N, H, W)`` at ``size = (H, W)`` from probabilities ``(N, 1, h, w)`` or ``(N, h, w)``.

    Bilinear (``align_corners=False``: pixel centres map as the image resize does) when the
    size differs, then ``>= threshold``; the probabilities are only thresholded when it does not.
    """
    if probabilities.ndim == 4:
        if probabilities.shape[1] != 1:
            raise ValueError(f"expected (N, 1, h, w) mask probabilities, got shape {tuple(probabilities.shape)}")
        probabilities = probabilities[:, 0]
    if probabilities.ndim != 3:
        raise ValueError(f"expected (N, h, w) or (N, 1, h, w) mask probabilities, got {tuple(probabilities.shape)}")
    target = (int(size[0]), int(size[1]))
    probs = probabilities.float()
    if tuple(probs.shape[-2:]) != target:
        if probs.shape[0] == 0:
            return torch.zeros((0, *target), dtype=torch.bool, device=probs.device)
        probs = F.interpolate(probs[:, None], size=target, mode="bilinear", align_corners=False)[:, 0]
    return probs >= threshold
