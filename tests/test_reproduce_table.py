"""``make reproduce-table`` (``python -m kdseg.reproduce``) on the smoke profile: tables and figures
with real numbers, kill-and-resume, a failing entry, and the config key that names run folders.

The end-to-end tests (``slow``: minutes) share one sequence (module fixture), because every ``kdseg`` subprocess
costs seconds of imports: run A is killed (SIGKILL to its process group, like a crash or a closed
terminal) once the first run has finished *and* ACTION's first stage has written a checkpoint
mid-fit; run B then finishes the rest. The selection is a subset of the real matrix plus one
entry with a bad override (``crop_size`` larger than the images), which must fail alone.
The whole smoke matrix runs behind the ``slow`` marker too. Fast tests cover the same logic with a
stand-in for the ``kdseg`` subprocesses (skip, resume, hand-on), one real run through submitit's
LocalExecutor, and the bad-input lines.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from kdseg.reproduce.plan import config_key, normalized_config, resolve_config
from kdseg.reproduce.spec import SpecError, load_matrix, load_paper_numbers, load_profile, profile_path

MATRIX = REPO / "experiments" / "reproduce" / "matrix.yaml"
PAPERS = REPO / "experiments" / "reproduce" / "paper_numbers.yaml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
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
        proc = subprocess.Popen(reproduce_cmd(out, results, *extra, jobs=1), cwd=REPO, env=ENV, stdout=log,
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
    b = subprocess.run(reproduce_cmd(out, results, *extra), cwd=REPO, env=ENV, capture_output=True, text=True,
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


# --------------------------------------------------------------------------- the config key


def _stack_args(run: str, *extra: str) -> list[str]:
    from kdseg.cli import stack_layers

    return [*(f"--config={layer}" for layer in stack_layers(run)), *extra]


def _phantom_args(*extra: str) -> list[str]:
    return _stack_args("phantom/supervised", *extra)


def test_config_key_follows_what_changes_results(tmp_path: Path) -> None:
    base = resolve_config(_phantom_args())
    assert config_key(base) == config_key(resolve_config(_phantom_args()))
    assert config_key(base) != config_key(resolve_config(_phantom_args("--model.init_args.lr=0.02")))
    assert config_key(base) != config_key(resolve_config(_phantom_args("--seed_everything=1")))
    # Where and how the run reports does not change the key.
    moved = resolve_config(_phantom_args(
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.name=elsewhere",
        "--trainer.enable_progress_bar=false", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ))
    assert config_key(base) == config_key(moved)
    assert "logger" not in normalized_config(moved)["trainer"]
    # Split files count by content, not path.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, patients in (("a", "p1\np2\n"), ("b", "p1\np2\n")):
        (tmp_path / folder / "train.txt").write_text(patients)
    key_a = config_key(resolve_config(_stack_args("acdc/pce", f"--data.init_args.train_split={tmp_path / 'a/train.txt'}")))
    key_b = config_key(resolve_config(_stack_args("acdc/pce", f"--data.init_args.train_split={tmp_path / 'b/train.txt'}")))
    assert key_a == key_b
    (tmp_path / "b" / "train.txt").write_text("p1\np3\n")
    key_c = config_key(resolve_config(_stack_args("acdc/pce", f"--data.init_args.train_split={tmp_path / 'b/train.txt'}")))
    assert key_c != key_a


# --------------------------------------------------------------------------- the declared files


def test_shipped_matrix_profiles_and_papers_file_load() -> None:
    matrix = load_matrix(MATRIX)
    assert {"acdc_scribble", "acdc_semi_3", "acdc_semi_7", "cervical"} <= set(matrix.settings)
    assert {"pce", "pce_em", "dmpls", "scribsd_plus"} <= set(matrix.settings["acdc_scribble"].methods)
    action = matrix.settings["acdc_semi_7"].methods["action"]
    assert [s.name for s in action.stages] == ["action_stage1", "action_stage2", "action_stage3"]
    assert matrix.settings["acdc_semi_3"].methods["action"] == action  # ${settings.acdc_semi_3.methods}
    assert [s.hand_on for s in action.stages[:2]] == ["last", "best"]
    for name in ("smoke", "cpu", "paper"):
        profile = load_profile(profile_path(name, REPO / "experiments/reproduce/profiles"), matrix)
        assert profile.data.keys() == {"acdc", "isbi2014"}
        if name == "paper":
            assert profile.slurm["gpus_per_node"] == 1 and profile.slurm["slurm_partition"]
    papers = load_paper_numbers(PAPERS, matrix)
    assert papers.sources and papers.not_recorded


def test_bad_files_fail_with_the_file_and_entry_named(tmp_path: Path) -> None:
    def write(name: str, content: object) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(content))
        return path

    good_stage = {"stack": "acdc/pce"}
    bad = write("m1.yaml", {"settings": {"s": {"task": "semantic", "data": "acdc", "methods": {
        "m": {"stages": [good_stage, {"config": "experiments/acdc/nope.yaml"}]}}}}})
    with pytest.raises(SpecError, match=r"m1.yaml: settings.s.methods.m.stages\[1\].config: experiments/acdc/nope.yaml does not exist"):
        load_matrix(bad)
    bad = write("m2.yaml", {"settings": {"s": {"task": "semantic", "data": "acdc", "methods": {
        "m": {"stages": [{**good_stage, "overrides": ["lr=0.1"]}]}}}}})
    with pytest.raises(SpecError, match=r"m2.yaml: settings.s.methods.m.stages\[0\].overrides: 'lr=0.1' is not"):
        load_matrix(bad)
    matrix = load_matrix(write("m3.yaml", {"settings": {"s": {"task": "semantic", "data": "acdc", "methods": {
        "m": {"stages": [good_stage]}}}}}))
    profile = {"description": "d", "device": "cpu", "data": {"acdc": {"root": "x"}}}
    with pytest.raises(SpecError, match=r"p1.yaml: overrides\[0\]: Interpolation key 'vars.steps' not found"):
        load_profile(write("p1.yaml", {**profile, "overrides": ["--trainer.max_steps=${vars.steps}"]}), matrix)
    p0 = write("p0.yaml", {**profile, "vars": {"steps": 3}, "overrides": ["--trainer.max_steps=${vars.steps}"]})
    assert load_profile(p0, matrix).overrides == ("--trainer.max_steps=3",)
    assert load_profile(p0, matrix, {"steps": "400"}).overrides == ("--trainer.max_steps=400",)  # --set
    with pytest.raises(SpecError, match=r"p2.yaml: settings.other: no such setting"):
        load_profile(write("p2.yaml", {**profile, "settings": {"other": {}}}), matrix)
    with pytest.raises(SpecError, match=r"p3.yaml: step: unknown key \(allowed: description, device"):
        load_profile(write("p3.yaml", {**profile, "step": 3}), matrix)
    with pytest.raises(SpecError, match=r"n1.yaml: reported.s\[0\].metrics: unknown or no metric ids \['dice'\]"):
        load_paper_numbers(write("n1.yaml", {"sources": {"x": {"citation": "c"}}, "reported": {"s": [
            {"method": "m", "source": "x", "where": "Table 1", "metrics": {"dice": 0.9}}]}}), matrix)


def test_missing_real_data_is_a_clear_error(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({
        "description": "d", "device": "cpu",
        "data": {"acdc": {"root": str(tmp_path / "nowhere")}, "isbi2014": {"phantom": True}},
    }))
    run = subprocess.run(
        [sys.executable, "-m", "kdseg.reproduce", "--profile", str(profile), "--out", str(tmp_path / "o"),
         "--results", str(tmp_path / "r"), "--threads", "1", "--only", "acdc_scribble", "--dry-run"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith("kdseg: error: ")
    assert f"data.acdc.root {tmp_path / 'nowhere'} holds no ACDC data" in run.stderr
    assert "PROFILE=smoke" in run.stderr


@pytest.mark.slow
def test_whole_smoke_matrix(tmp_path: Path) -> None:
    """``make reproduce-table PROFILE=smoke``: every entry of the shipped matrix, then a second call
    that finds everything finished."""
    cmd = reproduce_cmd(tmp_path / "out", tmp_path / "results")
    first = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout + first.stderr
    table = _table(tmp_path / "results" / "smoke")
    matrix = load_matrix(MATRIX)
    for setting in matrix.settings.values():
        for method in setting.methods:
            assert table[(setting.name, method)]["status"] == "ok", (setting.name, method)
        for kind in ("qualitative", "val_dice_curves"):
            assert (tmp_path / "results" / "smoke" / "figures" / f"{kind}_{setting.name}.png").is_file()
    second = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "started" not in second.stdout, second.stdout


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


# --------------------------------------------------------------------------- the ACDC protocol and paired column


def _fake_finished_run(setting, method: str, seed: int, folder: Path, dice_by_case: dict[str, float]):
    """A finished run whose test_cases.csv gives each case the same Dice for RV, Myo and LV."""
    from kdseg.reproduce.execute import RunResult
    from kdseg.reproduce.plan import RunPlan

    folder.mkdir(parents=True)
    lines = ["case_id,dice_RV,hd95_RV,asd_RV,status_RV,dice_Myo,hd95_Myo,asd_Myo,status_Myo,dice_LV,hd95_LV,asd_LV,status_LV"]
    lines += [f"{case},{d},1,1,ok,{d},1,1,ok,{d},1,1,ok" for case, d in dice_by_case.items()]
    (folder / "test_cases.csv").write_text("\n".join(lines) + "\n")
    mean = sum(dice_by_case.values()) / len(dice_by_case)
    plan = RunPlan(setting, setting.methods[method], seed, None, [], True)
    return RunResult(plan, "finished", folder=folder, metrics={"dice_mean": mean})


def test_acdc_table_has_the_paired_difference_to_the_label_only_baseline(tmp_path: Path) -> None:
    from kdseg.results.tables import csv_rows, latex, markdown

    matrix = load_matrix(MATRIX)
    profile = load_profile(profile_path("smoke", REPO / "experiments/reproduce/profiles"), matrix)
    semi, scribble = matrix.settings["acdc_semi_3"], matrix.settings["acdc_scribble"]
    cases = ("p1_frame01", "p1_frame12")
    results = [
        # Mean Teacher beats Supervised by exactly 0.1 on every (seed, volume): mean and interval +0.100.
        _fake_finished_run(semi, "supervised", 0, tmp_path / "s0", dict(zip(cases, (0.5, 0.6)))),
        _fake_finished_run(semi, "supervised", 1, tmp_path / "s1", dict(zip(cases, (0.4, 0.7)))),
        _fake_finished_run(semi, "mean_teacher", 0, tmp_path / "m0", dict(zip(cases, (0.6, 0.7)))),
        _fake_finished_run(semi, "mean_teacher", 1, tmp_path / "m1", dict(zip(cases, (0.5, 0.8)))),
        # ACTION, seed 0 only: differences +0.2 and 0.0, paired with Supervised's seed 0.
        _fake_finished_run(semi, "action", 0, tmp_path / "a0", dict(zip(cases, (0.7, 0.6)))),
        # Scribble setting: pce is the baseline; dmpls was tested on another volume (cannot pair).
        _fake_finished_run(scribble, "pce", 0, tmp_path / "c0", dict(zip(cases, (0.5, 0.5)))),
        _fake_finished_run(scribble, "dmpls", 0, tmp_path / "d0", {"p9_frame01": 0.5}),
    ]
    md = markdown(matrix, profile, results, None)
    semi_md = md.split("## acdc_semi_3", 1)[1].split("## ", 1)[0]
    assert "| Δ mean Dice vs supervised [95% CI] |" in semi_md
    rows = {line.split(" | ")[0].lstrip("| "): line for line in semi_md.splitlines() if line.startswith("| ")}
    assert rows["Supervised (labeled patients only)"].endswith("| baseline |")
    assert rows["Mean Teacher"].endswith("| +0.100 [+0.100, +0.100] |")
    action_cell = rows["ACTION"].rsplit(" | ", 1)[1]
    assert action_cell.startswith("+0.100 [")  # (0.2 + 0.0) / 2; the bootstrap of two pairs spans them
    low, high = (float(x) for x in action_cell.split("[")[1].rstrip("] |").split(", "))
    assert 0.0 <= low < 0.1 < high <= 0.2
    assert "(seed, case) pairs" in semi_md and "mean Dice (RV, Myo, LV) of each test volume" in semi_md
    # Between the other methods, in the caption: ACTION - Mean Teacher on seed 0 is +0.1 and -0.1.
    assert "Paired differences between the other methods (A - B, mean Dice per case" in semi_md
    assert "ACTION - Mean Teacher +0.000 [" in semi_md and "(2 pairs)" in semi_md
    scribble_md = md.split("## acdc_scribble", 1)[1].split("## ", 1)[0]
    assert "Paired differences between" not in scribble_md  # DMPLS alone besides pCE: no pair
    scribble_md = md.split("## acdc_scribble", 1)[1].split("## ", 1)[0]
    assert "| Δ mean Dice vs pce [95% CI] |" in scribble_md
    assert "No interval for dmpls: run pair 0: the runs were tested on different cases" in scribble_md
    assert "| Δ AJI vs supervised [95% CI] |" in md.split("## cervical", 1)[1]  # no run there: "–" cells
    header, lines = csv_rows(matrix, results, None)
    by_method = {(r["setting"], r["method"]): r for r in lines}
    mt = by_method[("acdc_semi_3", "mean_teacher")]
    assert mt["paired_baseline"] == "supervised" and mt["paired_metric"] == "dice_mean"
    assert float(mt["paired_diff"]) == pytest.approx(0.1)
    assert mt["paired_pairs"] == 4 and float(mt["paired_low"]) == pytest.approx(0.1)
    assert r"$\Delta$ mean Dice vs supervised [95\% CI]" in latex(matrix, profile, results, None)
    # The README's summary (kdseg.results.readme), made from these csv rows, shows table.md's cells.
    from kdseg.results.readme import summary

    assert {r["setting"]: r["task"] for r in lines} == {"acdc_scribble": "semantic", "acdc_semi_3": "semantic",
                                                         "acdc_semi_7": "semantic", "cervical": "instance"}
    progress, *readme = summary([{k: str(v) for k, v in r.items()} for r in lines]).split("\n\n")
    assert progress == "Runs finished: 7 of 7 planned."  # the plans of these fake runs only
    assert "| acdc_semi_3 | Mean Teacher | 2 | 0.650 ± 0.000 | – | +0.100 [+0.100, +0.100] |" in readme[0]
    assert f"| acdc_semi_3 | ACTION | 1 | 0.650 | – | {action_cell.rstrip(' |')} |" in readme[0]
    assert "| cervical | MMT-PSM | 0 | – | – | – | – |" in readme[1] and "cervical" not in readme[0]


def test_table_md_sums_the_recorded_run_times(tmp_path: Path) -> None:
    from kdseg.results.tables import markdown

    matrix = load_matrix(MATRIX)
    profile = load_profile(profile_path("smoke", REPO / "experiments/reproduce/profiles"), matrix)
    semi, scribble = matrix.settings["acdc_semi_3"], matrix.settings["acdc_scribble"]
    results = [_fake_finished_run(semi, "supervised", 0, tmp_path / "s0", {"p1_frame01": 0.5}),
               _fake_finished_run(semi, "mean_teacher", 0, tmp_path / "m0", {"p1_frame01": 0.6}),
               _fake_finished_run(scribble, "pce", 0, tmp_path / "c0", {"p1_frame01": 0.5})]
    for result, seconds in zip(results, (1800, 5400, 900)):
        result.result = {"test_seconds": seconds}  # these fake plans have no fit stage: test time only
    assert "## Compute" not in markdown(matrix, profile, results[:0], None)
    compute = markdown(matrix, profile, results, None).split("## Compute", 1)[1]
    assert "- acdc_scribble: 1 run, 0.2 run-hours (900 s)" in compute
    assert "- acdc_semi_3: 2 runs, 2.0 run-hours (1,800-5,400 s a run)" in compute
    assert "- total: 3 runs, 2.2 run-hours" in compute and "acdc_semi_7" not in compute


def test_instance_table_has_the_paired_aji_difference(tmp_path: Path) -> None:
    from kdseg.reproduce.execute import RunResult
    from kdseg.reproduce.plan import RunPlan
    from kdseg.results.tables import csv_rows, markdown

    matrix = load_matrix(MATRIX)
    profile = load_profile(profile_path("smoke", REPO / "experiments/reproduce/profiles"), matrix)
    cervical = matrix.settings["cervical"]

    def run(method: str, seed: int, aji: dict[str, tuple[float, float]]) -> RunResult:
        """A finished run whose images have these (cytoplasm, nucleus) AJIs."""
        folder = tmp_path / f"{method}{seed}"
        folder.mkdir()
        lines = ["image_id,class,num_gt,num_pred,aji,aji_gated,tp,fp,fn,f1,dice"]
        lines += [f"{image},{name},1,1,{value},{value},1,0,0,1,0.9"
                  for image, pair in aji.items() for name, value in zip(("cytoplasm", "nucleus"), pair)]
        (folder / "test_cases.csv").write_text("\n".join(lines) + "\n")
        plan = RunPlan(cervical, cervical.methods[method], seed, None, [], True)
        return RunResult(plan, "finished", folder=folder, metrics={"aji_mean": 0.5})

    # MMT-PSM minus supervised per image: (0.7+0.5)/2 - (0.6+0.4)/2 = +0.1 on both images and seeds.
    results = [run(m, seed, {"a": (0.6 + d, 0.4 + d), "b": (0.5 + d, 0.3 + d)})
               for seed in (0, 1) for m, d in (("supervised", 0.0), ("mmt_psm", 0.1))]
    section = markdown(matrix, profile, results, None).split("## cervical", 1)[1]
    assert "| Δ AJI vs supervised [95% CI] |" in section
    assert "| MMT-PSM |" in section and "| +0.100 [+0.100, +0.100] |" in section
    assert "AJI (mean over cytoplasm and nucleus) of each test image" in section
    lines = {r["method"]: r for r in csv_rows(matrix, results, None)[1] if r["setting"] == "cervical"}
    assert lines["mmt_psm"]["paired_metric"] == "aji_mean" and lines["mmt_psm"]["paired_pairs"] == 4
    assert float(lines["mmt_psm"]["paired_diff"]) == pytest.approx(0.1)


def test_runner_passes_the_holdout_and_captions_the_protocol(tmp_path: Path) -> None:
    from kdseg.reproduce.data import prepare_data

    spec = {"phantom": {"train_patients": 6, "test_patients": 2}, "val_patients": 2}
    prepared = prepare_data("acdc", spec, tmp_path, "p.yaml")
    root = next((tmp_path / "data").glob("acdc_phantom-*"))
    assert prepared.overrides == (f"--data.init_args.root={root}", "--data.init_args.fallback_val_patients=2")
    assert not (tmp_path / "splits").exists()  # the runner writes no split files of its own
    assert prepared.protocol == "train-holdout" and len(prepared.splits["val"]) == 2
    assert "train 4 patients (train.txt without its last 2)" in prepared.description
    assert "validation for checkpoint selection 2 patients (the last 2 of train.txt)" in prepared.description
    assert "test 2 patients (val.txt, no test split)" in prepared.description
    (root / "splits" / "test.txt").write_text((root / "splits" / "val.txt").read_text())
    (root / "splits" / "val.txt").write_text("phantom004\n")
    (root / "splits" / "train.txt").write_text("".join(f"phantom{i:03d}\n" for i in range(4)))
    ssl4mis = prepare_data("acdc", spec, tmp_path, "p.yaml")
    assert ssl4mis.protocol == "ssl4mis" and "ACDC protocol ssl4mis" in ssl4mis.description
    assert "validation for checkpoint selection 1 patients (val.txt), test 2 patients (test.txt)" in ssl4mis.description


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


# --------------------------------------------------------------------------- skip, resume, launchers


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


def test_bad_input_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdseg.reproduce.main import run

    profile = tmp_path / "p.yaml"
    profile.write_text("description: d\ndevice: cpu\ndata: {acdc: {phantom: {}}}\noverrides: ['--x=${vars.nope}']\n")
    for argv, expected in (
        (["--profile", str(profile)], f"kdseg: error: {profile}: overrides[0]: Interpolation key 'vars.nope' not found"),
        (["--profile", str(tmp_path / "none.yaml")], f"kdseg: error: {tmp_path / 'none.yaml'}: the profile file does not exist"),
        (["--profile", "smoke", "--only", "acdc_scribble/nothing"], "kdseg: error: --only acdc_scribble/nothing: matches no entry"),
        (["--profile", "smoke", "--set", "steps"], "kdseg: error: --set steps: expected NAME=VALUE"),
    ):
        assert run([*argv, "--out", str(tmp_path / "o"), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(expected), err


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
