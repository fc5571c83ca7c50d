"""The reproduction's launchers: finished runs skipped and interrupted fits resumed (a stand-in
for the ``kdseg`` subprocesses), submitit's local and Slurm executors, one runner per ``--out``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import MATRIX, REPO

from kdseg.reproduce.spec import load_matrix, load_profile, profile_path


@pytest.fixture(scope="module")
def smoke_plans(tmp_path_factory: pytest.TempPathFactory):
    """The smoke profile's plans of pce (one stage) and ACTION (three), keys and all."""
    from kdseg.reproduce.plan import parse_selection, plan_runs

    out = tmp_path_factory.mktemp("plans")
    matrix = load_matrix(MATRIX)
    profile = load_profile(profile_path("smoke", REPO / "experiments/reproduce/profiles"), matrix)
    runs = plan_runs(matrix, profile, out, parse_selection(["acdc_scribble/pce", "acdc_semi_3/action"], matrix))
    return [r for r in runs if r.selected]


class FakeKdseg:
    """Stands in for the ``kdseg`` subprocesses: writes what a fit / test leaves behind (a fit of
    4 steps, its best checkpoint at its last step) and records the calls; the fits numbered in
    ``stop`` are stopped as by SIGTERM (last.ckpt at step 2, exit 143)."""

    def __init__(self, stop: tuple[int, ...] = ()) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.stop, self.fits = stop, 0

    def __call__(self, subcommand: str, args: list[str], folder: Path, threads: int) -> tuple[int, Path, Path]:
        import torch

        self.calls.append((subcommand, args))
        name = next(a.split("=", 1)[1] for a in args if a.startswith("--trainer.logger.init_args.name="))
        version = folder / name / f"version_{len(list((folder / name).glob('version_*')))}"
        (version / "checkpoints").mkdir(parents=True)
        if subcommand == "test":
            (version / "test_metrics.json").write_text(json.dumps(
                {"per_class": {"RV": {"dice_mean": 0.5}}, "mean": {"dice": 0.5}}))
            return 0, folder / "test.log", folder / "test.err"
        self.fits += 1
        step = 2 if self.fits in self.stop else 4
        (version / "config.yaml").write_text("trainer:\n  max_steps: 4\n")
        state = {"global_step": step, "callbacks": {"ModelCheckpoint{}": {"current_score": 0.1 * step}}}
        torch.save(state, version / "checkpoints" / "last.ckpt")
        torch.save(state, version / "checkpoints" / f"best-{step}.ckpt")
        return (143 if step == 2 else 0), folder / "fit.log", folder / "fit.err"


