"""Instance-segmentation metrics of a data set of overlapping objects (cervical cells and nuclei).

:class:`InstanceMetricAccumulator` gathers, per class (cytoplasm, nucleus) and as their mean, the
AJI of Kumar et al. and the gated AJI of the MMT-PSM evaluation code (:mod:`kdseg.metrics.aji`),
F1@0.5 and the Dice of matched objects (:mod:`kdseg.metrics.instance_matching`) and COCO mask
mAP / AP50 / AP75, plus per-image rows for a CSV. Masks are stacks ``(N, H, W)``
(:mod:`kdseg.metrics.instance_overlap`), so overlapping instances are handled exactly.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kdseg.metrics.aji import aji_counts, aji_gated_counts
from kdseg.metrics.instance_matching import match_from
from kdseg.metrics.instance_overlap import as_mask_stack, check_pair, overlaps, to_numpy

__all__ = ["COCO_IOU_THRESHOLDS", "DEFAULT_CLASSES", "InstanceMetricAccumulator"]

DEFAULT_CLASSES: dict[int, str] = {1: "cytoplasm", 2: "nucleus"}

#: COCO's IoU thresholds 0.50:0.05:0.95, bit for bit as pycocotools builds them (float64
#: ``np.linspace``, ``cocoeval.Params``). torchmetrics' default builds them in float32, where 0.8
#: becomes 0.800000012 and a pair at IoU exactly 0.8 (e.g. 104/130) is no longer a match.
COCO_IOU_THRESHOLDS: tuple[float, ...] = tuple(np.linspace(0.5, 0.95, 10).tolist())


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else math.nan


class InstanceMetricAccumulator:
    """Accumulates per-image instance metrics per class and computes data-set summaries.

    Per class (default 1 = cytoplasm, 2 = nucleus) and their mean over classes:

    - ``aji_<cls>``: Kumar AJI per image, averaged over the images where the class has GT or
      predictions. An image with GT but no predictions scores 0 (never skipped).
    - ``aji_gated_<cls>``: the MMT-PSM AJI (:func:`~kdseg.metrics.aji.aggregated_jaccard_index_gated`), same averaging.
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
        p_masks = as_mask_stack(pred["masks"], "pred['masks']", self.mask_threshold)
        g_masks = as_mask_stack(target["masks"], "target['masks']", self.mask_threshold)
        check_pair(p_masks, g_masks)
        p_labels = to_numpy(pred["labels"]).reshape(-1).astype(np.int64)
        g_labels = to_numpy(target["labels"]).reshape(-1).astype(np.int64)
        scores = pred.get("scores")
        p_scores = (
            np.ones(p_masks.shape[0], dtype=np.float64)
            if scores is None
            else to_numpy(scores).reshape(-1).astype(np.float64)
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
            inter, area_g, area_p = overlaps(pm, gm)
            c, u = aji_counts(inter, area_g, area_p)
            cg, ug = aji_gated_counts(inter, area_g, area_p, self.iou_threshold)  # pm is score-sorted
            match = match_from(inter, area_g, area_p, self.iou_threshold)
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
