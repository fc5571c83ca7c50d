"""Runs the ACDC scribble comparison at the CPU budget and tabulates it.

For each (method, seed): ``kdseg fit`` with ``experiments/acdc/<method>.yaml`` +
``experiments/profiles/cpu_scribble.yaml`` (ramp-ups scaled to the short run), then ``kdseg test``
of the *last* checkpoint on the 10 validation patients (20 volumes), so the reported numbers carry
no checkpoint-selection bias; the best validation Dice seen during training is reported beside it.
Finished runs (a ``test_metrics.json`` in their folder) are skipped, so the script resumes.

    python experiments/acdc/run_scribble_comparison.py --root ../shared/data/acdc \
        --methods pce scribsd_plus --seeds 0 1 --out experiments/results/acdc_scribble_cpu
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KDSEG = Path(sys.executable).with_name("kdseg")
PROFILE = REPO / "experiments/profiles/cpu_scribble.yaml"

#: ramp-up lengths at the CPU budget (the paper configs ramp over 20% / 100% of 60k steps).
RAMPS = {
    "scribsd_plus": ["--model.init_args.rampup_steps=300"],
    "scribsd_plus_no_kd": ["--model.init_args.rampup_steps=300"],
    "scribsd_plus_no_contrast": ["--model.init_args.rampup_steps=300"],
    "scribsd_plus_single_scale_kd": ["--model.init_args.rampup_steps=300"],
    "scribsd": ["--model.init_args.rampup_steps=300"],
    "ustm": ["--model.init_args.consistency_rampup_steps=1500", "--model.init_args.threshold_rampup_steps=1500"],
}


def run(method: str, seed: int, root: Path, out: Path) -> dict:
    run_root = out / f"{method}_seed{seed}"
    done = sorted(run_root.glob("**/test_metrics.json"))
    if done:
        return json.loads(done[-1].read_text())
    config = REPO / "experiments/acdc" / f"{method}.yaml"
    fit = [str(KDSEG), "fit", f"--config={config}", f"--config={PROFILE}", f"--data.root={root}",
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared/data/acdc")
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/acdc_scribble_cpu")
    args = parser.parse_args()
    for method in args.methods:
        for seed in args.seeds:
            result = run(method, seed, args.root.resolve(), args.out.resolve())
            print(f"{method} seed {seed}: mean Dice {result['mean']['dice']:.4f}", flush=True)


if __name__ == "__main__":
    main()
