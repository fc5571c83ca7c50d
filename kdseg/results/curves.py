"""Validation curves of finished runs: read from their ``metrics.csv``, averaged over seeds for the
figures, and summarised in the table captions as flattened or still rising (issue 16: a ranking
at a budget where the curves still climb says little about the methods)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from kdseg.reproduce.execute import RunResult, fit_versions
from kdseg.reproduce.spec import Setting

#: a curve has flattened when its best value gains less than this over the last quarter of the steps.
FLAT_GAIN = 0.01


def read_curve(folder: Path, metric: str) -> dict[int, float]:
    """``{step: value}`` of ``metric`` over every ``fit/version_*/metrics.csv`` of a stage folder
    (a later version's value wins at the same step, as after a resume)."""
    curve: dict[int, float] = {}
    for version in fit_versions(folder):
        path = version / "metrics.csv"
        if not path.is_file():
            continue
        with path.open() as f:
            for row in csv.DictReader(f):
                value = row.get(metric)
                if value not in (None, "") and row.get("step") not in (None, ""):
                    curve[int(float(row["step"])) + 1] = float(value)  # logged at global_step - 1
    return curve


def mean_curve(curves: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the mean over the curves that have each step."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for step, value in curve.items():
            by_step[step].append(value)
    steps = sorted(by_step)
    return np.array(steps, dtype=float), np.array([np.mean(by_step[s]) for s in steps])


def last_quarter_gain(curve: dict[int, float]) -> float | None:
    """Best value of the whole curve minus its best up to 3/4 of the last step (None without a
    point in the first three quarters)."""
    if not curve:
        return None
    earlier = [value for step, value in curve.items() if step <= 0.75 * max(curve)]
    return max(curve.values()) - max(earlier) if earlier else None


def monitor_of(result: RunResult) -> str:
    return str(result.plan.final.get("checkpoint.monitor") or "val/dice_mean")


def flattening_text(setting: Setting, results: list[RunResult]) -> str:
    """The caption's sentence: per method, the largest last-quarter gain over its seeds' curves of
    the checkpoint monitor (last stage), and whether all its curves flattened."""
    flat, rising, metrics = [], [], set()
    for method in setting.methods.values():
        runs = [r for r in results if r.plan.setting.name == setting.name and r.plan.method.name == method.name
                and r.plan.stages and r.has_metrics and r.folder]
        gains = [g for g in (last_quarter_gain(read_curve(r.folder, monitor_of(r))) for r in runs) if g is not None]
        if not gains:
            continue
        metrics.update(monitor_of(r) for r in runs)
        (flat if max(gains) < FLAT_GAIN else rising).append(f"{method.label} {max(gains):+.3f}")
    if not flat and not rising:
        return ""
    return (f"Validation curves ({', '.join(sorted(metrics))}, last stage; largest gain over the last quarter of "
            f"the steps among the seeds): flattened (gain below {FLAT_GAIN}) for {'; '.join(flat) or 'none'}; "
            f"still rising for {'; '.join(rising) or 'none'}.")
