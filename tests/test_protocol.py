"""The ACDC evaluation protocol: which patients train, select the checkpoint and are tested.

Generated roots (``acdc_like_root``: train phantom000-005, val phantom006-007, test phantom008-009)
with and without ``splits/test.txt``.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
from conftest import TINY_NETWORK, run_cli, stack

from kdseg.data.datamodule import ACDCDataModule
from kdseg.data.protocol import resolve_protocol
from kdseg.data.volume import DataError

TRAIN = tuple(f"phantom{i:03d}" for i in range(6))
VAL = ("phantom006", "phantom007")
TEST = ("phantom008", "phantom009")


@pytest.fixture()
def root_without_test(acdc_like_root: Path, tmp_path: Path) -> Path:
    """The generated root as kdseg's shared ACDC copy is: train.txt and val.txt, no test.txt."""
    root = tmp_path / "acdc_no_test"
    shutil.copytree(acdc_like_root, root)
    (root / "splits" / "test.txt").unlink()
    return root


def test_with_test_split_the_ssl4mis_protocol(acdc_like_root: Path) -> None:
    protocol = resolve_protocol(acdc_like_root)
    assert protocol.name == "ssl4mis"
    assert (protocol.train.patients, protocol.val.patients, protocol.test.patients) == (TRAIN, VAL, TEST)
    assert protocol.test.file == acdc_like_root / "splits" / "test.txt"


def test_without_test_split_the_last_train_patients_validate_and_val_is_tested(root_without_test: Path) -> None:
    protocol = resolve_protocol(root_without_test, holdout=2)
    assert protocol.name == "train-holdout"
    assert protocol.train.patients == TRAIN[:4]
    assert protocol.val.patients == TRAIN[4:]
    assert protocol.test.patients == VAL
    assert not set(protocol.train.patients) & set(protocol.val.patients)
    assert "the last 2 of" in protocol.describe() and "no test split" in protocol.describe()


def test_explicit_split_files_win(root_without_test: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine.txt"
    mine.write_text("phantom009\n")
    given_val = resolve_protocol(root_without_test, val_split=mine, holdout=2)
    assert given_val.train.patients == TRAIN  # a given validation file: train.txt is not cut
    assert given_val.val.patients == ("phantom009",) and given_val.test.patients == VAL
    given_test = resolve_protocol(root_without_test, test_split=mine, holdout=2)
    assert given_test.name == "ssl4mis"
    assert (given_test.train.patients, given_test.val.patients, given_test.test.patients) == (TRAIN, VAL, ("phantom009",))


def test_train_and_validation_overlap_is_an_error(acdc_like_root: Path, tmp_path: Path) -> None:
    mine = tmp_path / "leaky_val.txt"
    mine.write_text("phantom008\nphantom002\n")
    with pytest.raises(DataError, match=r"phantom002.*training set and in the val set"):
        resolve_protocol(acdc_like_root, val_split=mine)


def test_holdout_leaving_no_training_patient_is_an_error(root_without_test: Path) -> None:
    with pytest.raises(DataError, match="fallback_val_patients=6"):
        resolve_protocol(root_without_test, holdout=6)


def test_data_module_fallback_keeps_labeled_patients_first_and_held_out_patients_unseen(
    root_without_test: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = ACDCDataModule(root_without_test, labeled_patients=2, unlabeled_batch_size=2, fallback_val_patients=2,
                        image_size=32, batch_size=2)
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
        dm.setup("test")
        dm.setup("predict")
    assert {v.patient_id for v in dm.labeled_volumes} == set(TRAIN[:2])  # first N of train.txt
    assert {v.patient_id for v in dm.unlabeled_volumes} == set(TRAIN[2:4])
    assert {v.patient_id for v in dm.val_volumes} == set(TRAIN[4:])
    assert {v.patient_id for v in dm.test_volumes} == set(VAL)
    assert [v.case_id for v in dm.predict_volumes] == [v.case_id for v in dm.test_volumes]
    assert sum("ACDC protocol train-holdout" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_labeled_patients_reaching_into_the_holdout_is_an_error(root_without_test: Path) -> None:
    dm = ACDCDataModule(root_without_test, labeled_patients=5, fallback_val_patients=2, image_size=32)
    with pytest.raises(DataError, match="only 4 patients"):
        dm.setup("fit")


@pytest.mark.parametrize("with_test_split", [True, False], ids=["ssl4mis", "train-holdout"])
def test_kdseg_fit_validates_and_kdseg_test_tests_the_protocol_patients(
    with_test_split: bool, acdc_like_root: Path, root_without_test: Path, in_tmp_cwd: Path
) -> None:
    root = acdc_like_root if with_test_split else root_without_test
    fit = run_cli(
        ["fit", *stack("acdc/supervised"), f"--data.init_args.root={root}",
         "--data.init_args.fallback_val_patients=2", "--data.init_args.labeled_patients=2",
         "--trainer.max_steps=2", "--trainer.val_check_interval=2", *TINY_NETWORK]
    )
    dm = fit.datamodule
    train_seen = {v.patient_id for v in dm.labeled_volumes + dm.unlabeled_volumes}
    validated = {v.patient_id for v in dm.val_volumes}
    assert validated == (set(VAL) if with_test_split else set(TRAIN[4:]))
    assert not train_seen & validated
    run_dir = Path(fit.trainer.log_dir)
    test = run_cli(["test", f"--config={run_dir / 'config.yaml'}",
                    f"--ckpt_path={fit.trainer.checkpoint_callback.best_model_path}"])
    results = Path(test.trainer.log_dir)
    with (results / "test_cases.csv").open() as f:
        tested = {row["case_id"].split("_")[0] for row in csv.DictReader(f)}
    assert tested == (set(TEST) if with_test_split else set(VAL))
    assert json.loads((results / "test_metrics.json").read_text())["num_volumes"] == 4
