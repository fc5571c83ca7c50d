"""The metric ids of a ``test_metrics.json`` (``dice_RV``, ``hd95_mean``, ``aji_mean``): the flat
``{id: value}`` view of the summaries :mod:`kdseg.evaluation.volume` (semantic) and
:mod:`kdseg.evaluation.instance` write, and the ids each task can report (what the reproduction
tables and ``experiments/reproduce/paper_numbers.yaml`` name)."""

from __future__ import annotations

import math
from typing import Any, Mapping

from kdseg.data.datamodule import ACDC_CLASS_NAMES
from kdseg.data.instances import CLASS_NAMES as CELL_CLASS_NAMES

TASKS = ("semantic", "instance")

#: Metric ids a task can report: per class and ``mean``.
KNOWN_METRICS: dict[str, frozenset[str]] = {
    "semantic": frozenset(f"{m}_{n}" for m in ("dice", "hd95", "asd") for n in [*ACDC_CLASS_NAMES.values(), "mean"]),
    "instance": frozenset(f"{m}_{n}" for m in ("aji", "aji_gated", "f1", "dice", "map", "ap50", "ap75")
                          for n in [*CELL_CLASS_NAMES.values(), "mean"]),
}


def flatten_test_metrics(task: str, content: Mapping[str, Any]) -> dict[str, float]:
    """``{metric id: value}`` from a ``test_metrics.json`` of ``task`` (NaN stays NaN); ValueError
    naming the missing key when it is not a summary of that task."""
    def number(value: Any) -> float:
        return math.nan if value is None else float(value)

    if task == "semantic":
        if "per_class" not in content or "mean" not in content:
            raise ValueError("a semantic test_metrics.json needs 'per_class' and 'mean'")
        out = {f"{metric}_{name}": number(values.get(f"{metric}_mean"))
               for name, values in content["per_class"].items() for metric in ("dice", "hd95", "asd")}
        return {**out, **{f"{metric}_mean": number(value) for metric, value in content["mean"].items()}}
    if task == "instance":
        if "metrics" not in content:
            raise ValueError("an instance test_metrics.json needs 'metrics'")
        return {k: number(v) for k, v in content["metrics"].items()}
    raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
