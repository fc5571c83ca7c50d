"""``make reproduce-table`` (``python -m kdseg.reproduce``) end to end on the smoke profile: tables and
figures with real numbers, kill-and-resume, a failing entry; and what marks a fit interrupted, not finished.

The end-to-end tests (``slow``: minutes) share one sequence (module fixture), because every ``kdseg`` subprocess
costs seconds of imports: run A is killed (SIGKILL to its process group, like a crash or a closed
terminal) once the first run has finished *and* ACTION's first stage has written a checkpoint
mid-fit; run B then finishes the rest. The selection is a subset of the real matrix plus one
entry with a bad override (``crop_size`` larger than the images), which must fail alone.
The whole smoke matrix runs behind the ``slow`` marker too. The fast tests of the same logic are in
``test_reproduce_launch.py`` (skip, resume and hand-on with a stand-in for the ``kdseg`` subprocesses,
submitit), ``test_reproduce_spec.py`` (the config key, the declared files, bad input) and
``test_reproduce_report.py`` (the tables).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import MATRIX, PAPERS, REPO, REPRODUCE_ENV

from kdseg.reproduce.spec import load_matrix


#: ACTION's stage 1 long enough, and validated often enough, to be caught with a checkpoint mid-fit.
SLOW_STAGE1 = ["--set", "action_stage1_steps=16", "action_stage1_val_every=2"]
ONLY = ["acdc_scribble/pce", "acdc_semi_3/action", "cervical/supervised", "cervical/broken"]


def reproduce_cmd(out: Path, results: Path, *extra: str, jobs: int = 2) -> list[str]:
    """The command ``make reproduce-table PROFILE=smoke JOBS=<jobs>`` runs, into tmp folders."""
    return [sys.executable, "-m", "kdseg.reproduce", "--profile", "smoke", "--jobs", str(jobs), "--threads", "1",
            "--out", str(out), "--results", str(results), *extra]




def test_makefile_target_runs_the_module_this_way() -> None:
    text = (REPO / "Makefile").read_text()
    assert "reproduce-table: $(STAMP)" in text
    assert "$(PY) -m kdseg.reproduce --profile $(PROFILE) --jobs $(JOBS) --launcher $(LAUNCHER)" in text
    assert "PROFILE ?= cpu" in text and "LAUNCHER ?= local" in text
    assert "--only acdc_semi_$(LABELED)/action" in text  # make action-chain: the matrix's ACTION entry


@dataclass
class Sequence:
    out: Path
    results: Path
    log_a: str
    log_b: str
    rc_b: int
    finished_snapshot: dict[Path, int]
    finished_folder: Path
    stage1_folder: Path
    stage1_snapshot: dict[Path, int]


def _snapshot(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sequence(tmp_path_factory: pytest.TempPathFactory) -> Sequence:
    root = tmp_path_factory.mktemp("reproduce")
    out, results = root / "out", root / "results"
    matrix = yaml.safe_load(MATRIX.read_text())
    matrix["settings"]["cervical"]["methods"]["broken"] = {
        "label": "Mask R-CNN (bad override)",
        "stages": [{"stack": "isbi2014/supervised",
                    "overrides": ["--data.init_args.crop_size=100"]}],
    }
    # (Profile overrides come after the matrix's: the bad value is one the smoke profile leaves alone.)
    matrix_file = root / "matrix.yaml"
    matrix_file.write_text(yaml.safe_dump(matrix, sort_keys=False))
    papers = yaml.safe_load(PAPERS.read_text())
    papers["sources"]["fixture"] = {"citation": "test fixture, not a paper", "short": "Fixture 2000"}
    papers["reported"] = {"acdc_scribble": [
        {"method": "pce", "label": "pCE", "source": "fixture", "where": "Table 9", "metrics": {"dice_mean": 0.5}}
    ]}
    papers_file = root / "papers.yaml"
    papers_file.write_text(yaml.safe_dump(papers, sort_keys=False))
    extra = ["--matrix", str(matrix_file), "--papers", str(papers_file), *SLOW_STAGE1, "--only", *ONLY]

    # Run A: killed once pce finished and ACTION stage 1 is mid-fit with a last.ckpt.
    log_a_file = root / "a.log"
    with log_a_file.open("w") as log:
        proc = subprocess.Popen(reproduce_cmd(out, results, *extra, jobs=1), cwd=REPO, env=REPRODUCE_ENV, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                finished = list((out / "runs").glob("pce-*/test_metrics.json"))
                caught = list((out / "runs").glob("action_stage1-*/fit/version_0/checkpoints/last.ckpt"))
                if finished and caught:
                    break
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):  # it may have ended by itself (then the assert says so)
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log_a = log_a_file.read_text()
    assert finished and caught, f"run A never reached the point to interrupt:\n{log_a}"
    finished_folder = finished[0].parent
    stage1_folder = caught[0].parents[3]
    finished_snapshot, stage1_snapshot = _snapshot(finished_folder), _snapshot(stage1_folder / "fit" / "version_0")

    # Run B: the rest.
    b = subprocess.run(reproduce_cmd(out, results, *extra), cwd=REPO, env=REPRODUCE_ENV, capture_output=True, text=True,
                       timeout=600)
    return Sequence(out, results / "smoke", log_a, b.stdout + b.stderr, b.returncode, finished_snapshot,
                    finished_folder, stage1_folder, stage1_snapshot)


def _table(results: Path) -> dict[tuple[str, str], dict[str, str]]:
    with (results / "table.csv").open() as f:
        return {(r["setting"], r["method"] if r["kind"] == "measured" else "reported:" + r["method"]): r
                for r in csv.DictReader(f)}


def _number(row: dict[str, str], metric: str) -> float:
    return float(row[f"{metric}_mean"])


@pytest.mark.slow
def test_smoke_table_and_figures_have_real_numbers(sequence: Sequence) -> None:
    results = sequence.results
    for name in ("table.md", "table.csv", "table.tex", "runs.csv"):
        assert (results / name).is_file(), name
    table = _table(results)
    for setting, method in (("acdc_scribble", "pce"), ("acdc_semi_3", "action")):
        row = table[(setting, method)]
        assert row["status"] == "ok" and row["seeds_finished"] == "1", row
        for metric in ("dice_RV", "dice_Myo", "dice_LV", "dice_mean"):
            value = _number(row, metric)
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (setting, method, metric, value)
        for metric in ("hd95_mean", "asd_mean"):
            assert math.isfinite(_number(row, metric)) and _number(row, metric) >= 0
        assert row["distance_unit"] == "pixel"  # phantom volumes in the HDF5 layout carry no spacing
    assert table[("acdc_semi_3", "action")]["iterations"] == "16+4+4"
    cervical = table[("cervical", "supervised")]
    assert cervical["status"] == "ok"
    for metric in ("aji_mean", "map_mean", "ap50_mean", "f1_mean", "dice_mean"):
        assert 0.0 <= _number(cervical, metric) <= 1.0, metric
    # Entries left out by --only are listed, not dropped; the papers' row is marked as reported.
    assert table[("acdc_scribble", "dmpls")]["status"] == "not run"
    reported = table[("acdc_scribble", "reported:pce")]
    assert reported["kind"] == "reported" and reported["where"] == "Table 9" and _number(reported, "dice_mean") == 0.5
    md = (results / "table.md").read_text()
    assert "| pCE (reported in Fixture 2000, Table 9) |" in md
    assert "Profile `smoke`" in md and "best checkpoint by val/dice_mean" in md and "val/aji_mean" in md
    assert "validation for checkpoint selection 2 patients" in md
    tex = (results / "table.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 4 and r"\caption{ACDC, scribble supervision." in tex
    # Per-run metrics copied beside the tables.
    assert json.loads((results / "runs/acdc_scribble/pce/seed0/test_metrics.json").read_text())["per_class"]

    from skimage import io

    for setting in ("acdc_scribble", "acdc_semi_3", "cervical"):
        for kind in ("qualitative", "val_dice_curves"):
            image = io.imread(results / "figures" / f"{kind}_{setting}.png")
            assert image.ndim == 3 and min(image.shape[:2]) > 100, (kind, setting)
    assert not (results / "figures" / "qualitative_acdc_semi_7.png").exists()  # nothing finished there


@pytest.mark.slow
def test_resume_after_kill_runs_only_what_remained(sequence: Sequence) -> None:
    log_a, log_b = sequence.log_a, sequence.log_b
    assert "acdc_scribble pce seed 0 finished" in log_a
    assert "acdc_scribble pce seed 0 skipped (finished)" in log_b
    assert "acdc_scribble pce seed 0 started" not in log_b
    # The finished run's folder is untouched; the interrupted fit resumed from its last.ckpt in a
    # new version folder, leaving the old one as it was.
    assert _snapshot(sequence.finished_folder) == sequence.finished_snapshot
    assert f"fit resumes from {sequence.stage1_folder}/fit/version_0/checkpoints/" in log_b
    assert (sequence.stage1_folder / "fit" / "version_1" / "config.yaml").is_file()
    assert _snapshot(sequence.stage1_folder / "fit" / "version_0") == sequence.stage1_snapshot
    done = json.loads((sequence.stage1_folder / "fit.done.json").read_text())
    assert Path(done["last"]).parent == sequence.stage1_folder / "fit" / "version_1" / "checkpoints"
    import torch

    assert torch.load(done["last"], map_location="cpu", weights_only=False)["global_step"] == 16
    assert "acdc_semi_3 action seed 0 finished" in log_b
    assert "cervical supervised seed 0 finished" in log_b


@pytest.mark.slow
def test_failing_run_is_reported_and_the_others_finish(sequence: Sequence) -> None:
    assert sequence.rc_b == 1, sequence.log_b
    assert "cervical broken seed 0 FAILED" in sequence.log_b
    md = (sequence.results / "table.md").read_text()
    broken_row = next(line for line in md.splitlines() if line.startswith("| Mask R-CNN (bad override) |"))
    assert "FAILED" in broken_row
    failures = md.split("## Failures", 1)[1]
    assert "cervical broken seed 0" in failures and "crop_size=100" in failures
    with (sequence.results / "runs.csv").open() as f:
        runs = {(r["setting"], r["method"]): r for r in csv.DictReader(f)}
    broken = runs[("cervical", "broken")]
    assert broken["status"] == "failed" and Path(broken["stderr_log"]).is_file()
    assert "crop_size=100" in Path(broken["stderr_log"]).read_text()
    for key in (("acdc_scribble", "pce"), ("acdc_semi_3", "action"), ("cervical", "supervised")):
        assert runs[key]["status"] in ("finished", "skipped"), key
        # a run skipped by this call still reports the time it took when it ran (all 3 stages)
        assert float(runs[key]["run_seconds"]) > 0, key
    assert broken["run_seconds"] == ""



def test_whole_smoke_matrix(tmp_path: Path) -> None:
    """``make reproduce-table PROFILE=smoke``: every entry of the shipped matrix, then a second call
    that finds everything finished."""
    cmd = reproduce_cmd(tmp_path / "out", tmp_path / "results")
    first = subprocess.run(cmd, cwd=REPO, env=REPRODUCE_ENV, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout + first.stderr
    table = _table(tmp_path / "results" / "smoke")
    matrix = load_matrix(MATRIX)
    for setting in matrix.settings.values():
        for method in setting.methods:
            assert table[(setting.name, method)]["status"] == "ok", (setting.name, method)
        for kind in ("qualitative", "val_dice_curves"):
            assert (tmp_path / "results" / "smoke" / "figures" / f"{kind}_{setting.name}.png").is_file()
    second = subprocess.run(cmd, cwd=REPO, env=REPRODUCE_ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "started" not in second.stdout, second.stdout

    # The run folders lost (another machine): every run comes back from its record, none reruns.
    results = tmp_path / "results" / "smoke"
    table_csv = (results / "table.csv").read_text()
    with (results / "runs.csv").open() as f:
        seconds = {(r["setting"], r["method"]): r["run_seconds"] for r in csv.DictReader(f)}
    shutil.rmtree(tmp_path / "out")
    third = subprocess.run(cmd, cwd=REPO, env=REPRODUCE_ENV, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "started" not in third.stdout, third.stdout
    assert f"{len(seconds)} restored from their records" in third.stdout
    assert (results / "table.csv").read_text() == table_csv
    with (results / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["status"] for r in rows} == {"restored"}
    # the record's folder, relative to the results folder: the same file in every clone
    assert all(r["folder"] == f"runs/{r['setting']}/{r['method']}/seed{r['seed']}" for r in rows), rows
    assert {(r["setting"], r["method"]): r["run_seconds"] for r in rows} == seconds
    assert "qualitative_acdc_scribble.png not redrawn (kept as it was)" in third.stdout


def test_a_fit_stopped_by_sigterm_is_not_finished(tmp_path: Path) -> None:
    """Lightning exits 0 after SIGTERM; the state in last.ckpt then holds fewer steps than
    max_steps, and the runner must resume that fit, not record it as done."""
    import torch

    from kdseg.reproduce.execute import unfinished_training

    config = tmp_path / "config.yaml"
    config.write_text("trainer:\n  max_steps: 10\n")
    last = tmp_path / "last.ckpt"
    done = {"last": str(last), "config": str(config)}
    torch.save({"global_step": 4}, last)
    assert unfinished_training(done) == "fit stopped at step 4 of 10 (interrupted)"
    torch.save({"global_step": 10}, last)
    assert unfinished_training(done) is None
    config.write_text("trainer:\n  max_steps: -1\n  max_epochs: 3\n")  # epoch-bounded: not judged by steps
    torch.save({"global_step": 4}, last)
    assert unfinished_training(done) is None


def test_moved_run_folder_finds_its_checkpoint(tmp_path: Path) -> None:
    from kdseg.results.figures import relocated_checkpoint

    folder = tmp_path / "cpu" / "runs" / "mmt_psm-0123456789ab"
    ckpt = folder / "fit" / "version_0" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    recorded = tmp_path / "cpu_long" / "runs" / "mmt_psm-0123456789ab" / "fit" / "version_0" / "checkpoints" / "best.ckpt"
    assert relocated_checkpoint(recorded, folder) == ckpt
    assert relocated_checkpoint(ckpt, folder) == ckpt  # still where it was recorded
    missing = recorded.with_name("other.ckpt")
    assert relocated_checkpoint(missing, folder) == missing  # nothing there either: the recorded path
    assert relocated_checkpoint(Path("/elsewhere/best.ckpt"), folder) == Path("/elsewhere/best.ckpt")


def test_fit_seconds_add_the_interrupted_attempts(tmp_path: Path) -> None:
    from kdseg.reproduce.execute import fit_seconds

    def touch(path: Path, when: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        os.utime(path, (when, when))

    folder, t0 = tmp_path / "pce-0123456789ab", 1_700_000_000.0
    assert fit_seconds(folder) is None  # not finished
    # attempt 1: killed after 300 s of writing files; attempt 2 (the finishing call) ran 100 s
    touch(folder / "fit" / "version_0" / "config.yaml", t0)
    touch(folder / "fit" / "version_0" / "metrics.csv", t0 + 300)
    touch(folder / "fit" / "version_1" / "config.yaml", t0 + 1000 + 10)
    touch(folder / "fit" / "version_1" / "checkpoints" / "last.ckpt", t0 + 1000 + 95)
    done = folder / "fit.done.json"
    done.write_text(json.dumps({"seconds": 100.0}))
    os.utime(done, (t0 + 1100, t0 + 1100))
    assert fit_seconds(folder) == pytest.approx(400.0)
    # a copy that did not keep modification times: only the finishing call is known
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, (t0 + 5000, t0 + 5000))
    assert fit_seconds(folder) == pytest.approx(100.0)



def test_a_fit_that_exits_143_is_interrupted_not_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """kdseg's CLI exits 143 / 130 after saving the step a signal stopped it at: the runner
    reports the run as interrupted (resumed next call), not FAILED, and writes no failure record."""
    import signal as signals

    from kdseg.reproduce import execute, main

    calls = []

    def stopped_fit(subcommand, args, folder, threads):  # type: ignore[no-untyped-def]
        calls.append(subcommand)
        logs = folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (logs / "fit-1.err").write_text("kdseg: SIGTERM at step 3: state saved\n")
        return 128 + signals.SIGTERM, logs / "fit-1.log", logs / "fit-1.err"

    monkeypatch.setattr(execute, "_call", stopped_fit)
    rc = main.run(["--profile", "smoke", "--only", "acdc_scribble/pce", "--out", str(tmp_path / "runs"),
                   "--results", str(tmp_path / "results")])
    log = capsys.readouterr().out
    assert calls == ["fit"]
    assert "pce seed 0 interrupted after" in log and "(fit exited 143)" in log, log
    assert "pce seed 0 FAILED" not in log and "0 FAILED, 1 not run" in log, log
    assert rc == 0
    assert not list((tmp_path / "runs").glob("**/last_failure.json"))
