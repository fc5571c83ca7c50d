"""Running the planned runs: ``kdseg fit`` then ``kdseg test`` in subprocesses, resumably.

Each stage of a run has its own folder ``<out>/runs/<config stem>-<key>/`` (the key is the hash of
its resolved config, :mod:`kdseg.reproduce.config_key`)::

    resolved_config.yaml  run.json      what was planned (arguments, setting, method, seed)
    fit/version_N/                      CSVLogger folders: config.yaml, metrics.csv, checkpoints/
    fit.done.json                       written when fit exited 0: best / last checkpoint, scores
    test/version_N/                     kdseg test of the best checkpoint
    test_metrics.json  test_cases.csv   copied there when the test succeeded: the run is finished
    result.json  logs/                  timings, the checkpoint tested; stdout / stderr of each call

States, checked in this order when a stage comes up:

- ``test_metrics.json`` exists (last stage) or ``fit.done.json`` exists (earlier stage): finished,
  skipped;
- ``fit.done.json`` exists (last stage): only the test runs;
- a checkpoint exists in ``fit/version_*/checkpoints`` (an interrupted fit): the fit resumes from
  the latest training state (:func:`latest_state_checkpoint`) with ``--ckpt_path`` (student,
  teacher, optimizer and step restored), which Lightning writes into a *new* version folder, so no
  checkpoint is ever overwritten; if the resumed fit fails (e.g. the interruption truncated the
  checkpoint), it is retried once from scratch, again in a new version folder;
- otherwise a fresh fit, in a new version folder.

The checkpoint tested is the best by the config's checkpoint monitor (``val/dice_mean``, or
``val/aji_mean`` for the instance methods) over *all* version folders of the stage, read from
each checkpoint's own ModelCheckpoint state: a resumed fit keeps no memory of the scores of the
checkpoints an earlier version wrote.

A fit that exits 130 / 143 (stopped by SIGINT / SIGTERM, the step it reached saved in
``last.ckpt``) is interrupted, not failed: reported as such, it resumes on the next call. Any
other failing call (non-zero exit) is recorded with its log paths and the last lines of its stderr;
the run is reported as FAILED and the other runs go on. ``jobs`` runs go in parallel (threads
driving subprocesses); the stages of one run always go in order. Each subprocess gets
``OMP_NUM_THREADS`` (torch's intra-op threads) = ``threads``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdseg.reproduce.metrics import HEADLINE, flatten_test_metrics
from kdseg.reproduce.plan import INIT_WEIGHTS_ARG, RunPlan, StagePlan

STDERR_TAIL_LINES = 15
#: Exit statuses of a ``kdseg fit`` stopped by SIGINT / SIGTERM after saving the step it reached
#: to last.ckpt (kdseg.callbacks.interrupt): an interrupted fit, resumed on the next call.
INTERRUPTED_EXIT_CODES = (128 + signal.SIGINT, 128 + signal.SIGTERM)
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass
class RunResult:
    """What became of one planned run."""

    plan: RunPlan
    status: str  # "finished" (now), "skipped" (finished earlier), "failed", "not_run"
    seconds: float = 0.0
    folder: Path | None = None
    test_metrics: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    failure: dict[str, Any] | None = None

    @property
    def has_metrics(self) -> bool:
        return self.status in ("finished", "skipped")


class StageFailed(Exception):
    """A stage could not complete; ``record`` says where (phase, logs, stderr tail)."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record.get("message", "stage failed"))
        self.record = record


def stage_folder(runs_dir: Path, stage: StagePlan) -> Path:
    return runs_dir / stage.folder_name


def read_finished(runs_dir: Path, plan: RunPlan) -> RunResult | None:
    """The result of ``plan`` if its last stage has finished (``test_metrics.json`` exists)."""
    if plan.error or not plan.stages:
        return None
    folder = stage_folder(runs_dir, plan.final)
    metrics_file = folder / "test_metrics.json"
    if not metrics_file.is_file():
        return None
    content = json.loads(metrics_file.read_text())
    result_file = folder / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    return RunResult(plan, "skipped", folder=folder, test_metrics=content,
                     metrics=flatten_test_metrics(plan.setting.task, content), result=result)


