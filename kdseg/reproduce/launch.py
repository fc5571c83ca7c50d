"""Where the runs go: here (``concurrent.futures``, ``--jobs`` at a time) or one submitit job per run
(``slurm``, or ``submitit-local``: submitit's LocalExecutor, a Slurm dry run), each calling
:func:`~kdseg.reproduce.execute.run_stages`, so both share the stage folders' skip / resume logic.
Slurm parameters are submitit AutoExecutor's, from the profile's ``slurm`` block then ``--slurm``.
Stopping the runner cancels its jobs; their fits save their step and resume on the next call.
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any, Callable

from kdseg.reproduce.execute import STOP, RunResult, headline, read_finished, run_stages, stop_children
from kdseg.reproduce.plan import RunPlan

#: Defaults under the profile's ``slurm`` block and ``--slurm``: one GPU per run, a day at most.
SLURM_DEFAULTS = {"name": "kdseg-reproduce", "timeout_min": 24 * 60, "gpus_per_node": 1, "cpus_per_task": 8}


class OutDirLock:
    """Keeps a second runner off one output folder; a dead runner's lock is taken over."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".reproduce.lock"

    def __enter__(self) -> "OutDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            pid = int(self.path.read_text().strip() or 0)
            os.kill(pid, 0)  # ProcessLookupError: the runner that left the lock is gone
        except PermissionError:  # alive, another user's
            pass
        except (FileNotFoundError, ProcessLookupError, ValueError):
            self.path.write_text(str(os.getpid()))
            return self
        raise RuntimeError(f"{self.path}: another reproduce runner (pid {pid}) is using {self.path.parent}")

    def __exit__(self, *exc: Any) -> None:
        self.path.unlink(missing_ok=True)


def launch(runs: list[RunPlan], out: Path, launcher: str = "local", jobs: int = 1, threads: int = 1,
           max_runs: int | None = None, slurm: dict[str, Any] | None = None,
           say: Callable[[str], None] = print,
           recorded: Callable[[RunPlan], RunResult | None] = lambda plan: None) -> list[RunResult]:
    """Runs the selected unfinished plans (at most ``max_runs``); one result per plan (unselected ones
    read from disk when finished earlier). ``recorded``: a plan's result from its record when its run
    folder has none (``records.read_record``); such a run is not rerun."""
    selected = [r for r in runs if r.selected]
    results: dict[int, RunResult] = {}
    todo: list[tuple[RunPlan, str]] = []
    for k, plan in enumerate(selected, start=1):
        prefix = f"[{k}/{len(selected)}] {plan.label}"
        finished = read_finished(out / "runs", plan) or recorded(plan)
        if plan.error:
            (out / "logs").mkdir(parents=True, exist_ok=True)
            log = out / "logs" / f"plan-{plan.setting.name}-{plan.method.name}-seed{plan.seed}.err"
            log.write_text(f"{plan.error}\n")
            say(f"{prefix} FAILED before starting: {plan.error} (log {log})")
            results[id(plan)] = RunResult(plan, "failed", failure={
                "phase": "plan", "message": plan.error, "stderr": str(log), "stderr_tail": plan.error})
        elif finished is not None:
            how = "finished" if finished.status == "skipped" else f"finished, record in {finished.folder}"
            say(f"{prefix} skipped ({how}) ({headline(plan, finished.metrics)})")
            results[id(plan)] = finished
        elif max_runs is not None and len(todo) >= max_runs:
            say(f"{prefix} not run (--max-runs reached)")
        else:
            todo.append((plan, prefix))
    if todo and launcher == "local":
        results.update(_local(todo, out, jobs, threads, say))
    elif todo:
        results.update(_submitit(todo, out, launcher, {**SLURM_DEFAULTS, **(slurm or {})}, say))
    return [results.get(id(p)) or read_finished(out / "runs", p) or recorded(p) or RunResult(p, "not_run")
            for p in runs]


def _local(todo: list[tuple[RunPlan, str]], out: Path, jobs: int, threads: int,
           say: Callable[[str], None]) -> dict[int, RunResult]:
    def start(plan: RunPlan, prefix: str) -> RunResult:
        if STOP.is_set():
            say(f"{prefix} not run (the runner was stopped)")
            return RunResult(plan, "not_run")
        say(f"{prefix} started" + (f", {len(plan.stages)} stages" if len(plan.stages) > 1 else ""))
        return run_stages(plan, out, threads, say, prefix)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(start, plan, prefix): plan for plan, prefix in todo}
        try:
            pending = set(futures)
            while pending:  # short waits: Ctrl-C reaches this thread at once
                _, pending = concurrent.futures.wait(pending, timeout=0.5)
        except BaseException:
            stop_children()
            raise
    return {id(plan): future.result() for future, plan in futures.items()}


def submitit_executor(out: Path, launcher: str, params: dict[str, Any]) -> Any:
    """submitit's executor for ``slurm`` or ``submitit-local`` (job folders ``<out>/submitit/<job id>``)."""
    import submitit

    executor = submitit.AutoExecutor(folder=out / "submitit" / "%j",
                                     cluster="local" if launcher == "submitit-local" else "slurm")
    if launcher == "submitit-local":  # this machine's GPUs (if any) are not claimed
        params = {"gpus_per_node": 0, **{k: v for k, v in params.items() if k != "gpus_per_node"}}
    executor.update_parameters(**params)
    return executor


def _submitit(todo: list[tuple[RunPlan, str]], out: Path, launcher: str, params: dict[str, Any],
              say: Callable[[str], None]) -> dict[int, RunResult]:
    import submitit

    executor, threads = submitit_executor(out, launcher, params), int(params.get("cpus_per_task") or 1)
    with executor.batch():
        submitted = [executor.submit(run_stages, plan, out, threads, print, prefix) for plan, prefix in todo]
    by_job = {job.job_id: (job, plan, prefix) for job, (plan, prefix) in zip(submitted, todo)}
    for job, plan, prefix in by_job.values():
        say(f"{prefix} submitted as {launcher} job {job.job_id} (log {job.paths.stdout})")
    results = {}
    try:
        for job in submitit.helpers.as_completed(submitted, poll_frequency=5 if launcher == "slurm" else 0.5):
            _, plan, prefix = by_job[job.job_id]
            try:
                result = job.result()
            except Exception as error:  # the job itself failed: killed, out of time, node lost
                message = f"{launcher} job {job.job_id} failed: {str(error).strip().splitlines()[-1:]}"
                result = RunResult(plan, "failed", failure={"phase": "job", "message": message,
                                                            "stderr": str(job.paths.stderr)})
            say(f"{prefix} {result.status} ({launcher} job {job.job_id})"
                + (f" ({headline(plan, result.metrics)})" if result.has_metrics else ""))
            results[id(plan)] = result
    except BaseException:
        for job in submitted:
            job.cancel(check=False)
        raise
    return results
