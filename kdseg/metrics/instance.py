"""Instance-segmentation metrics for overlapping objects (cervical cells and nuclei).

All functions take **stacks of boolean masks** ``(N, H, W)``, one per instance, and compute
intersections directly on the stacks, so overlapping instances (a pixel in two cells) are handled
exactly; nothing is flattened to a label map.

- :func:`aggregated_jaccard_index`: AJI of Kumar et al. (IEEE TMI 2017).
- :func:`aggregated_jaccard_index_gated`: the AJI variant computed by the MMT-PSM evaluation code
  (Zhou et al., MICCAI 2020): one-to-one matches with IoU >= 0.5 only.
- :func:`match_instances`, :func:`f1_at_iou`, :func:`matched_dice`: one-to-one matching at an IoU
  threshold and the detection F1 / Dice of matched objects.
- :class:`InstanceMetricAccumulator`: per-class (cytoplasm, nucleus) and mean AJI, gated AJI,
  F1@0.5, Dice and COCO mask mAP / AP50 / AP75 over a data set, plus per-image rows for a CSV.

Float masks (probabilities) are binarised at 0.5; torch tensors are accepted everywhere.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

DEFAULT_CLASSES: dict[int, str] = {1: "cytoplasm", 2: "nucleus"}

#: COCO's IoU thresholds 0.50:0.05:0.95, bit for bit as pycocotools builds them (float64
#: ``np.linspace``, ``cocoeval.Params``). torchmetrics' default builds them in float32, where 0.8
#: becomes 0.800000012 and a pair at IoU exactly 0.8 (e.g. 104/130) is no longer a match.
COCO_IOU_THRESHOLDS: tuple[float, ...] = tuple(np.linspace(0.5, 0.95, 10).tolist())


# --------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_stack(x: Any, name: str, mask_threshold: float = 0.5) -> np.ndarray:
    """bool ``(N, H, W)`` from bool/int/float masks ``(N, H, W)`` or ``(N, 1, H, W)``."""
    arr = _to_numpy(x)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected masks of shape (N, H, W), got {arr.shape}")
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr >= mask_threshold
    return arr != 0


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape[1:] != gt.shape[1:]:
        raise ValueError(f"prediction masks are {pred.shape[1:]} but ground truth masks are {gt.shape[1:]}")


def _overlaps(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _iou_from(inter: np.ndarray, area_g: np.ndarray, area_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    union = area_g[:, None] + area_p[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou, union


def pairwise_iou(pred_masks: Any, gt_masks: Any) -> np.ndarray:
    """IoU matrix ``(G, P)`` between ground-truth and predicted instances."""
    pred, gt = _as_stack(pred_masks, "pred_masks"), _as_stack(gt_masks, "gt_masks")
    _check_pair(pred, gt)
    return _iou_from(*_overlaps(pred, gt))[0]


# --------------------------------------------------------------------------- AJI


def _aji_counts(inter: np.ndarray, area_g: np.ndarray, area_p: np.ndarray) -> tuple[float, float]:
    """Kumar's C (aggregated intersection) and U (aggregated union)."""
    n_gt, n_pred = inter.shape
    if n_pred == 0:
        return 0.0, float(area_g.sum())
    iou, union = _iou_from(inter, area_g, area_p)
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


