"""The acceptance commands on the real ACDC data in ../shared/data/acdc (skipped without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_ACDC, requires_acdc, run_cli, stack

pytestmark = [requires_acdc, pytest.mark.real_data]


@pytest.mark.parametrize("config", ["mean_teacher", "pce"])
def test_acdc_config_fast_dev_run_on_real_data(config: str, in_tmp_cwd: Path) -> None:
    # The acceptance command as written, only without the progress bar.
    cli = run_cli(
        ["fit", *stack(f"acdc/{config}"), f"--data.root={SHARED_ACDC}",
         "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"]
    )
    assert cli.trainer.state.finished
    assert 0.0 <= float(cli.trainer.callback_metrics["val/dice_mean"]) <= 1.0


def test_fit_then_test_with_a_test_split_on_real_data(in_tmp_cwd: Path) -> None:
    small = ["--data.image_size=64", "--model.init_args.network.encoder_depth=3",
             "--model.init_args.network.decoder_channels=[32,16,8]", "--trainer.enable_progress_bar=false"]
    cli = run_cli(
        ["fit", *stack("acdc/supervised"), f"--data.root={SHARED_ACDC}",
         "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.labeled_patients=3",
         "--trainer.limit_val_batches=2", *small]
    )
    run_dir = Path(cli.trainer.log_dir)
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    split = in_tmp_cwd / "two_patients.txt"
    patients = (SHARED_ACDC / "splits/val.txt").read_text().split()[:2]
    split.write_text("\n".join(patients) + "\n")
    test = run_cli(
        ["test", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={ckpt}", f"--data.root={SHARED_ACDC}",
         f"--data.test_split={split}"]
    )
    results = Path(test.trainer.log_dir)
    metrics = json.loads((results / "test_metrics.json").read_text())
    assert metrics["num_volumes"] == 4 and metrics["distance_unit"] == "pixel"  # the HDF5 files have no spacing
    lines = (results / "test_cases.csv").read_text().splitlines()
    expected = sorted(p.stem for patient in patients for p in (SHARED_ACDC / "volumes").glob(f"{patient}_frame*.h5"))
    assert [line.split(",")[0] for line in lines[1:]] == expected
