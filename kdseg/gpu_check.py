"""``make gpu-check``: the first run on a GPU machine. Every method's CUDA / AMP path, the
2-GPU DDP path and GPU-vs-CPU test metrics, in one command (meant to take under 8 minutes on one GPU; not yet run on one).

What it runs, each through the real console path (``python -m kdseg.cli``, one subprocess each):

1. **fits**: every method of :data:`CHECKS` (the methods of ``experiments/reproduce/matrix.yaml``
   plus UA-MT, USTM and ScribSD) for ``--steps`` optimizer steps at the paper profile's sizes
   (``experiments/reproduce/profiles/paper.yaml``: the method configs as they are, ACDC 256 px,
   batch 12 (+12), ISBI 2014 512 px, batch 4 + 2) in ``32-true`` and ``bf16-mixed``.
   :class:`StepTimer` records the step time (``on_train_batch_start`` to ``on_train_batch_end``,
   i.e. forward, backward, optimizer step; after ``torch.cuda.synchronize()``), the data wait
   between steps, the peak memory (``torch.cuda.max_memory_allocated`` after
   ``reset_peak_memory_stats`` at the start of training; on CPU the peak resident set) and whether
   every step's loss was finite. The instance teacher-student methods run with
   ``warmup_steps=0`` and ``pseudo_label_score=0`` so that their unlabeled losses (teacher views,
   PSM, MGD) take part from the first step, as in ``kdseg.bench``.
2. **DDP**: with two or more GPUs, Mean Teacher on 2 processes (``strategy=ddp``); each rank
   dumps its student and EMA teacher (:class:`RankStateDump`), which must be identical on both
   ranks (what ``tests/test_ddp.py`` checks with 2 CPU gloo processes). Skipped, with the reason
   printed, on one GPU or on CPU.
3. **test**: ``kdseg test`` of the ``supervised`` 32-true checkpoint on the GPU and on the CPU;
   every metric of both ``test_metrics.json`` must agree to ``1e-4`` (both NaN counts as equal).
   The GPU side runs with ``NVIDIA_TF32_OVERRIDE=0``: PyTorch lets cuDNN use TF32 convolutions by
   default, whose 10-bit mantissa is a precision change, not a device bug.

Data: the real ACDC / ISBI 2014 data under the paper profile's roots (``../shared/data``) when
they exist, else the built-in phantoms at the same sizes (ACDC phantom volumes written in the ACDC
layout at 256 x 256, cytology phantom at 512 px). Without a GPU (or with ``--cpu-smoke``) the same
path runs on CPU at the smoke profile's tiny sizes on the phantoms (``profiles/smoke.yaml``'s
setting overrides), which is what ``tests/test_gpu_check.py`` runs.

Results: ``experiments/results/bench/gpu-<UTC timestamp>.json`` (``cpu-smoke-...`` without GPU;
``--out`` changes the folder; runs and checkpoints go to a temporary ``--work`` folder) and a
printed table. The exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml

from kdseg.cli import stack_arguments
from kdseg.method_configs import FAMILY_DATA, METHOD_CONFIGS, real_data_config
from kdseg.reports import machine, write_new_report

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "experiments/reproduce/profiles"

#: the methods checked: those of ``experiments/reproduce/matrix.yaml`` plus UA-MT, USTM and ScribSD.
CHECKED_METHODS = ("supervised", "mean_teacher", "ua_mt", "action_stage3", "pce", "pce_em", "ustm", "dmpls",
                   "scribsd", "scribsd_plus", "instance_supervised", "instance_mean_teacher", "mmt_psm")

#: check name -> (method config, data kind).
CHECKS: dict[str, tuple[str, str]] = {
    name: (real_data_config(name), FAMILY_DATA[METHOD_CONFIGS[name][0]]) for name in CHECKED_METHODS
}

#: methods whose teacher losses wait for ``warmup_steps``: run them from step 0 (see docstring).
INSTANCE_TEACHER_STUDENT = ("instance_mean_teacher", "mmt_psm")

PRECISIONS = ("32-true", "bf16-mixed")

#: data loader workers of the GPU fits: the configs load in the training process (num_workers 0),
#: whose slice augmentation would otherwise take about as long as a GPU step (the data wait is
#: reported beside the step time either way).
GPU_DATA_WORKERS = 4

#: the tolerance of the GPU-vs-CPU test metrics.
TEST_TOLERANCE = 1e-4

#: the method whose 32-true checkpoint is tested on both devices, and the one fitted with DDP.
TEST_METHOD = "supervised"
DDP_METHOD = "mean_teacher"


# --------------------------------------------------------------------------------------------
# callbacks (instantiated in the fit subprocesses through --trainer.callbacks+=)
# --------------------------------------------------------------------------------------------
class StepTimer(pl.Callback):
    """Writes step time, data wait, peak memory and loss finiteness of a fit to ``out`` (JSON).

    Args:
        out: the JSON file written at the end of training (rank 0).
        warmup: first steps not timed (CUDA context, cuDNN algorithm search, allocator growth).
    """

    def __init__(self, out: str, warmup: int = 5) -> None:
        self.out = Path(out)
        self.warmup = warmup
        self.step_s: list[float] = []
        self.data_s: list[float] = []
        self.finite = True
        self.losses: list[float] = []
        self._start = 0.0
        self._end: float | None = None
        self._batches = 0

    @staticmethod
    def _sync(pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()
        if self._end is not None and self._batches >= self.warmup:
            self.data_s.append(self._start - self._end)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._sync(pl_module)
        self._end = time.perf_counter()
        self._batches += 1
        if self._batches > self.warmup:
            self.step_s.append(self._end - self._start)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            value = float(loss.detach().float())
            self.losses.append(value)
            self.finite = self.finite and math.isfinite(value)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        device = pl_module.device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
            name = torch.cuda.get_device_name(device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            name = "cpu"
        timed = sorted(self.step_s)
        result = {
            "device": name, "accelerator": device.type, "trainer_precision": str(trainer.precision),
            "steps": trainer.global_step, "timed_steps": len(timed),
            "step_s": sum(timed) / len(timed) if timed else None,
            "step_s_median": timed[len(timed) // 2] if timed else None,
            "data_wait_s": sum(self.data_s) / len(self.data_s) if self.data_s else None,
            "peak_mib": peak, "peak_kind": "max_memory_allocated" if device.type == "cuda" else "peak RSS",
            "loss_finite": self.finite, "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
        }
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(result, indent=2))


class RankStateDump(pl.Callback):
    """Each rank saves its student and EMA teacher (CPU copies) as ``<folder>/rank<r>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {
            part: {k: v.detach().cpu() for k, v in getattr(pl_module, attr).state_dict().items()}
            for part, attr in (("student", "student"), ("teacher", "ema_teacher"))
        }
        state |= {"world_size": trainer.world_size, "global_step": trainer.global_step}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


