"""Aggregated Jaccard Index (AJI) on overlapping instance stacks: Kumar's definition and the
gated variant of the MMT-PSM evaluation code."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kdseg.metrics.instance_overlap import as_mask_stack, check_pair, iou_from, overlaps, to_numpy

__all__ = ["aggregated_jaccard_index", "aggregated_jaccard_index_gated", "aji_counts", "aji_gated_counts"]


def aji_counts(inter: np.ndarray, area_g: np.ndarray, area_p: np.ndarray) -> tuple[float, float]:
    """Kumar's C (aggregated intersection) and U (aggregated union)."""
    n_gt, n_pred = inter.shape
    if n_pred == 0:
        return 0.0, float(area_g.sum())
    iou, union = iou_from(inter, area_g, area_p)
    best = iou.argmax(axis=1) if n_gt else np.zeros(0, dtype=int)
    used = np.zeros(n_pred, dtype=bool)
    c = u = 0.0
    for i, j in enumerate(best):
        if inter[i, j] > 0:
            c += inter[i, j]
            u += union[i, j]
            used[j] = True
        else:  # no overlapping prediction: the whole GT is missed
            u += area_g[i]
    u += float(area_p[~used].sum())
    return float(c), float(u)


def aji_gated_counts(
    inter: np.ndarray,
    area_g: np.ndarray,
    area_p: np.ndarray,
    iou_threshold: float,
    order: np.ndarray | None = None,
) -> tuple[float, float]:
    """C and U of the gated AJI (see :func:`aggregated_jaccard_index_gated`); predictions visited in
    ``order`` (default: their index order)."""
    n_gt, n_pred = inter.shape
    if n_pred == 0:
        return 0.0, float(area_g.sum())
    iou, union = iou_from(inter, area_g, area_p)
    order = np.arange(n_pred) if order is None else np.asarray(order)
    used = np.zeros(n_pred, dtype=bool)
    c = u = 0.0
    for i in range(n_gt):
        cand = iou[i, order].copy()
        cand[used[order]] = -1.0
        k = int(np.argmax(cand))  # first in ``order`` among ties
        if cand[k] >= iou_threshold and cand[k] > 0:
            j = order[k]
            c += inter[i, j]
            u += union[i, j]
            used[j] = True
        else:
            u += area_g[i]
    u += float(area_p[~used].sum())
    return float(c), float(u)


def aggregated_jaccard_index(pred_masks: Any, gt_masks: Any) -> float:
    """Aggregated Jaccard Index of Kumar et al. (IEEE TMI 2017) on overlapping instance stacks.

    For each ground-truth instance ``G_i`` the prediction ``S_j`` with the largest IoU is taken;
    if it overlaps ``G_i``, ``C += |G_i ∩ S_j|`` and ``U += |G_i ∪ S_j|``, otherwise
    ``U += |G_i|``. A prediction may be the best match of several GTs (then it is counted in
    each of their unions), as in Kumar's definition. Predictions never chosen add their area to
    ``U``. AJI = C / U.

    Args:
        pred_masks: ``(P, H, W)`` predicted instances (bool; floats are binarised at 0.5).
        gt_masks: ``(G, H, W)`` ground-truth instances; both stacks may overlap internally.

    Returns:
        AJI in [0, 1]; NaN when there is neither ground truth nor prediction (U = 0).
    """
    pred, gt = as_mask_stack(pred_masks, "pred_masks"), as_mask_stack(gt_masks, "gt_masks")
    check_pair(pred, gt)
    c, u = aji_counts(*overlaps(pred, gt))
    return c / u if u > 0 else math.nan


def aggregated_jaccard_index_gated(
    pred_masks: Any,
    gt_masks: Any,
    iou_threshold: float = 0.5,
    pred_scores: Any = None,
) -> float:
    """AJI as computed by the MMT-PSM evaluation code (Zhou et al., MICCAI 2020), "gated" AJI.

    Differences from Kumar's :func:`aggregated_jaccard_index`:

    - a ground-truth instance is matched only if its best available prediction has
      IoU >= ``iou_threshold`` (0.5); otherwise it counts as missed (``U += |G|``), even when a
      prediction overlaps it partly;
    - matching is one-to-one: GTs are visited in order and each takes the still-unmatched
      prediction with the highest IoU (predictions visited by decreasing ``pred_scores`` when
      given, which decides ties), so a prediction is never reused;
    - every unmatched prediction adds its area to ``U``.

    With poor predictions this is lower than Kumar's AJI (partial overlaps give nothing to C but
    still count in U); with good predictions the two agree.

    Returns:
        C / U; NaN when there is neither ground truth nor prediction.
    """
    pred, gt = as_mask_stack(pred_masks, "pred_masks"), as_mask_stack(gt_masks, "gt_masks")
    check_pair(pred, gt)
    order = None
    if pred_scores is not None:
        scores = to_numpy(pred_scores).reshape(-1)
        if scores.shape[0] != pred.shape[0]:
            raise ValueError(f"{scores.shape[0]} scores for {pred.shape[0]} predicted masks")
        order = np.argsort(-scores, kind="mergesort")
    c, u = aji_gated_counts(*overlaps(pred, gt), iou_threshold=iou_threshold, order=order)
    return c / u if u > 0 else math.nan
