"""Runs the ACDC scribble comparison at the CPU budget and tabulates it.

For each (method, seed): ``kdseg fit`` with the stack ``acdc/<method>`` of experiments/stacks.yaml +
``experiments/budgets/cpu_scribble.yaml`` (ramp-ups scaled to the short run), then ``kdseg test``
of the *last* checkpoint on the 10 validation patients (20 volumes), so the reported numbers carry
no checkpoint-selection bias; the best validation Dice seen during training is reported beside it.
Finished runs (a ``test_metrics.json`` in their folder) are skipped, so the script resumes.

    python experiments/acdc/run_scribble_comparison.py --root ../shared/data/acdc \
        --methods pce scribsd_plus --seeds 0 1
    python experiments/acdc/run_scribble_comparison.py --table-only --methods pce scribsd_plus ...
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
KDSEG = Path(sys.executable).with_name("kdseg")
PROFILE = REPO / "experiments/budgets/cpu_scribble.yaml"
STACKS = REPO / "experiments/stacks.yaml"
VAL_EVERY = 500  # trainer.val_check_interval of PROFILE

#: ramp-up lengths at the CPU budget (the full-protocol stacks acdc/* ramp over 20% / 100% of 60k steps).
RAMPS = {
    "scribsd_plus": ["--model.init_args.consistency_rampup_steps=300"],
    "scribsd_plus_no_kd": ["--model.init_args.consistency_rampup_steps=300"],
    "scribsd_plus_no_contrast": ["--model.init_args.consistency_rampup_steps=300"],
    "scribsd_plus_single_scale_kd": ["--model.init_args.consistency_rampup_steps=300"],
    "scribsd": ["--model.init_args.consistency_rampup_steps=300"],
    "ustm": ["--model.init_args.consistency_rampup_steps=1500", "--model.init_args.threshold_rampup_steps=1500"],
}


def run(method: str, seed: int, root: Path, out: Path) -> dict:
    run_root = out / f"{method}_seed{seed}"
    done = sorted(run_root.glob("**/test_metrics.json"))
    if done:
        return json.loads(done[-1].read_text())
    layers = yaml.safe_load(STACKS.read_text())[f"acdc/{method}"]
    fit = [str(KDSEG), "fit", *(f"--config={REPO / layer}" for layer in layers), f"--config={PROFILE}", f"--data.root={root}",
           f"--seed_everything={seed}", f"--trainer.logger.init_args.save_dir={out}",
           f"--trainer.logger.init_args.name={method}_seed{seed}", *RAMPS.get(method, [])]
    print(" ".join(fit), flush=True)
    subprocess.run(fit, check=True)
    version = sorted(run_root.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    metrics = list(csv.DictReader((version / "metrics.csv").open()))
    val = [float(r["val/dice_mean"]) for r in metrics if r.get("val/dice_mean")]
    test = [str(KDSEG), "test", f"--config={version / 'config.yaml'}", f"--ckpt_path={version / 'checkpoints/last.ckpt'}",
            f"--data.root={root}", f"--data.test_split={root / 'splits/val.txt'}",
            f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={method}_seed{seed}"]
    print(" ".join(test), flush=True)
    subprocess.run(test, check=True)
    result_file = sorted(run_root.glob("**/test_metrics.json"))[-1]
    result = json.loads(result_file.read_text())
    result["best_val_dice_during_training"] = max(val) if val else None
    result["val_dice_curve"] = val
    result_file.write_text(json.dumps(result, indent=2))
    return result


def evaluated_step(run_root: Path) -> int | None:
    """The training step of the ``last.ckpt`` a run was tested with. Before ``LatestCheckpoint``
    (kdseg.callbacks.latest_checkpoint), Lightning rewrote ``last.ckpt`` only when validation Dice
    improved, so runs of that time were tested at their latest improving validation."""
    import torch

    checkpoints = sorted(run_root.glob("version_*/checkpoints/last.ckpt"))
    if not checkpoints:
        return None
    return int(torch.load(checkpoints[-1], map_location="cpu", weights_only=False, mmap=True)["global_step"])


def tabulate(out: Path, results_dir: Path, methods: list[str]) -> Path:
    """Collects every finished run under ``out`` into ``results_dir``: each run's
    ``test_metrics.json`` / ``test_cases.csv`` and a markdown table (mean +- std over seeds)."""
    import numpy as np

    results_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        runs = []
        names = {p.name for p in out.glob(f"{method}_seed*")} | {p.name for p in results_dir.glob(f"{method}_seed*")}
        for name in sorted(n for n in names if n.removeprefix(f"{method}_seed").isdigit()):
            files = sorted((out / name).glob("**/test_metrics.json"))
            if not files:  # a run finished earlier whose run folder is gone: its copied metrics
                kept = results_dir / name / "test_metrics.json"
                if kept.exists():
                    metrics = json.loads(kept.read_text())
                    curve = metrics.get("val_dice_curve")
                    if "evaluated_step" not in metrics and curve:
                        # Pre-LatestCheckpoint run: last.ckpt held the first maximum of the curve.
                        metrics["evaluated_step"] = f"{VAL_EVERY * (curve.index(max(curve)) + 1)} (inferred)"
                    runs.append(metrics)
                continue
            metrics = json.loads(files[-1].read_text())
            metrics.setdefault("evaluated_step", evaluated_step(out / name))
            target = results_dir / name
            target.mkdir(exist_ok=True)
            (target / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
            cases = files[-1].with_name("test_cases.csv")
            if cases.exists():
                (target / "test_cases.csv").write_text(cases.read_text())
            runs.append(metrics)
        if not runs:
            rows.append(f"| {method} | not run |" + " |" * 11)
            continue
        cells = []
        for metric in ("dice", "hd95"):
            for name in ("RV", "Myo", "LV"):
                values = [r["per_class"][name][f"{metric}_mean"] for r in runs]
                cells.append(f"{np.mean(values):.3f} +- {np.std(values):.3f}")
        for metric in ("dice", "hd95", "asd"):
            values = [r["mean"][metric] for r in runs]
            cells.append(f"{np.mean(values):.3f} +- {np.std(values):.3f}")
        best = [r.get("best_val_dice_during_training") or float("nan") for r in runs]
        cells.append(f"{np.mean(best):.3f}")
        cells.append(" / ".join(str(r.get("evaluated_step", "?")) for r in runs))
        rows.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    table = results_dir / "table.md"
    header = (
        "| method | seeds | Dice RV | Dice Myo | Dice LV | HD95 RV (px) | HD95 Myo (px) | HD95 LV (px) "
        "| Dice mean | HD95 mean (px) | ASD mean (px) | best val Dice in training | step tested (per seed) |\n"
        "|" + " --- |" * 13 + "\n"
    )
    footer = (
        "\nReal ACDC scribbles (70 train patients), `last.ckpt` evaluated on the 20 validation volumes (the step it "
        "holds is in the last column: runs of 2026-11-24 predate kdseg's LatestCheckpoint, when Lightning kept the "
        "latest *improving* state there); "
        "budget `experiments/budgets/cpu_scribble.yaml` (128x128, MobileNetV3-small U-Net, batch 8, 1500 steps, "
        "CPU). Distances in pixels (the HDF5 volumes carry no spacing). 'not run': no finished run at this "
        "budget; stopped runs are described in `scribsd_plus_runs.md`.\n"
    )
    table.write_text(header + "\n".join(rows) + "\n" + footer)
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared/data/acdc")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs/acdc_scribble_cpu", help="run folders (checkpoints)")
    parser.add_argument("--results", type=Path, default=REPO / "experiments/results/acdc_scribble_cpu",
                        help="where metrics files and the table go")
    parser.add_argument("--table-only", action="store_true", help="only collect finished runs into the table")
    args = parser.parse_args()
    if args.table_only:
        print(tabulate(args.out.resolve(), args.results, args.methods).read_text())
        return
    for method in args.methods:
        for seed in args.seeds:
            result = run(method, seed, args.root.resolve(), args.out.resolve())
            print(f"{method} seed {seed}: mean Dice {result['mean']['dice']:.4f}", flush=True)


if __name__ == "__main__":
    main()