# --------------------------------------------------------------------------------------------
# pure comparisons (tested by hand values)
# --------------------------------------------------------------------------------------------
def compare_metrics(a: dict[str, Any], b: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Compares the numbers of two nested metric dicts (``test_metrics.json``).

    Returns ``{"ok", "max_abs_diff", "compared", "differing": [keys], "missing": [keys]}``: a
    number differs when ``|x - y| > tolerance`` (both NaN, or equal infinities, are equal); a key
    in one dict only is ``missing`` and fails the comparison.
    """
    flat_a, flat_b = _flatten(a), _flatten(b)
    missing = sorted(set(flat_a) ^ set(flat_b))
    differing, worst = [], 0.0
    for key in sorted(set(flat_a) & set(flat_b)):
        x, y = flat_a[key], flat_b[key]
        if (math.isnan(x) and math.isnan(y)) or x == y:
            continue
        diff = abs(x - y)
        worst = max(worst, diff) if not math.isnan(diff) else math.inf
        if not diff <= tolerance:
            differing.append(key)
    return {"ok": not differing and not missing, "max_abs_diff": worst,
            "compared": len(set(flat_a) & set(flat_b)), "differing": differing, "missing": missing}


def _flatten(node: Any, prefix: str = "") -> dict[str, float]:
    if isinstance(node, dict):
        out: dict[str, float] = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    if isinstance(node, (list, tuple)):
        out = {}
        for i, value in enumerate(node):
            out |= _flatten(value, f"{prefix}{i}.")
        return out
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return {prefix[:-1]: float(node)}
    if node is None:
        return {prefix[:-1]: math.nan}
    return {}


def compare_rank_states(rank0: dict[str, Any], rank1: dict[str, Any]) -> dict[str, Any]:
    """Whether two ranks' dumps (:class:`RankStateDump`) hold the same student and teacher.

    Returns ``{"ok", "max_abs_diff", "differing": ["student.<key>", ...], "steps": [s0, s1]}``;
    equal means bit-identical tensors (DDP all-reduces the gradients, so every rank applies the
    same update).
    """
    differing, worst = [], 0.0
    for part in ("student", "teacher"):
        a, b = rank0[part], rank1[part]
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b or a[key].shape != b[key].shape:
                differing.append(f"{part}.{key}")
                continue
            if not torch.equal(a[key], b[key]):
                differing.append(f"{part}.{key}")
                worst = max(worst, float((a[key].double() - b[key].double()).abs().max()))
    steps = [rank0["global_step"], rank1["global_step"]]
    return {"ok": not differing and steps[0] == steps[1], "max_abs_diff": worst, "differing": differing,
            "steps": steps}


# --------------------------------------------------------------------------------------------
# data and commands
# --------------------------------------------------------------------------------------------
def _profile(name: str) -> dict[str, Any]:
    """A reproduce profile with its OmegaConf interpolations (``${vars.steps}``, ...) resolved."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(PROFILES / f"{name}.yaml"), resolve=True)


def _resolve(spec: dict[str, Any]) -> dict[str, Any]:
    """A profile's data spec with its relative paths made relative to the repository."""
    return {k: str((REPO / v).resolve()) if k in ("root", "edf_root") and isinstance(v, str) else v
            for k, v in spec.items()}


def data_overrides(kind: str, smoke: bool, work: Path) -> tuple[list[str], str]:
    """CLI overrides of one data kind (``acdc`` / ``isbi2014``) and what the data is.

    GPU: the paper profile's real data when present, else the phantom at the paper profile's size.
    Smoke: the smoke profile's phantoms and tiny-size setting overrides.
    """
    from kdseg.reproduce.data import DataUnavailable, prepare_data

    if smoke:
        profile = _profile("smoke")
        setting = "cervical" if kind == "isbi2014" else "acdc_semi_3"
        prepared = prepare_data(kind, profile["data"][kind], work, "profiles/smoke.yaml")
        size = list(profile["settings"][setting]["overrides"])
        return [*prepared.overrides, *size], prepared.description
    spec = _resolve(_profile("paper")["data"][kind])
    try:
        prepared = prepare_data(kind, spec, work, "profiles/paper.yaml")
        return [*prepared.overrides], prepared.description
    except DataUnavailable as error:
        reason = str(error).split(": ", 1)[-1]
    if kind == "acdc":
        phantom = {"phantom": {"train_patients": 12, "test_patients": 2, "slices": 4, "size": [256, 256]},
                   "val_patients": 2}
        prepared = prepare_data(kind, phantom, work, "gpu_check")
        return [*prepared.overrides], f"{prepared.description} ({reason})"
    prepared = prepare_data(kind, {"phantom": True}, work, "gpu_check")
    return ([*prepared.overrides, "--data.init_args.phantom_size=512"],
            f"{prepared.description} at 512 px ({reason})")


def fit_args(name: str, precision: str, accelerator: str, steps: int, warmup: int, data: list[str],
             folder: Path) -> list[str]:
    """``kdseg fit`` arguments of one timed fit (no validation; ``last.ckpt`` is written at the end)."""
    args = [
        *stack_arguments(CHECKS[name][0]), *data,
        f"--trainer.accelerator={accelerator}", "--trainer.devices=1", f"--trainer.precision={precision}",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={folder}", "--trainer.logger.init_args.name=fit",
        "--trainer.callbacks+=" + json.dumps({"class_path": "kdseg.gpu_check.StepTimer",
                                              "init_args": {"out": str(folder / "timing.json"), "warmup": warmup}}),
        "--seed_everything=0",
    ]
    if name in INSTANCE_TEACHER_STUDENT:
        args += ["--model.init_args.warmup_steps=0", "--model.init_args.pseudo_label_score=0.0"]
    if accelerator == "gpu":
        args.append(f"--data.init_args.num_workers={GPU_DATA_WORKERS}")
    return args


def _kdseg(subcommand: str, args: list[str], log: Path, env: dict[str, str] | None = None,
           timeout: float | None = None) -> tuple[int, str]:
    """Runs ``python -m kdseg.cli <subcommand> <args>``, output to ``log``; (exit code, its tail)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "kdseg.cli", subcommand, *args]
    with log.open("w") as f:
        f.write("# " + " ".join(command) + "\n")
        f.flush()
        try:
            rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    lines = log.read_text(errors="replace").splitlines()
    return rc, "\n".join(lines[-15:])


def run_fit(name: str, precision: str, accelerator: str, steps: int, warmup: int, data: list[str],
            work: Path) -> dict[str, Any]:
    folder = work / f"{name}-{precision}"
    start = time.perf_counter()
    rc, tail = _kdseg("fit", fit_args(name, precision, accelerator, steps, warmup, data, folder), folder / "fit.log")
    result: dict[str, Any] = {"method": name, "config": CHECKS[name][0], "precision": precision,
                              "returncode": rc, "wall_s": time.perf_counter() - start, "folder": str(folder)}
    timing = folder / "timing.json"
    if rc == 0 and timing.is_file():
        result |= json.loads(timing.read_text())
        result["ok"] = bool(result["loss_finite"]) and result["steps"] == steps
        checkpoints = sorted(folder.glob("fit/version_*/checkpoints/last.ckpt"))
        result["checkpoint"] = str(checkpoints[-1]) if checkpoints else None
        configs = sorted(folder.glob("fit/version_*/config.yaml"))
        result["run_config"] = str(configs[-1]) if configs else None
    else:
        result |= {"ok": False, "error": tail}
    return result


def run_test_comparison(fit: dict[str, Any], accelerator: str, work: Path) -> dict[str, Any]:
    """``kdseg test`` of ``fit``'s last checkpoint on ``accelerator`` and on CPU, metrics compared."""
    if not fit.get("checkpoint") or not fit.get("run_config"):
        return {"ok": False, "error": f"{fit['method']} {fit['precision']} left no checkpoint to test"}
    metrics, tails = {}, {}
    for device in dict.fromkeys([accelerator, "cpu"]):
        folder = work / f"test-{device}"
        args = [f"--config={fit['run_config']}", f"--ckpt_path={fit['checkpoint']}",
                f"--trainer.accelerator={device}", "--trainer.devices=1", "--trainer.precision=32-true",
                "--trainer.enable_progress_bar=false",
                "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
                f"--trainer.logger.init_args.save_dir={folder}", "--trainer.logger.init_args.name=test"]
        env = {"NVIDIA_TF32_OVERRIDE": "0"} if device == "gpu" else {}
        rc, tails[device] = _kdseg("test", args, folder / "test.log", env)
        found = sorted(folder.glob("test/version_*/test_metrics.json"))
        if rc != 0 or not found:
            return {"ok": False, "device": device, "error": tails[device]}
        metrics[device] = json.loads(found[-1].read_text())
    if accelerator == "cpu":
        result = compare_metrics(metrics["cpu"], metrics["cpu"], TEST_TOLERANCE)
        result["note"] = "no GPU: the CPU test only (compared with itself)"
    else:
        result = compare_metrics(metrics[accelerator], metrics["cpu"], TEST_TOLERANCE)
    return result | {"checkpoint": fit["checkpoint"], "tolerance": TEST_TOLERANCE, "metrics": metrics}


def run_ddp(accelerator: str, steps: int, data: list[str], work: Path) -> dict[str, Any]:
    """Mean Teacher on 2 GPUs (DDP), then :func:`compare_rank_states`; skipped below 2 GPUs."""
    gpus = torch.cuda.device_count() if accelerator == "gpu" else 0
    if gpus < 2:
        reason = f"{gpus} GPU(s): DDP needs 2" if accelerator == "gpu" else "no GPU (the CPU gloo path is tests/test_ddp.py's)"
        return {"ok": None, "skipped": reason}
    folder = work / "ddp"
    args = fit_args(DDP_METHOD, "32-true", accelerator, steps, 0, data, folder)
    args = [a for a in args if not a.startswith("--trainer.devices=")]
    args += ["--trainer.devices=2", "--trainer.strategy=ddp",
             "--trainer.callbacks+=" + json.dumps({"class_path": "kdseg.gpu_check.RankStateDump",
                                                   "init_args": {"folder": str(folder / "ranks")}})]
    rc, tail = _kdseg("fit", args, folder / "fit.log")
    dumps = [folder / "ranks" / f"rank{r}.pt" for r in (0, 1)]
    if rc != 0 or not all(d.is_file() for d in dumps):
        return {"ok": False, "error": tail}
    states = [torch.load(d, weights_only=False) for d in dumps]
    return compare_rank_states(*states) | {"world_size": states[0]["world_size"], "method": DDP_METHOD}


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def table(report: dict[str, Any]) -> str:
    """The fits (one line each), then the DDP and test checks."""
    unit = "GPU MiB" if report["accelerator"] == "gpu" else "RSS MiB"
    lines = [f"{'method':<22} {'precision':<11} {'step s':>8} {'data s':>8} {unit:>9} {'loss':>9}  status"]
    for r in report["fits"]:
        status = "ok" if r["ok"] else ("FAILED: " + (r.get("error", "").splitlines() or ["non-finite loss"])[-1][:60]
                                        if "error" in r else "FAILED: non-finite loss or too few steps")
        lines.append(f"{r['method']:<22} {r['precision']:<11} {_fmt(r.get('step_s'), '8.4f')} "
                     f"{_fmt(r.get('data_wait_s'), '8.4f')} {_fmt(r.get('peak_mib'), '9.0f')} "
                     f"{_fmt(r.get('last_loss'), '9.4f')}  {status}")
    ddp = report["ddp"]
    if ddp.get("skipped"):
        lines.append(f"ddp: skipped ({ddp['skipped']})")
    else:
        lines.append(f"ddp ({DDP_METHOD}, 2 ranks): {'ok, ranks identical' if ddp['ok'] else 'FAILED'}"
                     + (f" differing {ddp.get('differing', [])[:3]}" if not ddp["ok"] else ""))
    test = report["test"]
    if "compared" in test:
        lines.append(f"test ({TEST_METHOD} 32-true checkpoint, {report['accelerator']} vs cpu): "
                     f"{'ok' if test['ok'] else 'FAILED'}, {test['compared']} metrics, max |diff| "
                     f"{test['max_abs_diff']:.2e} (tolerance {TEST_TOLERANCE:g})"
                     + (f", differing {test['differing'][:5]}" if test["differing"] else ""))
    else:
        lines.append(f"test: FAILED: {test.get('error', '')[-200:]}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the same checks on CPU at tiny sizes on the phantoms (automatic without a GPU)")
    parser.add_argument("--methods", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per fit (GPU 30, smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps not timed (GPU 5, smoke 1)")
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/bench")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder of the runs and checkpoints (default: a new temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    accelerator = "cpu" if smoke else "gpu"
    steps = args.steps or (3 if smoke else 30)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    if steps <= warmup:
        raise SystemExit(f"kdseg: error: --steps ({steps}) must exceed --warmup ({warmup})")
    work = args.work or Path(tempfile.mkdtemp(prefix="kdseg-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    mode = "cpu-smoke" if smoke else "gpu"
    print(f"gpu-check: mode {mode}, {steps} steps per fit ({warmup} untimed), runs in {work}", flush=True)
    if smoke and not args.cpu_smoke:
        print("gpu-check: no CUDA device: running the CPU smoke mode", flush=True)

    data: dict[str, list[str]] = {}
    described: dict[str, str] = {}
    for kind in dict.fromkeys(CHECKS[name][1] for name in [*args.methods, TEST_METHOD, DDP_METHOD]):
        data[kind], described[kind] = data_overrides(kind, smoke, work)
        print(f"gpu-check: {kind}: {described[kind]}", flush=True)

    fits = []
    for name in dict.fromkeys([TEST_METHOD, *args.methods]):
        for precision in args.precisions if name in args.methods else ["32-true"]:
            print(f"gpu-check: fit {name} {precision} ...", flush=True)
            fits.append(run_fit(name, precision, accelerator, steps, warmup, data[CHECKS[name][1]], work))
    tested = next(f for f in fits if f["method"] == TEST_METHOD and f["precision"] == "32-true")
    print("gpu-check: test on the device and on CPU ...", flush=True)
    test = run_test_comparison(tested, accelerator, work)
    ddp = run_ddp(accelerator, min(steps, 10), data[CHECKS[DDP_METHOD][1]], work)
    fits = [f for f in fits if f["method"] in args.methods]

    report = {"mode": mode, "accelerator": accelerator, "machine": machine(), "steps": steps, "warmup": warmup,
              "data": described, "work": str(work), "fits": fits, "ddp": ddp, "test": test}
    text = table(report)
    report["table"] = text
    print(text)
    write_new_report(args.out, "gpu" if not smoke else "cpu-smoke", report)
    ok = all(f["ok"] for f in fits) and test.get("ok") is True and ddp.get("ok") is not False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
