"""Stacks of instance masks and their pairwise overlaps, the ground of every instance metric.

Masks come as **stacks** ``(N, H, W)``, one per instance, and intersections are computed directly
on the stacks, so overlapping instances (a pixel in two cells) are handled exactly; nothing is
flattened to a label map. Float masks (probabilities) are binarised at 0.5; torch tensors are
accepted everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_mask_stack", "check_pair", "iou_from", "overlaps", "pairwise_iou", "to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """A numpy array from an array-like or a torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_mask_stack(x: Any, name: str, mask_threshold: float = 0.5) -> np.ndarray:
    """bool ``(N, H, W)`` from bool/int/float masks ``(N, H, W)`` or ``(N, 1, H, W)``."""
    arr = to_numpy(x)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected masks of shape (N, H, W), got {arr.shape}")
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr >= mask_threshold
    return arr != 0


def check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    """ValueError unless predicted and ground-truth masks have the same ``(H, W)``."""
    if pred.shape[1:] != gt.shape[1:]:
        raise ValueError(f"prediction masks are {pred.shape[1:]} but ground truth masks are {gt.shape[1:]}")


def overlaps(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``inter (G, P)``, ``area_gt (G,)``, ``area_pred (P,)`` as float64 pixel counts."""
    npix = int(np.prod(gt.shape[1:]))
    g = gt.reshape(gt.shape[0], npix)
    p = pred.reshape(pred.shape[0], npix)
    area_g = g.sum(axis=1, dtype=np.float64)
    area_p = p.sum(axis=1, dtype=np.float64)
    if g.shape[0] == 0 or p.shape[0] == 0:
        return np.zeros((g.shape[0], p.shape[0])), area_g, area_p
    # float32 products of 0/1 summed in float32 are exact up to 2**24 pixels per pair.
    if g.shape[1] < 2**24:
        inter = (g.astype(np.float32) @ p.astype(np.float32).T).astype(np.float64)
    else:
        inter = g.astype(np.float64) @ p.astype(np.float64).T
    return inter, area_g, area_p


def iou_from(inter: np.ndarray, area_g: np.ndarray, area_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``iou (G, P)`` and ``union (G, P)`` from the :func:`overlaps` counts (IoU 0 where the union is empty)."""
    union = area_g[:, None] + area_p[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou, union


def pairwise_iou(pred_masks: Any, gt_masks: Any) -> np.ndarray:
    """IoU matrix ``(G, P)`` between ground-truth and predicted instances."""
    pred, gt = as_mask_stack(pred_masks, "pred_masks"), as_mask_stack(gt_masks, "gt_masks")
    check_pair(pred, gt)
    return iou_from(*overlaps(pred, gt))[0]
