"""Readers for the on-disk formats users already have, returning :class:`Volume` records.

Three layouts are supported (:mod:`kdseg.data.layouts` tells which one a folder holds and where
its cases are; :mod:`kdseg.data.array_checks` validates what is read). Arrays are always returned
as ``(D, H, W)``, slices first:

``"h5_volumes"``
    The shared-folder layout: ``root/volumes/<case>.h5`` with ``image`` float32 ``(D, H, W)``
    in [0, 1], ``label`` uint8 and ``scribble`` uint16 (``4`` = not annotated). No spacing is
    stored, so ``Volume.spacing`` is None.
``"h5_slices"``
    The SSL4MIS / WSL4MIS layout: ``root/data/slices/<case>_slice_<K>.h5`` (each with
    ``image``, ``label`` and optionally ``scribble``, all ``(H, W)``) and
    ``root/data/<case>.h5`` 3D volumes. Slices are grouped by case and stacked in numeric
    order of ``K``. When a case has both a 3D file and slices, the 3D file is read.
``"nifti"``
    Raw ACDC as downloaded: ``<patient>/<case>.nii.gz`` with ``<case>_gt.nii.gz`` (``*_4d``
    files are skipped), the patient folders directly under ``root`` or one or two folders
    deeper (``root/training/``, ``root/testing/``, ``root/database/training/``). nibabel's
    ``(X, Y, Z)`` arrays are transposed to ``(Z, Y, X)``, spacing is reordered to
    ``(z, y, x)`` mm, the affine is kept, and intensities are min-max scaled per volume to
    [0, 1] float32 (as the WSL4MIS preprocessing does). Raw ACDC has no scribbles.

Case ids look like ``patient001_frame01``; the patient id is the part before ``_frame``.

Every problem with the input raises one :class:`DataError` naming the file (or the split
file and patient) and what was expected, at read time, before any training starts.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import h5py
import numpy as np

from kdseg.data.array_checks import ARRAY_KEYS, check_image, check_label, check_params, check_require, validated_arrays
from kdseg.data.layouts import CaseEntry, check_root, detect_layout, index_cases, patient_of
from kdseg.data.volume import DataError, Volume

__all__ = ["read_patients", "read_split_file", "read_volume"]

# Errors file readers raise on corrupted / truncated / non-HDF5 / non-NIfTI files.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    RuntimeError,
    zlib.error,
)


def _read_h5(path: Path, require: tuple[str, ...], ndim: int) -> dict[str, np.ndarray]:
    """Raw arrays of one HDF5 file (image and whichever of label/scribble it has)."""
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            missing = [k for k in ("image", *require) if k not in f]
            if missing:
                raise DataError(f"{path}: missing key(s) {missing}; the file has keys {keys}")
            out = {}
            for k in ARRAY_KEYS:
                if k in f:
                    ds = f[k]
                    if not isinstance(ds, h5py.Dataset):
                        raise DataError(f"{path}: '{k}' is a group, expected a dataset")
                    out[k] = ds[()]
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read HDF5 file ({type(exc).__name__}: {exc})") from exc
    if out["image"].ndim != ndim:
        raise DataError(f"{path}: 'image' must be {ndim}D, found shape {out['image'].shape}")
    return out


def _read_h5_volume(entry: CaseEntry, require: tuple[str, ...], num_classes: int, ignore: int,
                    source_format: str) -> Volume:
    assert entry.path is not None
    arrays = _read_h5(entry.path, require, ndim=3)
    image, label, scribble = validated_arrays(arrays, str(entry.path), num_classes, ignore)
    return Volume(case_id=entry.case_id, patient_id=patient_of(entry.case_id), image=image,
                  label=label, scribble=scribble, spacing=None, source=entry.path,
                  source_format=source_format)


def _read_h5_slices(entry: CaseEntry, require: tuple[str, ...], num_classes: int,
                    ignore: int) -> Volume:
    per_slice = []
    for _, path in entry.slices:
        arrays = _read_h5(path, require, ndim=2)
        per_slice.append((path, validated_arrays(arrays, str(path), num_classes, ignore)))
    first_path, (first_img, first_lab, first_scr) = per_slice[0]
    stacked: list[np.ndarray | None] = []
    for i, name, first in ((0, "image", first_img), (1, "label", first_lab),
                           (2, "scribble", first_scr)):
        for path, arrs in per_slice[1:]:
            if (arrs[i] is None) != (first is None):
                has, lacks = (first_path, path) if first is not None else (path, first_path)
                raise DataError(f"{lacks}: has no '{name}' although {has.name} of the same "
                                f"case {entry.case_id} has one")
            if first is not None and arrs[i].shape != first.shape:
                raise DataError(f"{path}: '{name}' shape {arrs[i].shape} differs from "
                                f"{first.shape} in {first_path.name} of the same case")
        stacked.append(None if first is None else np.stack([a[i] for _, a in per_slice]))
    image, label, scribble = stacked
    assert image is not None
    source = first_path.parent / f"{entry.case_id}_slice_*.h5"
    return Volume(case_id=entry.case_id, patient_id=patient_of(entry.case_id), image=image,
                  label=label, scribble=scribble, spacing=None, source=source,
                  source_format="h5_slices")


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except (ImageFileError, *_READ_ERRORS) as exc:
        raise DataError(f"{path}: cannot read NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D NIfTI volume (X, Y, Z), found shape {data.shape}")
    return data, affine, zooms


def _read_nifti(entry: CaseEntry, require: tuple[str, ...], num_classes: int) -> Volume:
    assert entry.path is not None
    if "scribble" in require:
        raise DataError(f"{entry.path}: scribbles were required but raw ACDC NIfTI data has "
                        f"none (use the HDF5 layout with a 'scribble' key)")
    if "label" in require and entry.gt_path is None:
        gt_name = entry.path.name.replace(entry.case_id, entry.case_id + "_gt", 1)
        raise DataError(f"{entry.path}: a label was required but its ground truth "
                        f"{entry.path.parent / gt_name} does not exist")
    data, affine, zooms = _load_nifti(entry.path)
    where = str(entry.path)
    image = check_image(data, where, 3)
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    image = np.ascontiguousarray(image.transpose(2, 1, 0), dtype=np.float32)
    label = None
    if entry.gt_path is not None:
        gt, _, _ = _load_nifti(entry.gt_path)
        if gt.shape != data.shape:
            raise DataError(f"{entry.gt_path}: ground truth shape {gt.shape} does not match "
                            f"the image {entry.path.name} shape {data.shape}")
        label = np.ascontiguousarray(
            check_label(gt, str(entry.gt_path), num_classes).transpose(2, 1, 0))
    sx, sy, sz = (zooms + (1.0, 1.0, 1.0))[:3]
    return Volume(case_id=entry.case_id, patient_id=patient_of(entry.case_id), image=image,
                  label=label, scribble=None, spacing=(sz, sy, sx), source=entry.path,
                  source_format="nifti", affine=affine)


def _read_entry(entry: CaseEntry, require: tuple[str, ...], num_classes: int,
                ignore: int) -> Volume:
    if entry.kind == "nifti":
        return _read_nifti(entry, require, num_classes)
    if entry.kind == "h5_slices":
        return _read_h5_slices(entry, require, num_classes, ignore)
    return _read_h5_volume(entry, require, num_classes, ignore, source_format="h5")


def read_volume(root: Path, layout: str, case_id: str, require: tuple[str, ...] = (),
                num_classes: int = 4, scribble_ignore_index: int = 4) -> Volume:
    """Read and validate one case.

    Args:
        root: the dataset folder.
        layout: one of :data:`LAYOUTS` (see :func:`detect_layout`).
        case_id: e.g. ``patient001_frame01``.
        require: keys that must be present (``"label"``, ``"scribble"``); a missing one is a
            DataError naming the file and the keys it has.
        num_classes: labels must lie in ``[0, num_classes)``.
        scribble_ignore_index: the "not annotated" scribble value (also allowed).

    Returns:
        The :class:`Volume`; image float32, label and scribble uint8, all ``(D, H, W)``.

    Raises:
        DataError: missing root or case, missing required key, out-of-range values, shape
            mismatch, NaN/inf image, or an unreadable file.
    """
    require = check_require(require)
    check_params(num_classes, scribble_ignore_index)
    entries = index_cases(root, layout)
    if case_id not in entries:
        raise DataError(f"case {case_id} not found in {root} (layout {layout})")
    return _read_entry(entries[case_id], require, num_classes, scribble_ignore_index)


def read_patients(root: Path, patient_ids: list[str], require: tuple[str, ...] = (),
                  num_classes: int = 4, scribble_ignore_index: int = 4,
                  layout: str | None = None, split_file: Path | None = None) -> list[Volume]:
    """Read every frame of each patient, validated.

    Args:
        root: the dataset folder.
        patient_ids: patients to read (e.g. from :func:`read_split_file`), in the order wanted.
        require: keys every file must have (``"label"``, ``"scribble"``).
        num_classes: labels must lie in ``[0, num_classes)``.
        scribble_ignore_index: the "not annotated" scribble value.
        layout: one of :data:`LAYOUTS`; detected with :func:`detect_layout` when None.
        split_file: where ``patient_ids`` came from, named in error messages.

    Returns:
        Volumes in the given patient order, then case order within a patient.

    Raises:
        DataError: a patient without any file, or any problem :func:`read_volume` reports.
    """
    require = check_require(require)
    check_params(num_classes, scribble_ignore_index)
    root = check_root(root)
    if layout is None:
        layout = detect_layout(root)
    entries = index_cases(root, layout)
    by_patient: dict[str, list[str]] = {}
    for case in entries:
        by_patient.setdefault(patient_of(case), []).append(case)
    origin = f" listed in {split_file}" if split_file is not None else ""
    seen: set[str] = set()
    volumes: list[Volume] = []
    for pid in patient_ids:
        if pid in seen:
            raise DataError(f"patient {pid}{origin} is requested twice")
        seen.add(pid)
        cases = by_patient.get(pid)
        if not cases:
            raise DataError(f"patient {pid}{origin} has no file in {root} (layout {layout}; "
                            f"{len(by_patient)} patients found there)")
        for case in sorted(cases):
            volumes.append(_read_entry(entries[case], require, num_classes,
                                       scribble_ignore_index))
    return volumes


def read_split_file(path: Path) -> list[str]:
    """Read a split file: one patient id per line; blank lines and ``#`` comments ignored.

    Raises:
        DataError: the file is missing, unreadable, holds no patient, has a line with more
            than one id, or lists a patient twice (naming the file and the lines).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"split file {path}: cannot read it ({exc})") from exc
    ids: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if len(line.split()) != 1:
            raise DataError(f"split file {path}, line {lineno}: expected one patient id, "
                            f"found {line!r}")
        if line in first_line:
            raise DataError(f"split file {path}, line {lineno}: patient {line} is listed twice "
                            f"(first on line {first_line[line]})")
        first_line[line] = lineno
        ids.append(line)
    if not ids:
        raise DataError(f"split file {path} lists no patient (expected one id per line)")
    return ids