def _aji_gated_counts(
    inter: np.ndarray,
    area_g: np.ndarray,
    area_p: np.ndarray,
    iou_threshold: float,
    order: np.ndarray | None = None,
) -> tuple[float, float]:
    n_gt, n_pred = inter.shape
    if n_pred == 0:
        return 0.0, float(area_g.sum())
    iou, union = _iou_from(inter, area_g, area_p)
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
    pred, gt = _as_stack(pred_masks, "pred_masks"), _as_stack(gt_masks, "gt_masks")
    _check_pair(pred, gt)
    c, u = _aji_counts(*_overlaps(pred, gt))
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
    pred, gt = _as_stack(pred_masks, "pred_masks"), _as_stack(gt_masks, "gt_masks")
    _check_pair(pred, gt)
    order = None
    if pred_scores is not None:
        scores = _to_numpy(pred_scores).reshape(-1)
        if scores.shape[0] != pred.shape[0]:
            raise ValueError(f"{scores.shape[0]} scores for {pred.shape[0]} predicted masks")
        order = np.argsort(-scores, kind="mergesort")
    c, u = _aji_gated_counts(*_overlaps(pred, gt), iou_threshold=iou_threshold, order=order)
    return c / u if u > 0 else math.nan


# --------------------------------------------------------------------------- matching, F1, Dice


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


def _match_from(
    inter: np.ndarray, area_g: np.ndarray, area_p: np.ndarray, iou_threshold: float
) -> InstanceMatch:
    n_gt, n_pred = inter.shape
    iou, _ = _iou_from(inter, area_g, area_p)
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
    p, g = _as_stack(pred, "pred"), _as_stack(gt, "gt")
    _check_pair(p, g)
    return _match_from(*_overlaps(p, g), iou_threshold)


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


# --------------------------------------------------------------------------- accumulator


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else math.nan


