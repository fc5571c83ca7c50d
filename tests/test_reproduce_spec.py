"""The reproduction's declared files: the config key that names run folders, the matrix,
profiles and papers files loading or failing with the file and entry named, and bad input as one
``kdseg: error:`` line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import MATRIX, PAPERS, REPO, REPRODUCE_ENV

from kdseg.reproduce.plan import config_key, normalized_config, resolve_config
from kdseg.reproduce.spec import SpecError, load_matrix, load_paper_numbers, load_profile, profile_path


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
        cwd=REPO, env=REPRODUCE_ENV, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith("kdseg: error: ")
    assert f"data.acdc.root {tmp_path / 'nowhere'} holds no ACDC data" in run.stderr
    assert "PROFILE=smoke" in run.stderr


@pytest.mark.slow


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
