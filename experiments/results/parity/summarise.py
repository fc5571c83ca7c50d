"""Validation curves of the parity runs: best and last mean Dice (RV/Myo/LV, per 3D volume).

kdseg runs: ``<runs>/<name>/fit/version_*/metrics.csv`` (``val/dice_mean``); reference runs: the
``parity volume dice`` lines ``run_reference.py`` logs per volume and the scripts' own
``mean_dice`` lines. Usage: python experiments/results/parity/summarise.py /work/parity_runs
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path


def kdseg_curve(folder: Path) -> list[tuple[int, float]]:
    files = sorted(folder.glob("fit/version_*/metrics.csv"))
    if not files:
        return []
    rows = list(csv.DictReader(files[-1].open()))
    return [(int(r["step"]) + 1 if int(r["step"]) % 10 == 9 else int(r["step"]), float(r["val/dice_mean"]))
            for r in rows if r.get("val/dice_mean")]


def reference_curve(log: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(the script's own validation at the patch size it was given, the same volumes at 256 px)."""
    own, at_256, pending = [], [], []
    for line in log.read_text().splitlines():
        m = re.search(r"parity volume dice at \d+ px: \[(.*?)\]; at 256 px: \[(.*?)\]", line)
        if m:
            pending.append([float(x) for x in m.group(2).split(",")])
        m = re.search(r"iteration (\d+) : mean_dice : ([0-9.]+)", line)
        if m:
            step = int(m.group(1))
            own.append((step, float(m.group(2))))
            if pending:
                at_256.append((step, sum(sum(v) / len(v) for v in pending) / len(pending)))
            pending = []
    return own, at_256


def line(name: str, curve: list[tuple[int, float]]) -> str:
    if not curve:
        return f"{name}: no validation yet"
    best = max(curve, key=lambda sv: sv[1])
    pts = " ".join(f"{s}:{v:.3f}" for s, v in curve)
    return f"{name}: best {best[1]:.3f} @ {best[0]}, last {curve[-1][1]:.3f} @ {curve[-1][0]}  [{pts}]"


def main(runs: Path) -> None:
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        if (folder / "log.txt").is_file():
            own, at_256 = reference_curve(folder / "log.txt")
            print(line(f"{folder.name} (reference, 128 px inference)", own))
            print(line(f"{folder.name} (reference, 256 px inference)", at_256))
        else:
            print(line(folder.name, kdseg_curve(folder)))
        wall = folder / "stdout.log"
        if wall.is_file():
            m = re.findall(r"wall_s (\d+)", wall.read_text())
            if m:
                print(f"    wall {m[-1]} s")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/work/parity_runs"))
