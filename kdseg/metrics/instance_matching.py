"""One-to-one matching of predicted and ground-truth instances at an IoU threshold, and the
detection F1 and the Dice of matched objects that follow from it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from kdseg.metrics.instance_overlap import as_mask_stack, check_pair, iou_from, overlaps

__all__ = ["InstanceMatch", "f1_at_iou", "match_from", "match_instances", "matched_dice"]


@dataclass
class InstanceMatch:
    """One-to-one matching between predictions and ground truth at an IoU threshold.

    Attributes:
        pred_idx, gt_idx: ``(K,)`` indices of the matched pairs.
        iou: ``(K,)`` IoU of each pair; ``dice``: ``(K,)`` Dice of each pair.
        num_pred, num_gt: sizes of the two stacks.
    """

    pred_idx: np.ndarray
    gt_idx: np.ndarray
    iou: np.ndarray
    dice: np.ndarray
    num_pred: int
    num_gt: int

    @property
    def tp(self) -> int:
        return int(self.pred_idx.shape[0])

    @property
    def fp(self) -> int:
        return self.num_pred - self.tp

    @property
    def fn(self) -> int:
        return self.num_gt - self.tp

    @property
    def f1(self) -> float:
        den = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / den if den else math.nan

    @property
    def mean_dice(self) -> float:
        if self.tp:
            return float(self.dice.mean())
        return 0.0 if self.num_gt else math.nan


def match_from(
    inter: np.ndarray, area_g: np.ndarray, area_p: np.ndarray, iou_threshold: float
) -> InstanceMatch:
    """:func:`match_instances` from the overlap counts of :func:`~kdseg.metrics.instance_overlap.overlaps`."""
    n_gt, n_pred = inter.shape
    iou, _ = iou_from(inter, area_g, area_p)
    valid = (iou >= iou_threshold) & (iou > 0)
    if valid.any():
        # Maximise the number of matches first, then the total IoU (the IoU term sums to < 1).
        k = min(n_gt, n_pred)
        cost = -(valid.astype(np.float64) + np.where(valid, iou, 0.0) / (k + 1))
        rows, cols = linear_sum_assignment(cost)
        keep = valid[rows, cols]
        g_idx, p_idx = rows[keep], cols[keep]
    else:
        g_idx = p_idx = np.zeros(0, dtype=np.int64)
    pair_iou = iou[g_idx, p_idx]
    den = area_g[g_idx] + area_p[p_idx]
    pair_dice = np.divide(2 * inter[g_idx, p_idx], den, out=np.zeros_like(den), where=den > 0)
    return InstanceMatch(p_idx.astype(np.int64), g_idx.astype(np.int64), pair_iou, pair_dice, n_pred, n_gt)


def match_instances(pred: Any, gt: Any, iou_threshold: float = 0.5) -> InstanceMatch:
    """One-to-one matching of predicted and ground-truth instances with IoU >= ``iou_threshold``.

    Optimal (Hungarian, ``scipy.optimize.linear_sum_assignment``): the largest number of pairs
    with IoU >= threshold, ties broken by the largest total IoU. With overlapping GTs one
    prediction may pass the threshold for two of them; it is still matched to at most one.
    """
    p, g = as_mask_stack(pred, "pred"), as_mask_stack(gt, "gt")
    check_pair(p, g)
    return match_from(*overlaps(p, g), iou_threshold)


def f1_at_iou(pred: Any, gt: Any, iou_threshold: float = 0.5) -> float:
    """Detection F1 = 2 TP / (2 TP + FP + FN) with one-to-one matches at IoU >= threshold.

    NaN when there is neither prediction nor ground truth; 0 when only one side is empty.
    """
    return match_instances(pred, gt, iou_threshold).f1


def matched_dice(pred: Any, gt: Any, iou_threshold: float = 0.5) -> float:
    """Mean Dice ``2|A∩B| / (|A| + |B|)`` over the matched pairs (IoU >= threshold).

    Measures how well the detected objects are delineated; missed objects are counted by F1.
    0 when there is ground truth but nothing matched, NaN when there is no ground truth.
    """
    return match_instances(pred, gt, iou_threshold).mean_dice