def test_finished_runs_are_skipped_and_interrupted_fits_resume(smoke_plans, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from kdseg.reproduce import execute
    from kdseg.reproduce.launch import launch

    pce, action = smoke_plans
    lines: list[str] = []
    fake = FakeKdseg(stop=(3,))  # fits: pce, ACTION stage 1, stage 2 (stopped mid-fit), ...
    monkeypatch.setattr(execute, "_call", fake)
    assert [r.status for r in launch([pce], tmp_path, say=lines.append)] == ["finished"]
    assert [c[0] for c in fake.calls] == ["fit", "test"]
    assert launch([pce], tmp_path, say=lines.append)[0].status == "skipped" and len(fake.calls) == 2
    assert any("pce seed 0 skipped (finished)" in line for line in lines)

    fake.calls.clear()
    (result,) = launch([action], tmp_path, say=lines.append)
    assert result.status == "not_run"  # interrupted, not FAILED
    assert any("interrupted after" in line and "(fit exited 143)" in line for line in lines)
    stage1, stage2, stage3 = (tmp_path / "runs" / s.folder_name for s in action.stages)
    last1 = json.loads((stage1 / "fit.done.json").read_text())["last"]
    assert f"--model.init_args.init_weights_from={last1}" in fake.calls[1][1]  # hand_on: last
    assert not (stage2 / "fit.done.json").exists()

    fake.calls.clear()
    (result,) = launch([action], tmp_path, say=lines.append)
    assert result.status == "finished"
    assert any("stage 1/3 (action_stage1): skipped (finished)" in line for line in lines)
    assert f"--ckpt_path={stage2 / 'fit/version_0/checkpoints/last.ckpt'}" in fake.calls[0][1]  # resumed
    best2 = json.loads((stage2 / "fit.done.json").read_text())["best"]
    assert best2.endswith("version_1/checkpoints/best-4.ckpt")  # the best over both version folders
    assert f"--model.init_args.init_weights_from={best2}" in fake.calls[1][1]  # hand_on: best
    assert [c[0] for c in fake.calls] == ["fit", "fit", "test"] and (stage3 / "test_metrics.json").is_file()


def test_a_run_whose_folder_is_gone_comes_back_from_its_record(smoke_plans, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The run folders lost (another machine): the record in the results folder restores the run,
    its metrics, run time and curve, and it is not rerun; under another key it is."""
    import dataclasses
    import shutil

    from kdseg.reproduce import execute
    from kdseg.reproduce.launch import launch
    from kdseg.reproduce.records import read_record, write_record
    from kdseg.results.curves import record_curves, run_curve
    from kdseg.results.tables import _recorded_seconds

    pce = smoke_plans[0]
    fake = FakeKdseg()
    monkeypatch.setattr(execute, "_call", fake)
    (done,) = launch([pce], tmp_path / "out")
    # validation rows as Lightning's CSVLogger writes them (step = global_step - 1), a train row between
    (done.folder / "fit/version_0/metrics.csv").write_text("step,train/loss,val/dice_mean\n1,,0.2\n2,0.9,\n3,,0.4\n")
    results = tmp_path / "results"
    write_record(results, done, 123.4, record_curves(done))
    shutil.rmtree(tmp_path / "out")
    fake.calls.clear()

    lines: list[str] = []
    (restored,) = launch([pce], tmp_path / "out", say=lines.append, recorded=lambda p: read_record(results, p))
    assert restored.status == "restored" and restored.has_metrics and fake.calls == []
    assert restored.metrics == done.metrics and restored.result["checkpoint"] == done.result["checkpoint"]
    assert _recorded_seconds(restored) == "123"
    assert run_curve(restored, "val/dice_mean") == {2: 0.2, 4: 0.4}
    assert any("skipped (finished, record in" in line for line in lines)
    write_record(results, restored, None, {})  # a restored run's record is left as it is
    assert read_record(results, pce).run_seconds == 123.4

    from kdseg.results.figures import write_figures

    figures, warnings = tmp_path / "figures", []
    figures.mkdir()
    (figures / "qualitative_acdc_scribble.png").write_bytes(b"made from run folders earlier")
    written = write_figures(figures, load_matrix(MATRIX), [restored], tmp_path / "cache", warn=warnings.append)
    assert [p.name for p in written] == ["val_dice_curves_acdc_scribble.png"]  # the record has its curve
    assert (figures / "qualitative_acdc_scribble.png").read_bytes() == b"made from run folders earlier"
    assert warnings == ["figures: qualitative_acdc_scribble.png not redrawn (kept as it was): no run folder "
                        "with a checkpoint for pCE"]

    moved = dataclasses.replace(pce, stages=[dataclasses.replace(s, key="0" * 12) for s in pce.stages])
    assert read_record(results, moved) is None  # another config: no record, so it runs
    (rerun,) = launch([moved], tmp_path / "out", recorded=lambda p: read_record(results, p))
    assert rerun.status == "finished" and [c[0] for c in fake.calls] == ["fit", "test"]


def test_submitit_local_executor_runs_a_run_and_the_local_one_skips_it(smoke_plans, tmp_path: Path) -> None:
    """One real smoke run (pce) as a submitit job through its LocalExecutor (what ``--launcher
    slurm`` submits, run in a process here); the local launcher then finds it finished."""
    from kdseg.reproduce.launch import launch

    pce, lines = smoke_plans[0], []
    (result,) = launch([pce], tmp_path, "submitit-local", slurm={"cpus_per_task": 1}, say=lines.append)
    assert result.status == "finished", lines
    assert 0.0 <= result.metrics["dice_mean"] <= 1.0 and (result.folder / "fit.done.json").is_file()
    assert any("pce seed 0 submitted as submitit-local job" in line for line in lines)
    (result_file,) = (tmp_path / "submitit").glob("*/*_result.pkl")  # the job's own folder
    assert "pce seed 0 finished in" in "".join(p.read_text() for p in result_file.parent.glob("*_log.out"))
    (again,) = launch([pce], tmp_path, "local", say=lines.append)
    assert again.status == "skipped" and again.metrics == result.metrics


def test_a_second_runner_on_one_out_is_refused(tmp_path: Path) -> None:
    from kdseg.reproduce.launch import OutDirLock

    with OutDirLock(tmp_path):
        with pytest.raises(RuntimeError, match=r"another reproduce runner \(pid \d+\) is using"):
            OutDirLock(tmp_path).__enter__()
        # --table-only runs nothing: it writes the table of what finished while the runner works
        from kdseg.reproduce.main import run

        assert run(["--profile", "smoke", "--only", "acdc_scribble/pce", "--table-only", "--no-figures",
                    "--out", str(tmp_path), "--results", str(tmp_path / "results")]) == 0
        assert "| pCE | 0 (1 not run) |" in (tmp_path / "results" / "smoke" / "table.md").read_text()
        assert (tmp_path / ".reproduce.lock").read_text() == str(os.getpid())  # the runner's lock stays
    (tmp_path / ".reproduce.lock").write_text(str(2**22 + 1))  # above pid_max: a runner that is gone
    with OutDirLock(tmp_path):
        assert (tmp_path / ".reproduce.lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".reproduce.lock").exists()


def test_slurm_jobs_get_the_profile_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sbatch script submitit would submit for the paper profile, ``--slurm`` winning; without
    Slurm on the machine the launcher stops with submitit's reason."""
    from kdseg.reproduce.launch import SLURM_DEFAULTS, submitit_executor
    from kdseg.reproduce.main import _number, _pairs

    paper = load_profile(profile_path("paper", REPO / "experiments/reproduce/profiles"), load_matrix(MATRIX))
    params = {**SLURM_DEFAULTS, **paper.slurm, **{k: _number(v) for k, v in _pairs(["timeout_min=60"], "").items()}}
    with pytest.raises(RuntimeError, match="srun"):
        monkeypatch.setenv("PATH", str(tmp_path))
        submitit_executor(tmp_path, "slurm", params)
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    script = submitit_executor(tmp_path, "slurm", params)._executor._make_submission_file_text("CMD", "0")
    for line in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--time=60", "--mem=32GB"):
        assert f"#SBATCH {line}\n" in script, script
