"""Per-volume evaluation of the semantic-segmentation methods: Dice, HD95 and ASD per class."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor

from kdseg.evaluation.base import Evaluator
from kdseg.metrics.segmentation import ClassMetrics, distance_unit, summarize, volume_metrics

__all__ = ["VolumeEvaluator", "describe_distances", "format_summary_table"]


class VolumeEvaluator(Evaluator[dict[str, Any]]):
    """One row per 3D volume (``case_id``, the spacing used, per-class metrics).

    Args:
        num_classes: classes including background.
        convention: ``medpy`` or ``monai`` distances (see :mod:`kdseg.metrics.distances`).
    """

    def __init__(self, num_classes: int, convention: str) -> None:
        super().__init__(key=lambda row: row["case_id"])
        self.num_classes = num_classes
        self.convention = convention

    def score(self, prediction: Tensor, batch: dict[str, Any], surface: bool) -> dict[str, Any]:
        """The row of one volume: ``prediction`` against ``batch["label"]``."""
        spacing = batch["spacing"].tolist()
        # The papers' medpy calls pass no voxelspacing: their distances are in voxel steps.
        if self.convention == "medpy" or any(math.isnan(s) for s in spacing):
            spacing = None
        else:
            spacing = tuple(spacing)
        per_class = volume_metrics(
            prediction.cpu().numpy(), batch["label"].cpu().numpy(), self.num_classes, spacing,
            surface=surface, convention=self.convention,
        )
        return {
            "case_id": batch["case_id"],
            "spacing": spacing,
            "metrics": {c: asdict(m) for c, m in per_class.items()},
        }

    def summary(self, rows: list[dict[str, Any]], class_names: dict[int, str] | None) -> dict[str, Any]:
        """Mean / std per class and over classes (:func:`~kdseg.metrics.segmentation.summarize`)."""
        class_names = class_names or {c: f"class{c}" for c in range(1, self.num_classes)}
        per_case = [{int(c): ClassMetrics(**m) for c, m in row["metrics"].items()} for row in rows]
        summary = summarize(per_case, class_names)
        spacings = [row["spacing"] for row in rows]
        summary["distance_unit"] = "pixel" if any(s is None for s in spacings) else distance_unit(spacings[0])
        summary["distance_convention"] = self.convention
        summary["class_names"] = {int(c): n for c, n in class_names.items() if 0 < int(c) < self.num_classes}
        return summary

    @staticmethod
    def write_cases(path: Path, rows: list[dict[str, Any]], class_names: dict[int, str]) -> Path:
        """``test_cases.csv``: one line per volume, Dice / HD95 / ASD / status per class."""
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            header = ["case_id"]
            for c, name in class_names.items():
                header += [f"dice_{name}", f"hd95_{name}", f"asd_{name}", f"status_{name}"]
            writer.writerow(header)
            for row in rows:
                line = [row["case_id"]]
                for c in class_names:
                    m = row["metrics"][c]
                    line += [f"{m['dice']:.6f}", f"{m['hd95']:.6f}", f"{m['asd']:.6f}", m["status"]]
                writer.writerow(line)
        return path


def format_summary_table(summary: dict[str, Any]) -> str:
    """A plain-text table of per-class and mean Dice / HD95 / ASD (mean +- std over volumes)."""
    unit = ", ".join(v for v in (summary.get("distance_convention"), summary.get("distance_unit")) if v)
    lines = [
        f"{'class':<8} {'Dice':>16} {'HD95 (' + unit + ')':>20} {'ASD (' + unit + ')':>20} {'missed':>7}",
    ]
    for name, values in summary["per_class"].items():
        cells = [f"{values[m + '_mean']:.4f} +- {values[m + '_std']:.4f}" for m in ("dice", "hd95", "asd")]
        lines.append(f"{name:<8} {cells[0]:>16} {cells[1]:>20} {cells[2]:>20} {values['missed']:>7}")
    mean = [f"{summary['mean'][m]:.4f}" for m in ("dice", "hd95", "asd")]
    lines.append(f"{'mean':<8} {mean[0]:>16} {mean[1]:>20} {mean[2]:>20} {summary['missed']:>7}")
    return "\n".join(lines)


_CONVENTION_TEXT = {
    "medpy": ("medpy.metric.binary.hd95 / asd per class on each 3D test volume, the papers' convention "
              "(SSL4MIS / WSL4MIS code/test_2D_fully.py): HD95 the 95th percentile of both directions' "
              "surface distances pooled, ASD the mean distance from the predicted surface to the ground truth's"),
    "monai": ("MONAI's definitions per class on each 3D test volume (not the papers'): HD95 the larger of the two "
              "directed 95th percentiles, ASD the symmetric mean of both directions pooled"),
}


def describe_distances(convention: str | None, unit: str | None) -> str:
    """A sentence on the HD95 / ASD of summaries with these ``distance_convention`` / ``distance_unit``
    (each one value or several joined by ", "): definition, unit, whether the voxel spacing is used."""
    parts = [_CONVENTION_TEXT.get(c, c) for c in (convention or "").split(", ") if c]
    text = "HD95 / ASD: " + "; ".join(parts) if parts else "HD95 / ASD"
    if unit == "pixel":
        text += ("; in pixels (voxel steps): no voxel spacing is used"
                 + (", as in the papers' code" if convention == "medpy" else " (the volumes carry none)"))
    elif unit:
        text += f"; in {unit} (voxel spacing used)"
    return text + (". A structure missed in a volume, or predicted where the ground truth has none, enters the "
                   "means with Dice 0 and HD95 = ASD = the volume's diagonal")
