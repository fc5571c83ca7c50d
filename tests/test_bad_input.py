"""Bad input ends with one clear error naming the file or key, before any training starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY_NETWORK, run_cli, stack

from kdseg.data.volume import DataError

CONFIG = stack("acdc/mean_teacher")


@pytest.fixture()
def broken_root(acdc_like_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny ACDC-layout folder that a test may damage."""
    root = tmp_path / "acdc"
    shutil.copytree(acdc_like_root, root)
    return root


def fit(root: Path, *extra: str) -> None:
    run_cli(
        ["fit", *CONFIG, f"--data.init_args.root={root}", "--data.init_args.labeled_patients=2",
         "--trainer.max_steps=1", *TINY_NETWORK, *extra]
    )


def assert_no_run_started(cwd: Path) -> None:
    assert not list(cwd.rglob("*.ckpt"))
    assert not [p for p in cwd.rglob("version_*") if p.is_dir()]  # no empty run folder left behind


def test_missing_root(in_tmp_cwd: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        fit(in_tmp_cwd / "nowhere")
    assert_no_run_started(in_tmp_cwd)


def test_split_names_patient_without_file(broken_root: Path, in_tmp_cwd: Path) -> None:
    (broken_root / "splits" / "train.txt").write_text("phantom000\nphantom001\npatient999\n")
    with pytest.raises(DataError, match=r"patient999") as error:
        fit(broken_root)
    assert "train.txt" in str(error.value)
    assert_no_run_started(in_tmp_cwd)


def test_missing_scribble_key_for_scribble_supervision(broken_root: Path, in_tmp_cwd: Path) -> None:
    path = broken_root / "volumes" / "phantom000_frame01.h5"
    with h5py.File(path, "a") as f:
        del f["scribble"]
    with pytest.raises(DataError, match="scribble") as error:
        run_cli(
            ["fit", *stack("acdc/pce"), f"--data.init_args.root={broken_root}",
             "--trainer.max_steps=1", *TINY_NETWORK]
        )
    assert "phantom000_frame01.h5" in str(error.value)
    assert_no_run_started(in_tmp_cwd)


def test_label_values_out_of_range(broken_root: Path, in_tmp_cwd: Path) -> None:
    path = broken_root / "volumes" / "phantom006_frame12.h5"  # a validation volume
    with h5py.File(path, "a") as f:
        label = f["label"][:]
        label[0, 0, 0] = 7
        f["label"][...] = label
    with pytest.raises(DataError, match="7") as error:
        fit(broken_root)
    assert "phantom006_frame12.h5" in str(error.value)
    assert_no_run_started(in_tmp_cwd)


def test_corrupted_file(broken_root: Path, in_tmp_cwd: Path) -> None:
    path = broken_root / "volumes" / "phantom001_frame01.h5"
    path.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises(DataError, match="phantom001_frame01.h5"):
        fit(broken_root)
    assert_no_run_started(in_tmp_cwd)


def test_empty_scribbles_are_reported(broken_root: Path, in_tmp_cwd: Path) -> None:
    path = broken_root / "volumes" / "phantom000_frame01.h5"
    with h5py.File(path, "a") as f:
        f["scribble"][...] = np.full(f["scribble"].shape, 4, dtype=np.uint16)
    with pytest.raises(DataError, match="no annotated pixel") as error:
        run_cli(
            ["fit", *stack("acdc/pce"), f"--data.init_args.root={broken_root}",
             "--trainer.max_steps=1", *TINY_NETWORK]
        )
    assert "phantom000_frame01" in str(error.value)


def test_method_and_data_mismatch_is_explained(acdc_like_root: Path, in_tmp_cwd: Path) -> None:
    # Mean Teacher with every patient labeled has no unlabeled stream.
    with pytest.raises(ValueError, match="unlabeled"):
        run_cli(
            ["fit", *CONFIG, f"--data.init_args.root={acdc_like_root}",
             "--data.init_args.labeled_patients=null", "--data.init_args.unlabeled_batch_size=0",
             "--trainer.max_steps=1", *TINY_NETWORK]
        )


def test_console_script_prints_one_clear_line(in_tmp_cwd: Path) -> None:
    kdseg = Path(sys.executable).with_name("kdseg")
    result = subprocess.run(
        [str(kdseg), "fit", *CONFIG, "--data.init_args.root=/no/such/folder", *TINY_NETWORK],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kdseg: error:") and "/no/such/folder" in last
    assert "Traceback" not in result.stderr
