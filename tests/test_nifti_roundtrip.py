"""Raw ACDC layout (NIfTI): train, test in mm, and predict NIfTI masks with the source affine."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import TINY_NETWORK, run_cli, stack

from kdseg.data.phantom import make_phantom_volumes


def write_raw_acdc(root: Path) -> list[str]:
    """Phantom patients as raw ACDC: patientNNN/patientNNN_frameMM[_gt].nii.gz, (X, Y, Z) arrays."""
    volumes = make_phantom_volumes(4, seed=3, num_slices=3, size=(40, 36), with_scribbles=False)
    patients = []
    for i, volume in enumerate(volumes):
        patient = f"patient{100 + i // 2:03d}"
        frame = volume.case_id.split("_")[1]
        folder = root / patient
        folder.mkdir(parents=True, exist_ok=True)
        affine = np.diag([1.25, 1.5, 8.0, 1.0])
        image = (volume.image * 300).astype(np.float32).transpose(2, 1, 0)
        nib.save(nib.Nifti1Image(image, affine), folder / f"{patient}_{frame}.nii.gz")
        nib.save(nib.Nifti1Image(volume.label.transpose(2, 1, 0).astype(np.uint8), affine), folder / f"{patient}_{frame}_gt.nii.gz")
        if patient not in patients:
            patients.append(patient)
    return patients


def test_raw_nifti_fit_test_predict(in_tmp_cwd: Path) -> None:
    root = in_tmp_cwd / "ACDC" / "training"
    patients = write_raw_acdc(root)
    (in_tmp_cwd / "train.txt").write_text(patients[0] + "\n")
    (in_tmp_cwd / "val.txt").write_text(patients[1] + "\n")
    common = [
        f"--data.init_args.root={in_tmp_cwd / 'ACDC'}",
        f"--data.init_args.train_split={in_tmp_cwd / 'train.txt'}",
        f"--data.init_args.val_split={in_tmp_cwd / 'val.txt'}",
        f"--data.init_args.test_split={in_tmp_cwd / 'val.txt'}",
    ]
    cli = run_cli(
        ["fit", *stack("acdc/supervised"), *common, "--data.init_args.labeled_patients=null",
         "--trainer.max_steps=2", "--trainer.val_check_interval=2", *TINY_NETWORK]
    )
    run_dir = Path(cli.trainer.log_dir)
    ckpt = cli.trainer.checkpoint_callback.best_model_path

    # The MONAI convention uses the NIfTI spacing (mm); the default medpy one does not (papers' code).
    test = run_cli(["test", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={ckpt}",
                    "--model.init_args.distance_convention=monai"])
    metrics = json.loads((Path(test.trainer.log_dir) / "test_metrics.json").read_text())
    assert metrics["distance_unit"] == "mm" and metrics["distance_convention"] == "monai"

    out = in_tmp_cwd / "masks"
    run_cli(["predict", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={ckpt}",
             f"--prediction_writer.output_dir={out}"])
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"{patients[1]}_frame01.nii.gz", f"{patients[1]}_frame12.nii.gz"]
    mask = nib.load(out / written[0])
    source = nib.load(root / patients[1] / f"{patients[1]}_frame01.nii.gz")
    assert mask.shape == source.shape == (36, 40, 3)
    np.testing.assert_allclose(mask.affine, source.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3}
