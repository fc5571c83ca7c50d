"""The metrics the table reports per task, flattened from ``kdseg test``'s ``test_metrics.json`` to
the ids (``dice_RV``, ``hd95_mean``, ``aji_mean``) that the tables and ``paper_numbers.yaml`` share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from kdseg.data.datamodule import ACDC_CLASS_NAMES
from kdseg.data.instances import CLASS_NAMES as CELL_CLASS_NAMES

TASKS = ("semantic", "instance")


@dataclass(frozen=True)
class Column:

    metric: str
    header: str
    distance: bool = False


#: The columns of each task's table, in order. Per-class ASD beside per-class Dice: a method can gain
#: Dice on the large LV while its RV boundaries stray far; per-class HD95 stays in table.csv.
COLUMNS: dict[str, tuple[Column, ...]] = {
    "semantic": (*(Column(f"dice_{n}", f"Dice {n}") for n in ACDC_CLASS_NAMES.values()), Column("dice_mean", "Dice mean"),
                 Column("hd95_mean", "HD95 mean", True), *(Column(f"asd_{n}", f"ASD {n}", True)
                 for n in ACDC_CLASS_NAMES.values()), Column("asd_mean", "ASD mean", True)),
    "instance": (Column("aji_mean", "AJI"), Column("map_mean", "mAP"), Column("ap50_mean", "AP50"),
                 Column("f1_mean", "F1@0.5"), *(Column(f"dice_{n}", f"Dice {n}") for n in CELL_CLASS_NAMES.values()),
                 Column("dice_mean", "Dice mean")),
}

#: Metric ids a task can report (the table's columns plus the per-class values behind them).
KNOWN_METRICS: dict[str, frozenset[str]] = {
    "semantic": frozenset(f"{m}_{n}" for m in ("dice", "hd95", "asd") for n in [*ACDC_CLASS_NAMES.values(), "mean"]),
    "instance": frozenset(f"{m}_{n}" for m in ("aji", "aji_gated", "f1", "dice", "map", "ap50", "ap75")
                          for n in [*CELL_CLASS_NAMES.values(), "mean"]),
}

#: The metric in each run's progress line and the headline of its figures.
HEADLINE: dict[str, tuple[str, str]] = {"semantic": ("dice_mean", "Dice"), "instance": ("aji_mean", "AJI")}


def flatten_test_metrics(task: str, content: Mapping[str, Any]) -> dict[str, float]:
    """``{metric id: value}`` from a ``test_metrics.json`` of ``task`` (NaN stays NaN); ValueError
    naming the missing key when it is not a summary of that task."""
    out: dict[str, float] = {}
    if task == "semantic":
        if "per_class" not in content or "mean" not in content:
            raise ValueError("a semantic test_metrics.json needs 'per_class' and 'mean'")
        for name, values in content["per_class"].items():
            for metric in ("dice", "hd95", "asd"):
                out[f"{metric}_{name}"] = _number(values.get(f"{metric}_mean"))
        for metric, value in content["mean"].items():
            out[f"{metric}_mean"] = _number(value)
    elif task == "instance":
        if "metrics" not in content:
            raise ValueError("an instance test_metrics.json needs 'metrics'")
        out = {k: _number(v) for k, v in content["metrics"].items()}
    else:
        raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    return out


def distance_unit(task: str, content: Mapping[str, Any]) -> str | None:
    """The unit of the distance columns (``mm`` or ``pixel``), None for tasks without any."""
    return str(content.get("distance_unit", "pixel")) if task == "semantic" else None


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)
