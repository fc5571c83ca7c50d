"""Readers (three on-disk layouts) and prediction writers, on tiny synthetic fixtures and,
when present, the real ACDC data in ../shared/data/acdc."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from kdseg.data.layouts import detect_layout, list_cases
from kdseg.data.readers import read_patients, read_split_file, read_volume
from kdseg.data.volume import DataError, Volume
from kdseg.data.writers import write_prediction

ACDC = Path(__file__).parents[1].parent / "shared" / "data" / "acdc"
D, H, W = 3, 16, 12  # H != W so transposition mistakes show
PATIENTS = ("patient001", "patient002")
FRAMES = ("frame01", "frame12")


def _arrays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.random((D, H, W), dtype=np.float32)
    label = rng.integers(0, 4, (D, H, W), dtype=np.uint8)
    scribble = rng.integers(0, 5, (D, H, W)).astype(np.uint16)
    return image, label, scribble


def _write_h5(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v, compression="gzip")


@pytest.fixture
def h5_volumes(tmp_path: Path) -> Path:
    for i, p in enumerate(PATIENTS):
        for j, fr in enumerate(FRAMES):
            img, lab, scr = _arrays(10 * i + j)
            _write_h5(tmp_path / "volumes" / f"{p}_{fr}.h5", image=img, label=lab, scribble=scr)
    return tmp_path


@pytest.fixture
def h5_slices(tmp_path: Path) -> Path:
    """patient001 as 12 slices (numeric sort matters), patient002 as slices AND 3D files."""
    for i, p in enumerate(PATIENTS):
        for j, fr in enumerate(FRAMES):
            case = f"{p}_{fr}"
            n = 12 if p == "patient001" else D
            for k in range(n):
                img = np.full((H, W), k / 100, np.float32)  # slice k recognisable by value
                _write_h5(tmp_path / "data" / "slices" / f"{case}_slice_{k}.h5", image=img,
                          label=np.full((H, W), k % 4, np.uint8),
                          scribble=np.full((H, W), 4, np.uint8))
            if p == "patient002":
                img, lab, _ = _arrays(10 * i + j)
                _write_h5(tmp_path / "data" / f"{case}.h5", image=img + 1.0, label=lab)
    return tmp_path


SPACING_XYZ = (1.5, 1.25, 10.0)


@pytest.fixture
def nifti(tmp_path: Path) -> Path:
    """Raw ACDC: root/database/training/patientNNN/..., with a marker voxel at (x,y,z)=(1,2,0)."""
    for p in PATIENTS:
        pdir = tmp_path / "database" / "training" / p
        pdir.mkdir(parents=True)
        affine = np.diag([*SPACING_XYZ, 1.0])
        affine[:3, 3] = [-5.0, 3.0, 7.0]
        for fr in FRAMES:
            data = np.full((W, H, D), 100, np.int16)  # nibabel (X, Y, Z)
            data[1, 2, 0] = 1100  # marker
            data[0, 0, 2] = 50  # minimum
            gt = np.zeros((W, H, D), np.uint8)
            gt[1, 2, 0] = 3
            nib.save(nib.Nifti1Image(data, affine), str(pdir / f"{p}_{fr}.nii.gz"))
            if not (p == "patient002" and fr == "frame12"):  # one frame without ground truth
                nib.save(nib.Nifti1Image(gt, affine), str(pdir / f"{p}_{fr}_gt.nii.gz"))
        nib.save(nib.Nifti1Image(np.zeros((W, H, D, 2), np.int16), affine),
                 str(pdir / f"{p}_4d.nii.gz"))
    return tmp_path


# ------------------------------------------------------------------ layouts


def test_h5_volumes(h5_volumes: Path) -> None:
    assert detect_layout(h5_volumes) == "h5_volumes"
    assert list_cases(h5_volumes, "h5_volumes") == {
        p: [f"{p}_{fr}" for fr in FRAMES] for p in PATIENTS}
    v = read_volume(h5_volumes, "h5_volumes", "patient002_frame01", require=("scribble",))
    img, lab, scr = _arrays(10)
    assert v.image.dtype == np.float32 and v.image.shape == (D, H, W)
    assert v.label.dtype == np.uint8 and v.scribble.dtype == np.uint8
    np.testing.assert_array_equal(v.image, img)
    np.testing.assert_array_equal(v.label, lab)
    np.testing.assert_array_equal(v.scribble, scr)
    assert v.patient_id == "patient002" and v.spacing is None and v.source_format == "h5"
    vols = read_patients(h5_volumes, ["patient002", "patient001"])
    assert [x.case_id for x in vols] == [
        "patient002_frame01", "patient002_frame12", "patient001_frame01", "patient001_frame12"]


def test_h5_slices_numeric_sort_and_3d_preferred(h5_slices: Path) -> None:
    assert detect_layout(h5_slices) == "h5_slices"
    v = read_volume(h5_slices, "h5_slices", "patient001_frame01")
    assert v.image.shape == (12, H, W) and v.source_format == "h5_slices"
    # slice_10 comes after slice_9, not after slice_1
    np.testing.assert_allclose(v.image[:, 0, 0], np.arange(12) / 100, atol=1e-6)
    np.testing.assert_array_equal(v.label[:, 0, 0], np.arange(12) % 4)
    assert v.scribble.dtype == np.uint8 and v.scribble.shape == (12, H, W)
    v3 = read_volume(h5_slices, "h5_slices", "patient002_frame12")
    assert v3.source_format == "h5" and v3.source.name == "patient002_frame12.h5"
    assert v3.image.min() >= 1.0 and v3.scribble is None
    vols = read_patients(h5_slices, ["patient001", "patient002"])
    assert sum(x.num_slices for x in vols) == 2 * 12 + 2 * D


def test_nifti_transpose_spacing_affine(nifti: Path) -> None:
    assert detect_layout(nifti) == "nifti"
    cases = list_cases(nifti, "nifti")
    assert cases == {p: [f"{p}_{fr}" for fr in FRAMES] for p in PATIENTS}  # no *_4d
    v = read_volume(nifti, "nifti", "patient001_frame01")
    assert v.image.shape == (D, H, W) and v.image.dtype == np.float32
    assert v.image[0, 2, 1] == 1.0 and v.image[2, 0, 0] == 0.0  # (x,y,z) -> [z,y,x]
    assert np.isclose(v.image[1, 5, 5], 50 / 1050)
    assert v.label.dtype == np.uint8 and v.label[0, 2, 1] == 3 and v.label.sum() == 3
    assert v.spacing == (10.0, 1.25, 1.5)  # (z, y, x)
    assert v.affine is not None and v.affine[0, 3] == -5.0
    assert v.scribble is None and v.source_format == "nifti"
    no_gt = read_volume(nifti, "nifti", "patient002_frame12")
    assert no_gt.label is None


@pytest.mark.parametrize("sub", ["training", "", "database/training"])
def test_nifti_search_depth(tmp_path: Path, sub: str) -> None:
    pdir = tmp_path / sub / "patient007" if sub else tmp_path / "patient007"
    pdir.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4), np.eye(4)),
             str(pdir / "patient007_frame01.nii.gz"))
    assert detect_layout(tmp_path) == "nifti"
    assert list_cases(tmp_path, "nifti") == {"patient007": ["patient007_frame01"]}


# ------------------------------------------------------------------ bad inputs


def test_missing_root_and_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        detect_layout(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="h5_volumes.*h5_slices.*nifti") as e:
        detect_layout(tmp_path / "empty")
    assert "empty" in str(e.value)


def test_split_file(tmp_path: Path) -> None:
    f = tmp_path / "train.txt"
    f.write_text("# labeled first\npatient002\n\npatient001  # note\n")
    assert read_split_file(f) == ["patient002", "patient001"]
    f.write_text("patient001\npatient002\npatient001\n")
    with pytest.raises(DataError, match=r"train\.txt, line 3.*twice"):
        read_split_file(f)
    f.write_text("# nothing\n\n")
    with pytest.raises(DataError, match=r"train\.txt.*no patient"):
        read_split_file(f)
    with pytest.raises(DataError, match=r"missing\.txt does not exist"):
        read_split_file(tmp_path / "missing.txt")


def test_patient_without_file(h5_volumes: Path) -> None:
    split = h5_volumes / "val.txt"
    with pytest.raises(DataError, match=r"patient099 listed in .*val\.txt has no file"):
        read_patients(h5_volumes, ["patient001", "patient099"], split_file=split)


def _bad(root: Path, **arrays: np.ndarray) -> Path:
    path = root / "volumes" / "patient001_frame01.h5"
    path.unlink()
    _write_h5(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["no_scribble", "label_range", "scribble_range", "shape",
                                  "nan", "corrupt"])
def test_bad_h5(h5_volumes: Path, case: str) -> None:
    img, lab, scr = _arrays(0)
    require: tuple[str, ...] = ()
    if case == "no_scribble":
        _bad(h5_volumes, image=img, label=lab)
        require, pattern = ("scribble",), r"missing key.*scribble.*has keys \['image', 'label'\]"
    elif case == "label_range":
        lab[0, 0, 0] = 7
        _bad(h5_volumes, image=img, label=lab)
        pattern = r"'label' values must be in 0\.\.3.*found values \[0, 1, 2, 3, 7\]"
    elif case == "scribble_range":
        scr[0, 0, 0] = 6
        _bad(h5_volumes, image=img, label=lab, scribble=scr)
        pattern = r"'scribble' values .*ignore value 4.*6"
    elif case == "shape":
        _bad(h5_volumes, image=img, label=lab[:, :, :-1])
        pattern = r"'label' shape \(3, 16, 11\) does not match"
    elif case == "nan":
        img[1, 1, 1] = np.nan
        _bad(h5_volumes, image=img, label=lab)
        pattern = "NaN/inf"
    else:
        path = h5_volumes / "volumes" / "patient001_frame01.h5"
        path.write_bytes(path.read_bytes()[:200])
        pattern = "cannot read HDF5"
    with pytest.raises(DataError, match=pattern) as e:
        read_patients(h5_volumes, list(PATIENTS), require=require)
    assert "patient001_frame01.h5" in str(e.value)


def test_bad_slices_and_nifti(h5_slices: Path, nifti: Path) -> None:
    bad = h5_slices / "data" / "slices" / "patient001_frame01_slice_10.h5"
    bad.unlink()
    _write_h5(bad, image=np.zeros((H, W), np.float32), label=np.full((H, W), 9, np.uint8),
              scribble=np.full((H, W), 4, np.uint8))
    with pytest.raises(DataError, match="patient001_frame01_slice_10.h5.*found values"):
        read_volume(h5_slices, "h5_slices", "patient001_frame01")
    gt = nifti / "database" / "training" / "patient001" / "patient001_frame01_gt.nii.gz"
    gt.write_bytes(gt.read_bytes()[:60])
    with pytest.raises(DataError, match="patient001_frame01_gt.nii.gz"):
        read_volume(nifti, "nifti", "patient001_frame01")
    with pytest.raises(DataError, match="patient002_frame12.*_gt.*does not exist"):
        read_volume(nifti, "nifti", "patient002_frame12", require=("label",))
    with pytest.raises(DataError, match="patient002_frame01.*scribbles were required"):
        read_volume(nifti, "nifti", "patient002_frame01", require=("scribble",))


# ------------------------------------------------------------------ writers


def test_write_prediction_roundtrip(h5_volumes: Path, nifti: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "preds"
    v = read_volume(h5_volumes, "h5_volumes", "patient001_frame01")
    pred = v.label.copy()
    p = write_prediction(v, pred, out)
    assert p == out / "patient001_frame01.h5"
    with h5py.File(p) as f:
        np.testing.assert_array_equal(f["prediction"][()], pred)
        assert f["prediction"].dtype == np.uint8 and f.attrs["source"] == str(v.source)
    with pytest.raises(FileExistsError, match="patient001_frame01.h5"):
        write_prediction(v, pred, out)

    n = read_volume(nifti, "nifti", "patient001_frame01")
    p = write_prediction(n, n.label, out)
    assert p.name == "patient001_frame01.nii.gz"
    img = nib.load(str(p))
    gt = nib.load(str(n.source.with_name("patient001_frame01_gt.nii.gz")))
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(gt.dataobj))
    np.testing.assert_allclose(img.affine, gt.affine)
    np.testing.assert_allclose(img.header.get_zooms(), SPACING_XYZ)
    with pytest.raises(FileExistsError):
        write_prediction(n, n.label, out)
    assert sorted(x.name for x in out.iterdir()) == ["patient001_frame01.h5",
                                                     "patient001_frame01.nii.gz"]


# ------------------------------------------------------------------ real data


real = pytest.mark.skipif(not ACDC.is_dir(), reason=f"real ACDC data not found at {ACDC}")


@real
@pytest.mark.real_data
def test_real_acdc(tmp_path: Path) -> None:
    assert detect_layout(ACDC) == "h5_volumes"
    split = ACDC / "splits" / "train.txt"
    train = read_split_file(split)
    assert len(train) == 70
    three = read_patients(ACDC, train[:3], require=("label", "scribble"), split_file=split)
    assert sum(v.num_slices for v in three) == 68
    four_more = read_patients(ACDC, train[3:7], require=("label", "scribble"))
    assert sum(v.num_slices for v in three + four_more) == 136
    for v in three + four_more:
        assert v.image.dtype == np.float32 and v.image.ndim == 3
        assert v.label.dtype == np.uint8 and v.label.max() <= 3
        assert v.scribble.dtype == np.uint8 and v.scribble.max() <= 4
        assert v.label.shape == v.image.shape == v.scribble.shape
    v = three[0]
    p = write_prediction(v, v.label, tmp_path)
    with h5py.File(p) as f:
        np.testing.assert_array_equal(f["prediction"][()], v.label)
    with pytest.raises(FileExistsError):
        write_prediction(v, v.label, tmp_path)
    # The same real volume, as if read from NIfTI: written (X, Y, Z) with its spacing.
    nv = Volume(case_id=v.case_id, patient_id=v.patient_id, image=v.image, label=v.label,
                spacing=(10.0, 1.5, 1.25), source_format="nifti")
    p = write_prediction(nv, v.label, tmp_path / "patient")
    assert nib.load(str(p)).shape == v.image.shape[::-1]
    back = np.asarray(nib.load(str(p)).dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(back, v.label)
    np.testing.assert_allclose(nib.load(str(p)).header.get_zooms(), (1.25, 1.5, 10.0))
    with pytest.raises(FileExistsError):
        write_prediction(nv, v.label, tmp_path / "patient")
