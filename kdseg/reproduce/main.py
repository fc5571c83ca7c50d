"""``python -m kdseg.reproduce`` (``make reproduce-table``): plans every run of the matrix under the
profile, runs the selected unfinished ones, writes tables and figures to ``<results>/<profile>/``.
Exit status: 0 all selected runs finished, 1 one failed (the table says FAILED), 2 bad input (one
``kdseg: error:`` line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from kdseg.reproduce.spec import SpecError, load_matrix, load_paper_numbers, load_profile, profile_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdseg.reproduce",
                                description="Run the experiment matrix under a budget profile and write the "
                                            "results table.")
    p.add_argument("--profile", default="cpu", help="smoke, cpu, paper, or a profile file (default cpu)")
    p.add_argument("--matrix", default="experiments/reproduce/matrix.yaml", help="the experiment matrix")
    p.add_argument("--papers", default="experiments/reproduce/paper_numbers.yaml",
                   help="the papers' reported numbers ('none' to leave them out)")
    p.add_argument("--out", default=None, help="run folders (default runs/reproduce/<profile>)")
    p.add_argument("--results", default="experiments/results", help="tables and figures go to <results>/<profile>/")
    p.add_argument("--launcher", default="local", choices=("local", "slurm", "submitit-local"),
                   help="local: subprocesses here; slurm: one submitit job per run; submitit-local: "
                        "submitit's LocalExecutor (a Slurm dry run on this machine)")
    p.add_argument("--slurm", nargs="+", default=[], metavar="KEY=VALUE",
                   help="submitit AutoExecutor parameters over the profile's slurm block, e.g. "
                        "slurm_partition=gpu timeout_min=1440 gpus_per_node=1 cpus_per_task=8")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel (local launcher; Slurm: slurm_array_parallelism)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per local run (default cores // jobs)")
    p.add_argument("--only", nargs="+", default=[], metavar="SETTING[/METHOD]",
                   help="run only these entries (wildcards allowed); the table still shows every entry")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="replace the profile's seeds")
    p.add_argument("--set", nargs="+", default=[], metavar="VAR=VALUE", help="replace the profile's vars")
    p.add_argument("--max-runs", type=int, default=None, help="start at most this many unfinished runs")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: tables and figures of finished runs (also while a runner works on --out)")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and their keys, run nothing")
    return p


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SpecError(f"{option} {item}: expected NAME=VALUE")
        out[name] = value
    return out


def run(argv: list[str] | None = None) -> int:
    """The command; returns the exit status."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args, time.monotonic())
    except (SpecError, RuntimeError) as error:
        print(f"kdseg: error: {error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("reproduce: interrupted; finished runs are kept, the others resume on the next call", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the runner as Ctrl-C does


def _run(args: argparse.Namespace, start: float) -> int:
    from kdseg.reproduce.launch import OutDirLock, launch
    from kdseg.reproduce.plan import parse_selection, plan_runs

    jobs = max(1, args.jobs)
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // jobs)
    matrix = load_matrix(args.matrix)
    profile = load_profile(profile_path(args.profile), matrix, _pairs(args.set, "--set"))
    slurm = {**profile.slurm, **{k: _number(v) for k, v in _pairs(args.slurm, "--slurm").items()}}
    papers = None if args.papers == "none" else load_paper_numbers(args.papers, matrix)
    out = Path(args.out or f"runs/reproduce/{profile.name}").resolve()
    results_dir = Path(args.results).resolve() / profile.name
    selection = parse_selection(args.only, matrix)
    say = lambda text: print(text, flush=True)  # noqa: E731
    # --table-only runs nothing and leaves the run folders alone: it may read them while a runner works
    with contextlib.nullcontext() if args.table_only else OutDirLock(out):
        runs = plan_runs(matrix, profile, out, selection, seeds=args.seeds)
        if args.table_only:
            for r in runs:
                r.selected = False
        where = f"{jobs} job(s) x {threads} thread(s)" if args.launcher == "local" else f"launcher {args.launcher}"
        say(f"reproduce: profile {profile.name}: {len(runs)} runs in {matrix.path.name}, "
            f"{sum(r.selected for r in runs)} selected; {where}; runs in {out}")
        if args.dry_run:
            for r in runs:
                keys = " -> ".join(s.folder_name if s.key else f"({s.error})" for s in r.stages) or f"({r.error})"
                say(f"  {'*' if r.selected else ' '} {r.label}: {keys}")
            return 0
        from kdseg.reproduce.records import read_record

        results = launch(runs, out, args.launcher, jobs, threads, args.max_runs, slurm, say,
                         recorded=lambda plan: read_record(results_dir, plan))
        from kdseg.results.tables import write_tables

        paths = write_tables(results_dir, matrix, profile, results, papers)
        say(f"reproduce: wrote {paths['md']}, {paths['csv'].name}, {paths['tex'].name}")
        if not args.no_figures:
            from kdseg.results.figures import write_figures

            figures = write_figures(results_dir / "figures", matrix, results, out / "figures",
                                    warn=lambda text: say(f"reproduce: warning: {text}"))
            if figures:
                say(f"reproduce: wrote {len(figures)} figures to {results_dir / 'figures'}")
    mine = [r for r in results if r.plan.selected]
    counts = {s: sum(r.status == s for r in mine) for s in ("finished", "skipped", "restored", "failed", "not_run")}
    if not args.table_only:
        say(f"reproduce: {len(mine)} selected runs: {counts['finished']} finished now, {counts['skipped']} skipped "
            f"(finished earlier), {counts['restored']} restored from their records, "
            f"{counts['failed']} FAILED, {counts['not_run']} not run; "
            f"{time.monotonic() - start:.0f}s")
    for r in (r for r in mine if r.status == "failed"):
        say(f"reproduce: FAILED {r.plan.label}: {(r.failure or {}).get('message')} "
            f"(log {(r.failure or {}).get('stderr')})")
    return 1 if counts["failed"] else 0


def _number(text: str) -> object:
    """``--slurm`` values: integers and floats as numbers, the rest as text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    raise SystemExit(run())
