"""A finished run's record in the results folder, ``<results>/<profile>/runs/<setting>/<method>/seed<N>/``:
what the table needs of the run once its run folder is gone (``test_metrics.json``,
``test_cases.csv``, ``result.json``, the last stage's validation curve ``val_curve.csv`` and
``record.json``: the stages' keys and the recorded fit + test time).

``write_tables`` writes a record for every finished run; the runner reads them back
(:func:`read_record`) for runs without a finished folder under ``--out`` (another machine, a
deleted folder). A run restored from its record is not rerun: its row, run time, paired differences
and curve come from the record. A record counts only under the same stage keys, so a changed config
still reruns. Checkpoints are not kept, so the qualitative figure needs run folders.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

from kdseg.reproduce.execute import RunResult, result_in
from kdseg.reproduce.plan import RunPlan

RECORD = "record.json"
CURVE = "val_curve.csv"
#: the run folder's files kept as they are
COPIED = ("test_metrics.json", "test_cases.csv", "result.json")


def record_folder(results_dir: Path, plan: RunPlan) -> Path:
    return results_dir / "runs" / plan.setting.name / plan.method.name / f"seed{plan.seed}"


def plan_keys(plan: RunPlan) -> str:
    """The stages' config keys, ``+``-joined as in ``runs.csv``."""
    return "+".join(str(s.key) for s in plan.stages)


def write_record(results_dir: Path, result: RunResult, run_seconds: float | None,
                 curves: dict[str, dict[int, float]]) -> Path:
    """Writes (or, for a restored run, keeps) the record of a finished run; ``curves``: ``{metric:
    {step: value}}`` of its last stage (the metrics without points are left out)."""
    target = record_folder(results_dir, result.plan)
    if result.status == "restored" or result.folder is None:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (result.folder / name).is_file():
            shutil.copyfile(result.folder / name, target / name)
    (target / RECORD).write_text(json.dumps({
        "keys": plan_keys(result.plan),
        "run_seconds": None if run_seconds is None or math.isnan(run_seconds) else round(run_seconds, 1),
        "run_folder": str(result.folder),
    }, indent=2) + "\n")
    curves = {metric: curve for metric, curve in curves.items() if curve}
    (target / CURVE).unlink(missing_ok=True)
    if curves:
        with (target / CURVE).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", *curves])
            for step in sorted({s for curve in curves.values() for s in curve}):
                writer.writerow([step, *(curve.get(step, "") for curve in curves.values())])
    return target


def read_record(results_dir: Path, plan: RunPlan) -> RunResult | None:
    """The run restored from its record (status ``restored``), or None without one under the plan's keys."""
    folder = record_folder(results_dir, plan)
    if plan.error or not plan.stages or not (folder / RECORD).is_file() or not (folder / "test_metrics.json").is_file():
        return None
    record = json.loads((folder / RECORD).read_text())
    if record.get("keys") != plan_keys(plan):
        return None
    return result_in(folder, plan, "restored", run_seconds=record.get("run_seconds"))


def read_record_curve(folder: Path, metric: str) -> dict[int, float]:
    """``{step: value}`` of ``metric`` from a record's ``val_curve.csv`` (empty without one)."""
    path = folder / CURVE
    if not path.is_file():
        return {}
    with path.open() as f:
        return {int(row["step"]): float(row[metric]) for row in csv.DictReader(f) if row.get(metric) not in (None, "")}
