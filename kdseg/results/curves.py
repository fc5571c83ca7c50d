"""Validation curves of finished runs: read from their ``metrics.csv`` (or a restored run's record),
averaged over seeds for the figures, and summarised in the table captions as flattened or still
rising (issue 16: a ranking at a budget where the curves still climb says little about the methods)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from kdseg.reproduce.execute import RunResult, fit_versions
from kdseg.reproduce.records import read_record_curve
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


def run_curve(result: RunResult, metric: str) -> dict[int, float]:
    """A finished run's curve of ``metric`` (last stage): from its stage folder, or a restored run's record."""
    if result.folder is None:
        return {}
    return read_record_curve(result.folder, metric) if result.status == "restored" else read_curve(result.folder, metric)


def curve_metrics(result: RunResult) -> list[str]:
    """The curves a figure shows and a record keeps: validation Dice and the checkpoint monitor."""
    return list(dict.fromkeys(["val/dice_mean", monitor_of(result)]))


def record_curves(result: RunResult) -> dict[str, dict[int, float]]:
    return {metric: run_curve(result, metric) for metric in curve_metrics(result)}


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
    flat, rising, metrics, missing = [], [], set(), []
    for method in setting.methods.values():
        runs = [r for r in results if r.plan.setting.name == setting.name and r.plan.method.name == method.name
                and r.plan.stages and r.has_metrics and r.folder]
        curves = [run_curve(r, monitor_of(r)) for r in runs]
        if none := sum(not curve and r.status == "restored" for r, curve in zip(runs, curves)):
            missing.append(f"{method.label} {none} of {len(runs)}")
        if not (gains := [g for g in map(last_quarter_gain, curves) if g is not None]):
            continue
        metrics.update(monitor_of(r) for r in runs)
        (flat if max(gains) < FLAT_GAIN else rising).append(f"{method.label} {max(gains):+.3f}")
    # restored runs whose records hold no curve (made before records kept curves) are named, not hidden
    without = f" No validation curve in the records of: {'; '.join(missing)} runs." if missing else ""
    if not flat and not rising:
        return without.strip()
    return (f"Validation curves ({', '.join(sorted(metrics))}, last stage; largest gain over the last quarter of "
            f"the steps among the seeds): flattened (gain below {FLAT_GAIN}) for "
            f"{'; '.join(flat) or 'none'}; still rising for {'; '.join(rising) or 'none'}.{without}")