def headline(plan: RunPlan, metrics: dict[str, float]) -> str:
    """``Dice 0.812`` (semantic) or ``AJI 0.512, Dice 0.701`` (instance) for progress lines."""
    key, name = HEADLINE[plan.setting.task]
    parts = [f"{name} {metrics.get(key, float('nan')):.4f}"]
    if key != "dice_mean" and "dice_mean" in metrics:
        parts.append(f"Dice {metrics['dice_mean']:.4f}")
    return ", ".join(parts)


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


def _version_number(folder: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def fit_versions(folder: Path) -> list[Path]:
    """The stage's ``fit/version_*`` folders, oldest first."""
    return sorted((p for p in (folder / "fit").glob("version_*") if p.is_dir()), key=_version_number)


def latest_state_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of the latest training state of a stage: ``last.ckpt`` of the newest version
    folder that has one (the CLI's :class:`~kdseg.callbacks.latest_checkpoint.LatestCheckpoint`
    rewrites it at every validation and at the end of fit). Where a fit resumes, and what a stage
    hands on as ``last``."""
    for version in reversed(fit_versions(folder)):
        last = version / "checkpoints" / "last.ckpt"
        if last.is_file():
            return last
    return None


def unfinished_training(done: dict[str, Any]) -> str | None:
    """Why a fit that exited 0 did not train to its end, or None when it did.

    Lightning alone ends a fit gracefully, with exit status 0, on SIGTERM (a stopped runner, a
    preempted job); kdseg's CLI exits 143 instead (:data:`INTERRUPTED_EXIT_CODES`), but a fit
    that exits 0 short of ``trainer.max_steps`` (e.g. another callback's ``should_stop``) must
    still be resumed, not taken as finished. Checked on ``last.ckpt``, which holds the final state.
    """
    import yaml

    from kdseg.checkpoints import load_checkpoint

    if not done.get("last") or not done.get("config"):
        return None
    max_steps = (yaml.safe_load(Path(done["config"]).read_text()).get("trainer") or {}).get("max_steps")
    if not isinstance(max_steps, int) or max_steps <= 0:
        return None  # an epoch-bounded fit: nothing to compare with
    step = int(load_checkpoint(done["last"], mmap=True)["global_step"])
    return None if step >= max_steps else f"fit stopped at step {step} of {max_steps} (interrupted)"


def summarize_checkpoints(folder: Path, monitor: str, mode: str) -> dict[str, Any]:
    """Best (by ``monitor``, over every version folder) and latest-state checkpoint of a stage."""
    versions = fit_versions(folder)
    latest = latest_state_checkpoint(folder)
    scored = []
    for version in versions:
        for ckpt in sorted((version / "checkpoints").glob("*.ckpt")):
            if ckpt.name.startswith("last"):
                continue
            score = checkpoint_score(ckpt)
            if score is not None and score == score:  # NaN scores never win
                scored.append((score, ckpt))
    best = None
    if scored:
        best = (max if mode == "max" else min)(scored, key=lambda item: item[0])
    configs = [v / "config.yaml" for v in versions if (v / "config.yaml").is_file()]
    return {
        "monitor": monitor,
        "mode": mode,
        "best": str(best[1]) if best else None,
        "best_score": best[0] if best else None,
        "last": str(latest) if latest else None,
        "config": str(configs[-1]) if configs else None,
        "versions": [str(v) for v in versions],
    }


def _write_json_once(path: Path, content: dict[str, Any]) -> None:
    if not path.exists():
        _write_json(path, content)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, default=str))
    tmp.replace(path)


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-lines:])


class OutDirLock:
    """Keeps two runners off one output folder (they would train the same run twice). A lock
    left by a runner that died (its pid is gone) is taken over."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".reproduce.lock"

    def __enter__(self) -> "OutDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise RuntimeError(
                        f"{self.path}: another reproduce runner (pid {pid}) is using {self.path.parent}"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Executor:
    """Runs planned runs ``jobs`` at a time; see the module docstring.

    Args:
        out: the output folder (``runs/`` and ``logs/`` go there).
        jobs: runs in parallel.
        threads: torch / OpenMP threads of each subprocess.
        print_fn: where progress lines go.
    """

    def __init__(self, out: Path, jobs: int, threads: int, print_fn: Callable[[str], None] = print) -> None:
        self.out = out
        self.runs_dir = out / "runs"
        self.jobs = max(1, jobs)
        self.threads = max(1, threads)
        self._print = print_fn
        self._print_lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._key_locks_guard = threading.Lock()
        self._children: set[subprocess.Popen] = set()
        self._children_guard = threading.Lock()
        self._stop = threading.Event()
        self._budget_guard = threading.Lock()
        self._budget: int | None = None

    # -- public -----------------------------------------------------------------------------------
    def execute(self, runs: list[RunPlan], max_runs: int | None = None) -> list[RunResult]:
        """Runs the selected plans (at most ``max_runs`` that need work); returns one result per
        plan, selected or not (unselected ones are read from disk when finished earlier)."""
        self._budget = max_runs
        selected = [r for r in runs if r.selected]
        position = {id(r): k for k, r in enumerate(selected, start=1)}
        results: dict[int, RunResult] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = {
                pool.submit(self._run, plan, position[id(plan)], len(selected)): plan for plan in selected
            }
            try:
                pending = set(futures)
                while pending:
                    done, pending = concurrent.futures.wait(pending, timeout=0.5)
                    for future in done:
                        results[id(futures[future])] = future.result()
            except BaseException:
                self.stop()
                raise
        for plan in runs:
            if id(plan) not in results:
                results[id(plan)] = read_finished(self.runs_dir, plan) or RunResult(plan, "not_run")
        return [results[id(p)] for p in runs]

    def stop(self) -> None:
        """No new calls start; running ones are terminated (used on SIGTERM / Ctrl-C)."""
        self._stop.set()
        with self._children_guard:
            children = list(self._children)
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()

    # -- one run ------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        with self._print_lock:
            self._print(text)

    def _claim(self) -> bool:
        with self._budget_guard:
            if self._budget is None:
                return True
            if self._budget <= 0:
                return False
            self._budget -= 1
            return True

    def _run(self, plan: RunPlan, k: int, n: int) -> RunResult:
        prefix = f"[{k}/{n}] {plan.label}"
        if plan.error:
            record = self._planning_failure(plan)
            self._say(f"{prefix} FAILED before starting: {plan.error} (log {record['stderr']})")
            return RunResult(plan, "failed", failure=record)
        finished = read_finished(self.runs_dir, plan)
        if finished is not None:
            self._say(f"{prefix} skipped (finished) ({headline(plan, finished.metrics)})")
            return finished
        if self._stop.is_set():
            self._say(f"{prefix} not run (the runner was stopped)")
            return RunResult(plan, "not_run")
        if not self._claim():
            self._say(f"{prefix} not run (--max-runs reached)")
            return RunResult(plan, "not_run")
        stages = f", {len(plan.stages)} stages" if len(plan.stages) > 1 else ""
        self._say(f"{prefix} started{stages}")
        start = time.monotonic()
        handed_on: str | None = None
        try:
            for stage in plan.stages:
                handed_on = self._run_stage(plan, stage, handed_on, prefix)
        except StageFailed as failed:
            seconds = time.monotonic() - start
            if self._stop.is_set() or failed.record.get("returncode") in INTERRUPTED_EXIT_CODES:
                why = "the runner was stopped" if self._stop.is_set() else f"fit exited {failed.record['returncode']}"
                self._say(f"{prefix} interrupted after {seconds:.0f}s ({why}); it resumes on the next call")
                return RunResult(plan, "not_run", seconds=seconds)
            record = failed.record
            folder = record.get("folder")
            if folder:
                _write_json(Path(folder) / "last_failure.json", record)
            tail = "\n".join(f"    {line}" for line in str(record.get("stderr_tail", "")).splitlines())
            self._say(f"{prefix} FAILED after {seconds:.0f}s: {record['message']} (log {record.get('stderr')})"
                      + (f"\n{tail}" if tail else ""))
            return RunResult(plan, "failed", seconds=seconds, folder=Path(folder) if folder else None,
                             failure=record)
        seconds = time.monotonic() - start
        result = read_finished(self.runs_dir, plan)
        assert result is not None, "a run whose stages all passed has test_metrics.json"
        result.status, result.seconds = "finished", seconds
        self._say(f"{prefix} finished in {seconds:.0f}s ({headline(plan, result.metrics)})")
        return result

    def _planning_failure(self, plan: RunPlan) -> dict[str, Any]:
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        err = logs / f"plan-{plan.setting.name}-{plan.method.name}-seed{plan.seed}.err"
        err.write_text(str(plan.error) + "\n")
        return {"phase": "plan", "message": str(plan.error), "stderr": str(err), "stderr_tail": _tail(err),
                "returncode": None}

    def _key_lock(self, key: str) -> threading.Lock:
        with self._key_locks_guard:
            return self._key_locks.setdefault(key, threading.Lock())

    # -- one stage ----------------------------------------------------------------------------------
    def _run_stage(self, plan: RunPlan, stage: StagePlan, handed_on: str | None, prefix: str) -> str | None:
        """Runs (or skips) one stage; returns the checkpoint it hands to the next stage."""
        assert stage.key is not None and plan.data is not None
        folder = stage_folder(self.runs_dir, stage)
        tag = f"{prefix} stage {stage.index}/{stage.count} ({stage.config.stem})" if stage.count > 1 else prefix
        with self._key_lock(stage.key):
            if stage.is_last and (folder / "test_metrics.json").is_file():
                return None
            done_file = folder / "fit.done.json"
            if not stage.is_last and done_file.is_file():
                done = json.loads(done_file.read_text())
                self._say(f"{tag}: skipped (finished), hands on {stage.hand_on} checkpoint")
                return self._handed_on(stage, done, folder)
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / "resolved_config.yaml").exists():
                (folder / "resolved_config.yaml").write_text(stage.resolved_text)
            _write_json_once(folder / "run.json", {
                "setting": plan.setting.name, "method": plan.method.name, "seed": plan.seed,
                "stage": stage.index, "stages": stage.count, "config": str(stage.config), "key": stage.key,
                "args": list(stage.args),
            })
            if done_file.is_file():
                done = json.loads(done_file.read_text())
            else:
                done = self._fit(plan, stage, folder, handed_on, tag)
            if not stage.is_last:
                return self._handed_on(stage, done, folder)
            self._test(stage, folder, done, tag)
            return None

    def _handed_on(self, stage: StagePlan, done: dict[str, Any], folder: Path) -> str:
        ckpt = done.get(stage.hand_on)
        if not ckpt or not Path(ckpt).is_file():
            raise StageFailed({
                "phase": "checkpoints", "folder": str(folder), "stage": stage.index,
                "message": f"stage {stage.index} has no {stage.hand_on} checkpoint to hand on ({folder / 'fit'})",
            })
        return str(ckpt)

    def _fit(self, plan: RunPlan, stage: StagePlan, folder: Path, handed_on: str | None,
             tag: str) -> dict[str, Any]:
        assert plan.data is not None
        args = list(stage.args)
        if handed_on is not None:
            args.append(f"{INIT_WEIGHTS_ARG}={handed_on}")
        args += [
            "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={folder}",
            "--trainer.logger.init_args.name=fit",
            "--trainer.enable_progress_bar=false",
        ]
        resume = latest_state_checkpoint(folder)
        start = time.monotonic()
        if resume:
            self._say(f"{tag}: fit resumes from {resume}")
            rc, out, err = self._call("fit", [*args, f"--ckpt_path={resume}"], folder)
            if rc != 0 and rc not in INTERRUPTED_EXIT_CODES and not self._stop.is_set():
                self._say(f"{tag}: resumed fit exited with {rc}; retrying from scratch in a new version folder")
                rc, out, err = self._call("fit", args, folder)
        else:
            rc, out, err = self._call("fit", args, folder)
        if rc != 0:
            raise StageFailed({
                "phase": "fit", "stage": stage.index, "folder": str(folder), "returncode": rc,
                "message": f"stage {stage.index}/{stage.count} fit exited with {rc}",
                "stdout": str(out), "stderr": str(err), "stderr_tail": _tail(err),
            })
        monitor = str(stage.get("checkpoint.monitor", "val/dice_mean"))
        mode = str(stage.get("checkpoint.mode", "max"))
        done = summarize_checkpoints(folder, monitor, mode)
        done["seconds"] = time.monotonic() - start
        needs = "best" if stage.is_last else stage.hand_on
        if not done.get(needs) or not done.get("config"):
            raise StageFailed({
                "phase": "checkpoints", "stage": stage.index, "folder": str(folder), "returncode": rc,
                "message": f"fit exited 0 but left no {needs} checkpoint scored by {monitor} in {folder / 'fit'}",
                "stdout": str(out), "stderr": str(err), "stderr_tail": _tail(err),
            })
        stopped = "the runner was stopped" if self._stop.is_set() else unfinished_training(done)
        if stopped:  # resumed from last.ckpt on the next call; never recorded as finished
            raise StageFailed({
                "phase": "fit", "stage": stage.index, "folder": str(folder), "returncode": rc,
                "message": f"stage {stage.index}/{stage.count}: {stopped}",
                "stdout": str(out), "stderr": str(err), "stderr_tail": _tail(err),
            })
        _write_json(folder / "fit.done.json", done)
        return done

    def _test(self, stage: StagePlan, folder: Path, done: dict[str, Any], tag: str) -> None:
        args = [
            f"--config={done['config']}",
            f"--ckpt_path={done['best']}",
            "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={folder}",
            "--trainer.logger.init_args.name=test",
            "--trainer.enable_progress_bar=false",
        ]
        start = time.monotonic()
        rc, out, err = self._call("test", args, folder)
        produced = sorted(
            (p for p in (folder / "test").glob("version_*/test_metrics.json")),
            key=lambda p: _version_number(p.parent),
        )
        if rc != 0 or not produced:
            raise StageFailed({
                "phase": "test", "stage": stage.index, "folder": str(folder), "returncode": rc,
                "message": f"test exited with {rc}" if rc else "test exited 0 but wrote no test_metrics.json",
                "stdout": str(out), "stderr": str(err), "stderr_tail": _tail(err),
            })
        source = produced[-1]
        cases = source.with_name("test_cases.csv")
        if cases.is_file():
            tmp = folder / "test_cases.csv.tmp"
            shutil.copyfile(cases, tmp)
            tmp.replace(folder / "test_cases.csv")
        _write_json(folder / "result.json", {
            "checkpoint": done["best"], "monitor": done["monitor"], "best_score": done["best_score"],
            "fit_seconds": done.get("seconds"), "test_seconds": time.monotonic() - start,
            "test_dir": str(source.parent), "fit_versions": done.get("versions"),
        })
        tmp = folder / "test_metrics.json.tmp"
        shutil.copyfile(source, tmp)
        tmp.replace(folder / "test_metrics.json")  # last: marks the run finished

    # -- subprocesses ---------------------------------------------------------------------------------
    def _call(self, subcommand: str, args: list[str], folder: Path) -> tuple[int, Path, Path]:
        """Runs ``kdseg <subcommand> <args>``; stdout / stderr go to new files in ``folder/logs``."""
        logs = folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        attempt = 1 + sum(1 for _ in logs.glob(f"{subcommand}-*.err"))
        out, err = logs / f"{subcommand}-{attempt}.log", logs / f"{subcommand}-{attempt}.err"
        if self._stop.is_set():
            err.write_text("not started: the runner was stopped\n")
            return 130, out, err
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update({name: str(self.threads) for name in _THREAD_VARS})
        cmd = [sys.executable, "-m", "kdseg.cli", subcommand, *args]
        with out.open("w") as fo, err.open("w") as fe:
            fo.write("# " + " ".join(cmd) + "\n")
            fo.flush()
            child = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env)
            with self._children_guard:
                self._children.add(child)
            try:
                rc = child.wait()
            finally:
                with self._children_guard:
                    self._children.discard(child)
        return rc, out, err


def install_signal_handlers(executor: Executor) -> None:
    """SIGTERM stops the children and exits (143); Ctrl-C does the same through KeyboardInterrupt."""

    def on_term(signum: int, frame: Any) -> None:
        executor.stop()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
