"""Validation-curve gain over the last quarter of each run in this folder (issue 16: the cpu
budget is chosen where the validation curves flatten; validation set only, no test number).

    python experiments/results/isbi2014_cpu_diagnostics/curve_gains.py [metric]   # default val/aji_mean

Gain: :func:`kdseg.results.curves.last_quarter_gain` (as in the table captions).
"""

import csv
import sys
from pathlib import Path

from kdseg.results.curves import last_quarter_gain

FOLDER = Path(__file__).resolve().parent


def curve(path: Path, metric: str) -> dict[int, float]:
    """``{optimizer steps done: value}`` of every validation row of a Lightning ``metrics.csv``."""
    with path.open() as f:
        return {int(r["step"]) + 1: float(r[metric]) for r in csv.DictReader(f) if r.get(metric)}


if __name__ == "__main__":
    metric = sys.argv[1] if len(sys.argv) > 1 else "val/aji_mean"
    print(f"| run | steps | best {metric} | gain over the last quarter |\n| --- | --- | --- | --- |")
    for path in sorted(FOLDER.glob("steps*/fit_metrics.csv")):
        points = curve(path, metric)
        print(f"| {path.parent.name} | {max(points)} | {max(points.values()):.3f} "
              f"| {last_quarter_gain(points):+.3f} |")
