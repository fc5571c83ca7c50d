"""Every semantic stack of experiments/stacks.yaml through the real CLI entry point, and the CLI's guarantees."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch
from conftest import REPO, STACKS, TINY_NETWORK, run_cli, stack

PHANTOM_TINY_DATA = [
    "--data.init_args.num_train_patients=4",
    "--data.init_args.num_val_patients=1",
    "--data.init_args.num_test_patients=1",
    "--data.init_args.num_slices=3",
    "--data.init_args.phantom_size=40",
]


def segmentation_runs(dataset: str) -> list[str]:
    return sorted(run for run in STACKS if run.split("/")[0] == dataset)


def tiny_overrides(run: str, acdc_root: Path) -> list[str]:
    """Tiny data: the phantom for phantom stacks, phantom-in-ACDC-layout for ACDC stacks."""
    if run.startswith("acdc/"):
        data = [f"--data.init_args.root={acdc_root}"]
        # Semi-supervised stacks need unlabeled patients: 2 of the 6 train patients labeled.
        if "experiments/data/acdc_semi.yaml" in STACKS[run]:
            data.append("--data.init_args.labeled_patients=2")
        if "experiments/budgets/cpu_plain_unet.yaml" in STACKS[run]:  # that encoder has exactly 5 blocks
            return data + TINY_NETWORK + ["--model.init_args.network.encoder_depth=5",
                                          "--model.init_args.network.decoder_channels=[32,16,8,8,8]"]
        return data + TINY_NETWORK
    return PHANTOM_TINY_DATA + TINY_NETWORK


@pytest.mark.parametrize("run", segmentation_runs("phantom") + segmentation_runs("acdc"))
def test_every_stack_fast_dev_run(run: str, acdc_like_root: Path, in_tmp_cwd: Path) -> None:
    cli = run_cli(["fit", *stack(run), "--trainer.fast_dev_run=true", *tiny_overrides(run, acdc_like_root)])
    assert cli.trainer.state.finished
    assert "val/dice_mean" in cli.trainer.callback_metrics
    assert 0.0 <= float(cli.trainer.callback_metrics["val/dice_mean"]) <= 1.0


def test_print_config_shows_method_and_data(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", *stack("phantom/mean_teacher"), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: kdseg.methods.MeanTeacher" in out
    assert "consistency_rampup_steps: 200" in out
    assert "seed_everything: 0" in out


def test_unknown_config_key_is_rejected_before_training(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = in_tmp_cwd / "bad.yaml"
    bad.write_text(
        (REPO / "experiments/budgets/phantom.yaml").read_text().replace("lr: 0.03", "lr: 0.03\n    learning_rte: 0.1")
    )
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", *stack("phantom/supervised"), f"--config={bad}"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "learning_rte" in err
    assert not (in_tmp_cwd / "runs").exists()


def _short_fit(in_tmp_cwd: Path, run: str, extra: list[str] = ()) -> "object":
    return run_cli(
        [
            "fit",
            *stack(run),
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            *PHANTOM_TINY_DATA,
            *TINY_NETWORK,
            *extra,
        ]
    )


def test_fit_test_predict_roundtrip_and_nothing_overwritten(in_tmp_cwd: Path) -> None:
    cli = _short_fit(in_tmp_cwd, "phantom/mean_teacher")
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "config.yaml").is_file()
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best and Path(best).is_file() and "best-step" in best
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # A second identical run gets its own folder; the first one's files are untouched.
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    cli2 = _short_fit(in_tmp_cwd, "phantom/mean_teacher")
    assert Path(cli2.trainer.log_dir) != run_dir
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    # kdseg test with the run's own config writes the results files into its run folder.
    test_cli = run_cli(["test", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}"])
    test_dir = Path(test_cli.trainer.log_dir)
    metrics = json.loads((test_dir / "test_metrics.json").read_text())
    assert set(metrics["per_class"]) == {"RV", "Myo", "LV"}
    # medpy convention (default): no voxel spacing, as the papers' code, although the phantom has one
    assert metrics["distance_unit"] == "pixel" and metrics["distance_convention"] == "medpy"
    assert metrics["num_volumes"] == 2  # 1 test patient x 2 frames
    rows = (test_dir / "test_cases.csv").read_text().strip().splitlines()
    assert rows[0].startswith("case_id,dice_RV,hd95_RV,asd_RV,status_RV")
    assert len(rows) == 1 + 2

    # kdseg predict writes one HDF5 mask per volume and refuses to overwrite.
    out = in_tmp_cwd / "pred"
    args = ["predict", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}", f"--prediction_writer.output_dir={out}"]
    run_cli(args)
    files = sorted(out.glob("*.h5"))
    assert [f.stem for f in files] == ["phantom005_frame01", "phantom005_frame12"]
    with h5py.File(files[0]) as f:
        prediction = f["prediction"][:]
    assert prediction.shape == (3, 40, 40) and prediction.max() <= 3
    with pytest.raises(FileExistsError, match="phantom005_frame01.h5"):
        run_cli(args)


def test_pinned_logger_version_that_exists_is_refused(in_tmp_cwd: Path) -> None:
    _short_fit(in_tmp_cwd, "phantom/supervised", ["--trainer.logger.init_args.version=fixed"])
    with pytest.raises(FileExistsError, match="fixed"):
        _short_fit(in_tmp_cwd, "phantom/supervised", ["--trainer.logger.init_args.version=fixed"])


def test_resume_restores_teacher_and_continues_steps(in_tmp_cwd: Path) -> None:
    cli = _short_fit(in_tmp_cwd, "phantom/mean_teacher")
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    teacher_saved = {k: v for k, v in saved["state_dict"].items() if k.startswith("ema_teacher.")}
    assert teacher_saved and saved["global_step"] == 4
    # Exactness of a resume that trains on (every weight, mid-epoch and at an epoch's end, after
    # signals and kill -9) is tested in tests/test_faults_resume.py.

    resumed = _short_fit(in_tmp_cwd, "phantom/mean_teacher", ["--trainer.max_steps=4", f"--ckpt_path={last}"])
    model = resumed.model
    # Nothing left to train (max_steps reached): the teacher is exactly the checkpoint's.
    assert resumed.trainer.global_step == 4
    for key, value in saved["state_dict"].items():  # student and teacher
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)

    continued = _short_fit(in_tmp_cwd, "phantom/mean_teacher", ["--trainer.max_steps=6", f"--ckpt_path={last}"])
    assert continued.trainer.global_step == 6


def test_wandb_logger_snippet_offline(in_tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = _short_fit(
        in_tmp_cwd, "phantom/supervised", [f"--config={REPO / 'experiments/loggers/wandb.yaml'}"]
    )
    from lightning.pytorch.loggers import WandbLogger

    assert isinstance(cli.trainer.logger, WandbLogger)
    run_dirs = list((in_tmp_cwd / "runs" / "kdseg").iterdir())
    assert len(run_dirs) == 1
    assert (run_dirs[0] / "config.yaml").is_file()
    assert list((run_dirs[0] / "checkpoints").glob("*.ckpt"))
    assert list((in_tmp_cwd / "runs" / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("run", ["phantom/mean_teacher", "phantom/action_stage3", "phantom/scribsd_plus"])
def test_channels_last_fit_keeps_weights_channels_last_and_values(run: str, in_tmp_cwd: Path) -> None:
    """``channels_last: true`` converts every network (student, teacher, heads) before training;
    a step gives the loss of the default memory order to float rounding."""
    args = ["fit", *stack(run), "--trainer.fast_dev_run=true", "--seed_everything=0", *PHANTOM_TINY_DATA, *TINY_NETWORK]
    cli = run_cli([*args, "--model.init_args.channels_last=true"])
    assert cli.trainer.state.finished
    weights = [p for p in cli.model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not all(p.is_contiguous() for p in weights)

    default = run_cli([*args, "--model.init_args.channels_last=false"])
    losses = {name: [float(cli.trainer.callback_metrics[k]) for k in sorted(cli.trainer.callback_metrics) if k.startswith("train/")]
              for name, cli in (("cl", cli), ("default", default))}
    assert losses["cl"], "no training loss logged"
    torch.testing.assert_close(torch.tensor(losses["cl"]), torch.tensor(losses["default"]), rtol=1e-4, atol=1e-5)
