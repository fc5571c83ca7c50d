"""Command line of the reproduction (``python -m kdseg.reproduce``, ``make reproduce-table``).

    python -m kdseg.reproduce --profile smoke|cpu|paper [--jobs N] [--matrix FILE]
        [--out runs/reproduce/<profile>] [--results experiments/results] [--only SETTING[/METHOD] ...]
        [--seeds 0 1] [--set VAR=VALUE ...] [--max-runs K] [--table-only] [--dry-run]

Plans every run of the matrix under the profile, runs the selected unfinished ones (``--jobs`` at a
time, each with ``max(1, cores // jobs)`` torch threads unless ``--threads``), then writes the
tables and figures to ``<results>/<profile>/``. Exit status: 0 when every selected run finished,
1 when one failed (the others still ran and the table shows FAILED), 2 for a bad matrix, profile
or papers file, or missing data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

from kdseg.reproduce.spec import SpecError, load_matrix, load_paper_numbers, load_profile, profile_path

if TYPE_CHECKING:
    from kdseg.reproduce.plan import RunPlan


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kdseg.reproduce",
        description="Run the experiment matrix under a budget profile and write the results table.",
    )
    parser.add_argument("--profile", default="cpu", help="smoke, cpu, paper, or a profile file (default cpu)")
    parser.add_argument("--matrix", default="experiments/reproduce/matrix.yaml", help="the experiment matrix")
    parser.add_argument("--papers", default="experiments/reproduce/paper_numbers.yaml",
                        help="the papers' reported numbers ('none' to leave them out)")
    parser.add_argument("--out", default=None, help="run folders (default runs/reproduce/<profile>)")
    parser.add_argument("--results", default="experiments/results",
                        help="tables and figures go to <results>/<profile>/ (default experiments/results)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default max(1, cores // jobs))")
    parser.add_argument("--only", nargs="+", default=[], metavar="SETTING[/METHOD]",
                        help="run only these entries (wildcards allowed); the table still shows every entry")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="replace the profile's seeds")
    parser.add_argument("--set", nargs="+", default=[], metavar="VAR=VALUE", help="replace profile vars")
    parser.add_argument("--max-runs", type=int, default=None,
                        help="start at most this many unfinished runs, then write the table")
    parser.add_argument("--table-only", action="store_true", help="run nothing: tables and figures of finished runs")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs and their keys, run nothing")
    return parser


def _vars(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SpecError(f"--set {item}: expected VAR=VALUE")
        out[name] = value
    return out


def run(argv: list[str] | None = None) -> int:
    """The command; returns the exit status."""
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    try:
        return _run(args, start)
    except (SpecError, RuntimeError, FileExistsError) as error:
        print(f"reproduce: error: {error}", file=sys.stderr, flush=True)
        return 2


def _run(args: argparse.Namespace, start: float) -> int:
    import torch

    from kdseg.reproduce.execute import Executor, OutDirLock, install_signal_handlers, read_finished
    from kdseg.reproduce.plan import parse_selection, plan_runs

    jobs = max(1, args.jobs)
    threads = args.threads or max(1, _cores() // jobs)
    torch.set_num_threads(threads)
    matrix = load_matrix(args.matrix)
    profile = load_profile(profile_path(args.profile), matrix, _vars(args.set))
    papers = None if args.papers == "none" else load_paper_numbers(args.papers, matrix)
    out = Path(args.out or f"runs/reproduce/{profile.name}").resolve()
    results_dir = Path(args.results).resolve() / profile.name
    selection = parse_selection(args.only, matrix)

    def say(text: str) -> None:
        print(text, flush=True)

    with OutDirLock(out):
        runs = plan_runs(matrix, profile, out, selection, seeds=args.seeds)
        selected = [r for r in runs if r.selected]
        finished = sum(1 for r in selected if read_finished(out / "runs", r) is not None)
        say(f"reproduce: profile {profile.name}: {len(runs)} runs in {matrix.path.name}, {len(selected)} selected, "
            f"{finished} of them finished earlier; {jobs} job(s) x {threads} thread(s); runs in {out}")
        if args.dry_run:
            for r in runs:
                keys = " -> ".join(s.folder_name if s.key else f"({s.error})" for s in r.stages) or f"({r.error})"
                say(f"  {'*' if r.selected else ' '} {r.label}: {keys}")
            return 0
        executor = Executor(out, jobs=jobs, threads=threads, print_fn=say)
        install_signal_handlers(executor)
        try:
            results = executor.execute(runs if not args.table_only else [_unselect(r) for r in runs],
                                       max_runs=args.max_runs)
        except KeyboardInterrupt:
            say("reproduce: interrupted; finished runs are kept, the others resume on the next call")
            return 130
        from kdseg.reproduce.tables import write_tables

        paths = write_tables(results_dir, matrix, profile, results, papers)
        say(f"reproduce: wrote {paths['md']}, {paths['csv'].name}, {paths['tex'].name}")
        if not args.no_figures:
            from kdseg.reproduce.figures import write_figures

            figures = write_figures(results_dir / "figures", matrix, results, out / "figures",
                                    warn=lambda text: say(f"reproduce: warning: {text}"))
            if figures:
                say(f"reproduce: wrote {len(figures)} figures to {results_dir / 'figures'}")
    if args.table_only:
        return 0
    mine = [r for r in results if r.plan.selected]
    failed = [r for r in mine if r.status == "failed"]
    counts = {s: sum(1 for r in mine if r.status == s) for s in ("finished", "skipped", "failed", "not_run")}
    say(f"reproduce: {len(mine)} selected runs: {counts['finished']} finished now, {counts['skipped']} skipped "
        f"(finished earlier), {counts['failed']} FAILED, {counts['not_run']} not run; "
        f"{time.monotonic() - start:.0f}s")
    for r in failed:
        say(f"reproduce: FAILED {r.plan.label}: {(r.failure or {}).get('message')} "
            f"(log {(r.failure or {}).get('stderr')})")
    return 1 if failed else 0


def _unselect(plan: "RunPlan") -> "RunPlan":
    """``--table-only``: the plan is read from disk, never executed."""
    plan.selected = False
    return plan


def main() -> None:
    raise SystemExit(run())
