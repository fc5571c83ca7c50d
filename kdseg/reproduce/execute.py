"""One run, resumably: its stages as ``kdseg fit`` subprocesses in order, then ``kdseg test`` of the
best checkpoint (:func:`run_stages`, called by a launcher here or in a Slurm job). A stage's folder
``<out>/runs/<stage name>-<key>/`` holds ``resolved_config.yaml`` / ``run.json`` (the plan),
``fit/version_N/`` (CSVLogger: config, metrics, checkpoints), ``fit.done.json`` (fit exited 0),
``test/version_N/``, ``logs/``, and on success ``result.json`` and ``test_metrics.json`` (written
last: the run is finished). Done stages are skipped; a stage with ``last.ckpt`` but no
``fit.done.json`` resumes from it (new version folder; once more from scratch if that fails). The
tested checkpoint is the best by the monitor over all version folders. A fit that exits 130 / 143
or 0 short of ``max_steps`` is interrupted, not failed: it resumes on the next call.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdseg.evaluation.metric_ids import flatten_test_metrics
from kdseg.reproduce.plan import INIT_WEIGHTS_ARG, RunPlan, StagePlan

STDERR_TAIL_LINES = 15
INTERRUPTED_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
#: Set when the runner is stopped: no new subprocess starts, running ones get SIGTERM.
STOP = threading.Event()
_CHILDREN: set[subprocess.Popen] = set()


@dataclass
class RunResult:
    """What became of one planned run."""

    plan: RunPlan
    #: "finished" (now), "skipped" (finished earlier), "restored" (from its record in the results
    #: folder, its run folder gone: kdseg.reproduce.records), "failed", "not_run"
    status: str
    seconds: float = 0.0
    folder: Path | None = None
    test_metrics: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] | None = None
    #: fit + test time as recorded (restored runs; the others' is read from their stage folders)
    run_seconds: float | None = None

    @property
    def has_metrics(self) -> bool:
        return self.status in ("finished", "skipped", "restored")


class StageFailed(Exception):
    """A stage could not complete; ``record`` says where (phase, logs, stderr tail)."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record.get("message", "stage failed"))
        self.record = record


def read_finished(runs_dir: Path, plan: RunPlan) -> RunResult | None:
    """The result of ``plan`` if its last stage has finished (``test_metrics.json`` exists)."""
    if plan.error or not plan.stages or not (runs_dir / plan.final.folder_name / "test_metrics.json").is_file():
        return None
    return result_in(runs_dir / plan.final.folder_name, plan, "skipped")


def result_in(folder: Path, plan: RunPlan, status: str, **more: Any) -> RunResult:
    """A finished run's result from the ``test_metrics.json`` (and ``result.json``) in ``folder``."""
    content = json.loads((folder / "test_metrics.json").read_text())
    result = json.loads((folder / "result.json").read_text()) if (folder / "result.json").is_file() else {}
    return RunResult(plan, status, folder=folder, test_metrics=content,
                     metrics=flatten_test_metrics(plan.setting.task, content), result=result, **more)


def headline(plan: RunPlan, metrics: dict[str, float]) -> str:
    """``Dice 0.812`` or ``AJI 0.512, Dice 0.701`` for progress lines."""
    dice = f"Dice {metrics.get('dice_mean', float('nan')):.4f}"
    if plan.setting.task == "semantic":
        return dice
    return f"AJI {metrics.get('aji_mean', float('nan')):.4f}" + (f", {dice}" if "dice_mean" in metrics else "")


def checkpoint_score(path: Path) -> float | None:
    """The monitored score a ModelCheckpoint saved ``path`` with (its ``current_score``)."""
    from kdseg.checkpoints import CheckpointError, load_checkpoint

    try:
        content = load_checkpoint(path, mmap=True)
    except CheckpointError:  # unreadable (truncated) checkpoints take no part in the choice
        return None
    for name, state in (content.get("callbacks") or {}).items():
        if name.startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("current_score") is not None:
            return float(state["current_score"])
    return None