class InstanceMetricAccumulator:
    """Accumulates per-image instance metrics per class and computes data-set summaries.

    Per class (default 1 = cytoplasm, 2 = nucleus) and their mean over classes:

    - ``aji_<cls>``: Kumar AJI per image, averaged over the images where the class has GT or
      predictions. An image with GT but no predictions scores 0 (never skipped).
    - ``aji_gated_<cls>``: the MMT-PSM AJI (:func:`aggregated_jaccard_index_gated`), same averaging.
    - ``f1_<cls>``: F1 at IoU >= ``iou_threshold`` from TP / FP / FN summed over all images.
    - ``dice_<cls>``: mean Dice over all matched pairs of the data set (0 if the class has GT but
      nothing was matched, NaN if it has no GT).
    - ``map_<cls>``, ``ap50_<cls>``, ``ap75_<cls>``: COCO mask AP (IoU 0.50:0.95, 0.50, 0.75)
      from ``torchmetrics.detection.MeanAveragePrecision(iou_type="segm", class_metrics=True)``
      (pycocotools backend, COCO's float64 IoU thresholds :data:`COCO_IOU_THRESHOLDS`); NaN for a
      class without GT.
    - ``*_mean``: the mean over classes of the defined (non-NaN) per-class values; for mAP this
      equals torchmetrics' ``map`` / ``map_50`` / ``map_75``.

    AJI, F1 and Dice use the predictions with ``score >= score_threshold``; mAP ranks all of them.

    Args:
        classes: label -> name of the classes to evaluate; other labels are ignored.
        iou_threshold: IoU for F1 / Dice matching (and the gate of the gated AJI).
        score_threshold: minimum score of the predictions used for AJI, F1 and Dice.
        mask_threshold: float (probability) masks are binarised at this value.
        compute_map: also compute COCO mAP (needs ``scores``).
        max_detections: the largest of COCO's max-detections thresholds (``[1, 10, N]``).
    """

    ROW_FIELDS = ("image_id", "class", "num_gt", "num_pred", "aji", "aji_gated", "tp", "fp", "fn", "f1", "dice")

    def __init__(
        self,
        classes: Mapping[int, str] | None = None,
        iou_threshold: float = 0.5,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        compute_map: bool = True,
        max_detections: int = 100,
    ) -> None:
        self.classes = dict(classes or DEFAULT_CLASSES)
        self.iou_threshold = float(iou_threshold)
        self.score_threshold = float(score_threshold)
        self.mask_threshold = float(mask_threshold)
        self.compute_map = compute_map
        self.max_detections = int(max_detections)
        self.reset()

    def reset(self) -> None:
        self._rows: list[dict[str, Any]] = []
        self._stats: dict[int, dict[str, Any]] = {
            c: {"tp": 0, "fp": 0, "fn": 0, "dice": [], "n_gt": 0} for c in self.classes
        }
        self._image_ids: list[str] = []
        self._map = None
        if self.compute_map:
            from torchmetrics.detection import MeanAveragePrecision

            self._map = MeanAveragePrecision(
                iou_type="segm",
                class_metrics=True,
                extended_summary=True,
                max_detection_thresholds=[1, 10, self.max_detections],
                iou_thresholds=list(COCO_IOU_THRESHOLDS),
                backend="pycocotools",
            )

    @property
    def num_images(self) -> int:
        return len(self._image_ids)

    def update(self, pred: Any, target: Any, image_id: Any = None) -> None:
        """Add one image, or a batch given as lists of dicts (then ``image_id`` is a list or None).

        Args:
            pred: ``masks`` ``(P, H, W)`` bool (or ``(P, 1, H, W)`` probabilities), ``scores``
                ``(P,)`` (ones when missing), ``labels`` ``(P,)``.
            target: ``masks`` ``(G, H, W)``, ``labels`` ``(G,)``.
            image_id: name of the image in :meth:`per_image_rows` (running index when None).
        """
        if isinstance(pred, (list, tuple)):
            if not isinstance(target, (list, tuple)) or len(target) != len(pred):
                raise ValueError("a batch of predictions needs a list of targets of the same length")
            ids = list(image_id) if image_id is not None else [None] * len(pred)
            for p, t, i in zip(pred, target, ids):
                self.update(p, t, i)
            return

        image_id = str(image_id) if image_id is not None else str(self.num_images)
        if image_id in self._image_ids:
            raise ValueError(f"image_id {image_id!r} was already added")
        p_masks = _as_stack(pred["masks"], "pred['masks']", self.mask_threshold)
        g_masks = _as_stack(target["masks"], "target['masks']", self.mask_threshold)
        _check_pair(p_masks, g_masks)
        p_labels = _to_numpy(pred["labels"]).reshape(-1).astype(np.int64)
        g_labels = _to_numpy(target["labels"]).reshape(-1).astype(np.int64)
        scores = pred.get("scores")
        p_scores = (
            np.ones(p_masks.shape[0], dtype=np.float64)
            if scores is None
            else _to_numpy(scores).reshape(-1).astype(np.float64)
        )
        if not (len(p_labels) == len(p_scores) == p_masks.shape[0]):
            raise ValueError(
                f"image {image_id}: {p_masks.shape[0]} predicted masks, {len(p_labels)} labels, "
                f"{len(p_scores)} scores"
            )
        if len(g_labels) != g_masks.shape[0]:
            raise ValueError(f"image {image_id}: {g_masks.shape[0]} target masks but {len(g_labels)} labels")
        self._image_ids.append(image_id)

        for cls, name in self.classes.items():
            sel_p = np.flatnonzero((p_labels == cls) & (p_scores >= self.score_threshold))
            sel_p = sel_p[np.argsort(-p_scores[sel_p], kind="mergesort")]
            pm = p_masks[sel_p]
            gm = g_masks[g_labels == cls]
            inter, area_g, area_p = _overlaps(pm, gm)
            c, u = _aji_counts(inter, area_g, area_p)
            cg, ug = _aji_gated_counts(inter, area_g, area_p, self.iou_threshold)  # pm is score-sorted
            match = _match_from(inter, area_g, area_p, self.iou_threshold)
            st = self._stats[cls]
            st["tp"] += match.tp
            st["fp"] += match.fp
            st["fn"] += match.fn
            st["n_gt"] += match.num_gt
            st["dice"].extend(match.dice.tolist())
            self._rows.append(
                {
                    "image_id": image_id,
                    "class": name,
                    "num_gt": match.num_gt,
                    "num_pred": match.num_pred,
                    "aji": c / u if u > 0 else math.nan,
                    "aji_gated": cg / ug if ug > 0 else math.nan,
                    "tp": match.tp,
                    "fp": match.fp,
                    "fn": match.fn,
                    "f1": match.f1,
                    "dice": match.mean_dice,
                }
            )

        if self._map is not None:
            import torch

            keep_p = np.isin(p_labels, list(self.classes))
            keep_g = np.isin(g_labels, list(self.classes))
            self._map.update(
                [
                    {
                        "masks": torch.from_numpy(np.ascontiguousarray(p_masks[keep_p])),
                        "scores": torch.from_numpy(p_scores[keep_p]).float(),
                        "labels": torch.from_numpy(p_labels[keep_p]),
                    }
                ],
                [
                    {
                        "masks": torch.from_numpy(np.ascontiguousarray(g_masks[keep_g])),
                        "labels": torch.from_numpy(g_labels[keep_g]),
                    }
                ],
            )

    def _map_results(self) -> dict[str, float]:
        out: dict[str, float] = {}
        names = list(self.classes.values())
        for key in ("map", "ap50", "ap75"):
            for n in names + ["mean"]:
                out[f"{key}_{n}"] = math.nan
        if self._map is None or not self._image_ids:
            return out
        if not any(st["n_gt"] for st in self._stats.values()):
            return out  # COCO AP is undefined without ground truth
        res = self._map.compute()
        precision = res["precision"].double().numpy()  # (T, R, K, A, M); area "all", last maxDet
        iou_thrs = np.asarray(COCO_IOU_THRESHOLDS)
        classes = res["classes"].reshape(-1).tolist()

        def ap(k: int, t: int | None) -> float:
            s = precision[:, :, k, 0, -1] if t is None else precision[t, :, k, 0, -1]
            s = s[s > -1]
            return float(s.mean()) if s.size else math.nan

        t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
        t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
        for cls, name in self.classes.items():
            if cls in classes:
                k = classes.index(cls)
                out[f"map_{name}"] = ap(k, None)
                out[f"ap50_{name}"] = ap(k, t50)
                out[f"ap75_{name}"] = ap(k, t75)
        for key, tm_key in (("map", "map"), ("ap50", "map_50"), ("ap75", "map_75")):
            v = float(res[tm_key])
            out[f"{key}_mean"] = v if v > -1 else math.nan
        return out

    def compute(self) -> dict[str, float]:
        """Data-set summary: ``{metric}_{class}`` and ``{metric}_mean`` floats (see class doc)."""
        out: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {k: [] for k in ("aji", "aji_gated", "f1", "dice")}
        for cls, name in self.classes.items():
            rows = [r for r in self._rows if r["class"] == name]
            st = self._stats[cls]
            aji = _nanmean([r["aji"] for r in rows])
            aji_g = _nanmean([r["aji_gated"] for r in rows])
            den = 2 * st["tp"] + st["fp"] + st["fn"]
            f1 = 2 * st["tp"] / den if den else math.nan
            if st["dice"]:
                dice = float(np.mean(st["dice"]))
            else:
                dice = 0.0 if st["n_gt"] else math.nan
            for key, v in (("aji", aji), ("aji_gated", aji_g), ("f1", f1), ("dice", dice)):
                out[f"{key}_{name}"] = v
                per_metric[key].append(v)
        for key, vals in per_metric.items():
            out[f"{key}_mean"] = _nanmean(vals)
        out.update(self._map_results())
        out["num_images"] = float(self.num_images)
        return out

    def per_image_rows(self) -> list[dict[str, Any]]:
        """One row per (image, class): the fields of :attr:`ROW_FIELDS`."""
        return [dict(r) for r in self._rows]

    def write_csv(self, path: Path) -> Path:
        """Write :meth:`per_image_rows` to a CSV file and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.ROW_FIELDS))
            writer.writeheader()
            writer.writerows(self._rows)
        return path
