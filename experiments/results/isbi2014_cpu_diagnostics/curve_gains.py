"""Validation-curve gain over the last quarter of each run in this folder (issue 16: the cpu
budget is chosen where the validation curves flatten; validation set only, no test number).

    python experiments/results/isbi2014_cpu_diagnostics/curve_gains.py [metric]   # default val/aji_mean

Gain = best validation value over the whole run minus the best up to 3/4 of its steps.
"""

import csv
import sys
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def curve(path: Path, metric: str) -> list[tuple[int, float]]:
    """``(optimizer steps done, value)`` of every validation row of a Lightning ``metrics.csv``."""
    with path.open() as f:
        return [(int(r["step"]) + 1, float(r[metric])) for r in csv.DictReader(f) if r.get(metric)]


def last_quarter_gain(points: list[tuple[int, float]]) -> float:
    total = max(step for step, _ in points)
    earlier = [value for step, value in points if step <= 0.75 * total]
    return max(value for _, value in points) - max(earlier)


if __name__ == "__main__":
    metric = sys.argv[1] if len(sys.argv) > 1 else "val/aji_mean"
    print(f"| run | steps | best {metric} | gain over the last quarter |\n| --- | --- | --- | --- |")
    for path in sorted(FOLDER.glob("steps*/fit_metrics.csv")):
        points = curve(path, metric)
        print(f"| {path.parent.name} | {max(s for s, _ in points)} | {max(v for _, v in points):.3f} "
              f"| {last_quarter_gain(points):+.3f} |")