def _version(folder: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def fit_versions(folder: Path) -> list[Path]:
    """The stage's ``fit/version_*`` folders, oldest first."""
    return sorted((p for p in (folder / "fit").glob("version_*") if p.is_dir()), key=_version)


def fit_seconds(folder: Path) -> float | None:
    """Fit time of a finished stage over all its attempts (None before ``fit.done.json``).

    The finishing call's measured ``seconds`` plus, for each version folder left by an earlier,
    interrupted call (its first file older than the finishing call's start, i.e. ``fit.done.json``'s
    time minus its ``seconds``), the span of its files' modification times: a lower bound for that
    call, missing its start-up before ``config.yaml`` and any work after the last file it wrote. A copy that did not keep modification times
    counts the finishing call only."""
    done_file = folder / "fit.done.json"
    if not done_file.is_file():
        return None
    seconds = float(json.loads(done_file.read_text()).get("seconds", math.nan))
    finishing_call_start = done_file.stat().st_mtime - seconds
    for version in fit_versions(folder):
        times = [p.stat().st_mtime for p in version.rglob("*") if p.is_file()]
        if times and min(times) < finishing_call_start:
            seconds += max(times) - min(times)
    return seconds


def unfinished_training(done: dict[str, Any]) -> str | None:
    """Why a fit that exited 0 stopped short of ``trainer.max_steps`` (Lightning exits 0 on SIGTERM),
    read from ``last.ckpt``; None when it did not or is epoch-bounded."""
    import yaml

    from kdseg.checkpoints import load_checkpoint

    if not done.get("last") or not done.get("config"):
        return None
    max_steps = (yaml.safe_load(Path(done["config"]).read_text()).get("trainer") or {}).get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        return None
    step = int(load_checkpoint(done["last"], mmap=True)["global_step"])
    return None if step >= max_steps else f"fit stopped at step {step} of {max_steps} (interrupted)"


def summarize_checkpoints(folder: Path, monitor: str, mode: str) -> dict[str, Any]:
    """Best (by ``monitor``, over every version folder) and latest-state checkpoint of a stage."""
    versions = fit_versions(folder)
    scored = [(score, ckpt) for v in versions for ckpt in sorted((v / "checkpoints").glob("*.ckpt"))
              if not ckpt.name.startswith("last") and (score := checkpoint_score(ckpt)) is not None
              and score == score]  # NaN scores never win
    best = (max if mode == "max" else min)(scored, key=lambda item: item[0]) if scored else None
    configs = [v / "config.yaml" for v in versions if (v / "config.yaml").is_file()]
    latest = _last_checkpoint(folder)
    return {"monitor": monitor, "mode": mode, "best": str(best[1]) if best else None,
            "best_score": best[0] if best else None, "last": str(latest) if latest else None,
            "config": str(configs[-1]) if configs else None, "versions": [str(v) for v in versions]}


def _last_checkpoint(folder: Path) -> Path | None:
    """``last.ckpt`` of the newest version that has one: where a fit resumes, what ``last`` hands on."""
    return next((p for v in reversed(fit_versions(folder)) if (p := v / "checkpoints" / "last.ckpt").is_file()), None)


def _write(path: Path, content: dict[str, Any] | bytes) -> None:
    """Writes ``path`` (a dict as JSON) through a temporary name: never half written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content if isinstance(content, bytes) else json.dumps(content, indent=2, default=str).encode())
    tmp.replace(path)


def _call_record(phase: str, folder: Path, rc: int, out: Path, err: Path, **more: Any) -> dict[str, Any]:
    """The failure record of a subprocess: exit status, logs and the end of its stderr."""
    text = err.read_text(errors="replace").rstrip() if err.is_file() else ""
    return {"phase": phase, **more, "folder": str(folder), "returncode": rc, "stdout": str(out), "stderr": str(err),
            "stderr_tail": "\n".join(text.splitlines()[-STDERR_TAIL_LINES:])}


def run_stages(plan: RunPlan, out: Path, threads: int, say: Callable[[str], None] = print,
               prefix: str = "") -> RunResult:
    """Runs (or skips) every stage of ``plan``, then tests the last; a failing stage gives a FAILED result."""
    prefix, start = prefix or plan.label, time.monotonic()
    runs_dir, handed_on = out / "runs", None
    try:
        for stage in plan.stages:
            tag = f"{prefix} stage {stage.index}/{stage.count} ({stage.name})" if stage.count > 1 else prefix
            handed_on = _run_stage(plan, stage, runs_dir / stage.folder_name, handed_on, threads, say, tag)
    except StageFailed as failed:
        seconds, record, rc = time.monotonic() - start, failed.record, failed.record.get("returncode")
        if STOP.is_set() or rc in INTERRUPTED_EXIT_CODES or record.get("interrupted"):
            why = "the runner was stopped" if STOP.is_set() else (
                f"fit exited {rc}" if rc in INTERRUPTED_EXIT_CODES else record["message"])
            say(f"{prefix} interrupted after {seconds:.0f}s ({why}); it resumes on the next call")
            return RunResult(plan, "not_run", seconds=seconds)
        folder = Path(record["folder"]) if record.get("folder") else None
        if folder:
            _write(folder / "last_failure.json", record)
        tail = "".join(f"\n    {line}" for line in str(record.get("stderr_tail", "")).splitlines())
        say(f"{prefix} FAILED after {seconds:.0f}s: {record['message']} (log {record.get('stderr')}){tail}")
        return RunResult(plan, "failed", seconds=seconds, failure=record, folder=folder)
    result = read_finished(runs_dir, plan)
    assert result is not None, "a run whose stages all passed has test_metrics.json"
    result.status, result.seconds = "finished", time.monotonic() - start
    say(f"{prefix} finished in {result.seconds:.0f}s ({headline(plan, result.metrics)})")
    return result


def _run_stage(plan: RunPlan, stage: StagePlan, folder: Path, handed_on: str | None, threads: int,
               say: Callable[[str], None], tag: str) -> str | None:
    """Runs (or skips) one stage; returns the checkpoint it hands to the next stage."""
    done_file = folder / "fit.done.json"
    if stage.is_last and (folder / "test_metrics.json").is_file():
        return None
    if not stage.is_last and done_file.is_file():
        say(f"{tag}: skipped (finished), hands on {stage.hand_on} checkpoint")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "resolved_config.yaml").exists():
            (folder / "resolved_config.yaml").write_text(stage.resolved_text)
            _write(folder / "run.json", {
                "setting": plan.setting.name, "method": plan.method.name, "seed": plan.seed, "stage": stage.index,
                "stages": stage.count, "key": stage.key, "args": list(stage.args)})
        if not done_file.is_file():
            _fit(stage, folder, handed_on, threads, say, tag)
    done = json.loads(done_file.read_text())
    if stage.is_last:
        _test(folder, done, threads)
        return None
    ckpt = done.get(stage.hand_on)
    if not ckpt or not Path(ckpt).is_file():
        raise StageFailed({"phase": "checkpoints", "folder": str(folder), "stage": stage.index, "message":
                           f"stage {stage.index} has no {stage.hand_on} checkpoint to hand on ({folder / 'fit'})"})
    return str(ckpt)


def _logger_args(folder: Path, name: str) -> list[str]:
    return ["--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={folder}", f"--trainer.logger.init_args.name={name}",
            "--trainer.enable_progress_bar=false"]


def _fit(stage: StagePlan, folder: Path, handed_on: str | None, threads: int, say: Callable[[str], None],
         tag: str) -> None:
    """Fits the stage (resuming from its ``last.ckpt``) and writes ``fit.done.json``."""
    args = [*stage.args, *([f"{INIT_WEIGHTS_ARG}={handed_on}"] if handed_on else []), *_logger_args(folder, "fit")]
    resume, start = _last_checkpoint(folder), time.monotonic()
    if resume:
        say(f"{tag}: fit resumes from {resume}")
        rc, out, err = _call("fit", [*args, f"--ckpt_path={resume}"], folder, threads)
        if rc != 0 and rc not in INTERRUPTED_EXIT_CODES and not STOP.is_set():
            say(f"{tag}: resumed fit exited with {rc}; retrying from scratch in a new version folder")
            rc, out, err = _call("fit", args, folder, threads)
    else:
        rc, out, err = _call("fit", args, folder, threads)
    record = _call_record("fit", folder, rc, out, err, stage=stage.index)
    if rc != 0:
        raise StageFailed({**record, "message": f"stage {stage.index}/{stage.count} fit exited with {rc}"})
    monitor, mode = str(stage.get("checkpoint.monitor", "val/dice_mean")), str(stage.get("checkpoint.mode", "max"))
    done = {**summarize_checkpoints(folder, monitor, mode), "seconds": time.monotonic() - start}
    needs = "best" if stage.is_last else stage.hand_on
    if not done.get(needs) or not done.get("config"):
        raise StageFailed({**record, "phase": "checkpoints", "message": f"fit exited 0 but left no {needs} "
                           f"checkpoint scored by {monitor} in {folder / 'fit'}"})
    stopped = "the runner was stopped" if STOP.is_set() else unfinished_training(done)
    if stopped:  # resumed from last.ckpt on the next call; never recorded as finished
        raise StageFailed({**record, "interrupted": True, "message": f"stage {stage.index}/{stage.count}: {stopped}"})
    _write(folder / "fit.done.json", done)


def _test(folder: Path, done: dict[str, Any], threads: int) -> None:
    start = time.monotonic()
    rc, out, err = _call("test", [f"--config={done['config']}", f"--ckpt_path={done['best']}",
                                  *_logger_args(folder, "test")], folder, threads)
    produced = sorted(folder.glob("test/version_*/test_metrics.json"), key=lambda p: _version(p.parent))
    if rc != 0 or not produced:
        message = f"test exited with {rc}" if rc else "test exited 0 but wrote no test_metrics.json"
        raise StageFailed({**_call_record("test", folder, rc, out, err), "message": message})
    if (cases := produced[-1].with_name("test_cases.csv")).is_file():
        _write(folder / cases.name, cases.read_bytes())
    _write(folder / "result.json", {
        "checkpoint": done["best"], "monitor": done["monitor"], "best_score": done["best_score"],
        "fit_seconds": done.get("seconds"), "test_seconds": time.monotonic() - start,
        "test_dir": str(produced[-1].parent), "fit_versions": done.get("versions")})
    _write(folder / "test_metrics.json", produced[-1].read_bytes())  # last: marks the run finished


def _call(subcommand: str, args: list[str], folder: Path, threads: int) -> tuple[int, Path, Path]:
    """Runs ``kdseg <subcommand> <args>``; stdout / stderr go to new files in ``folder/logs``."""
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    attempt = 1 + len(list(logs.glob(f"{subcommand}-*.err")))
    out, err = logs / f"{subcommand}-{attempt}.log", logs / f"{subcommand}-{attempt}.err"
    if STOP.is_set():
        err.write_text("not started: the runner was stopped\n")
        return 130, out, err
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **{name: str(threads) for name in _THREAD_VARS}}
    cmd = [sys.executable, "-m", "kdseg.cli", subcommand, *args]
    with out.open("w") as fo, err.open("w") as fe:
        fo.write("# " + " ".join(cmd) + "\n")
        fo.flush()
        child = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
        _CHILDREN.add(child)
        try:
            return child.wait(), out, err
        finally:
            _CHILDREN.discard(child)


def stop_children() -> None:
    """No new call starts; running ones get SIGTERM (they save their step) and 20 s to exit."""
    STOP.set()
    children = list(_CHILDREN)
    for child in children:
        child.terminate()
    for child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
