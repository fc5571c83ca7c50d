"""Write predicted masks next to (never over) anything: NIfTI for NIfTI inputs, else HDF5."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from kdseg.data.volume import DataError, Volume

__all__ = ["write_prediction", "prediction_path"]


def prediction_path(volume: Volume, out_dir: Path) -> Path:
    """Where :func:`write_prediction` writes ``volume``'s mask: ``<case_id>.nii.gz`` or ``.h5``."""
    name = volume.case_id
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"case_id {name!r} cannot be used as a file name")
    suffix = ".nii.gz" if volume.source_format == "nifti" else ".h5"
    return Path(out_dir) / f"{name}{suffix}"


def _as_mask(volume: Volume, prediction: np.ndarray) -> np.ndarray:
    pred = np.asarray(prediction)
    if pred.shape != volume.image.shape:
        raise DataError(f"prediction for {volume.case_id} has shape {pred.shape}, expected the "
                        f"image shape {volume.image.shape} (D, H, W)")
    if pred.dtype.kind == "f":
        if not np.all(np.isfinite(pred)) or not np.array_equal(pred, np.round(pred)):
            raise DataError(f"prediction for {volume.case_id} must hold integer class values")
    elif pred.dtype.kind not in "iub":
        raise DataError(f"prediction for {volume.case_id} must be an integer array, "
                        f"got dtype {pred.dtype}")
    if pred.size and (pred.min() < 0 or pred.max() > 255):
        raise DataError(f"prediction for {volume.case_id} must hold values in 0..255, found "
                        f"{pred.min()}..{pred.max()}")
    return pred.astype(np.uint8)


def _publish(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` without ever replacing an existing ``target``."""
    try:
        os.link(tmp, target)  # atomic, fails if target exists
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise FileExistsError(f"{target} already exists; not overwriting it") from None
    except OSError:  # file system without hard links
        if target.exists():
            tmp.unlink(missing_ok=True)
            raise FileExistsError(f"{target} already exists; not overwriting it") from None
        os.replace(tmp, target)
        return
    tmp.unlink(missing_ok=True)


def write_prediction(volume: Volume, prediction: np.ndarray, out_dir: Path) -> Path:
    """Write a predicted ``(D, H, W)`` mask for ``volume`` into ``out_dir`` (created if needed).

    NIfTI sources (``volume.source_format == "nifti"``) get ``<case_id>.nii.gz``, transposed
    back to nibabel's ``(X, Y, Z)`` with the source affine and spacing, so it overlays the
    original image in any viewer. Everything else gets ``<case_id>.h5`` with dataset
    ``prediction`` (uint8, gzip) and attribute ``source`` (the source file) when known.

    Args:
        volume: the volume the prediction belongs to.
        prediction: integer class map, same shape as ``volume.image``.
        out_dir: output folder.

    Returns:
        The written file.

    Raises:
        FileExistsError: the target file already exists (it is never overwritten).
        DataError: the prediction does not fit the volume.
    """
    mask = _as_mask(volume, prediction)
    target = prediction_path(volume, out_dir)
    if target.exists():
        raise FileExistsError(f"{target} already exists; not overwriting it")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Hidden temporary name ending like the target (nibabel picks the format from the name).
    tmp = target.with_name(f".{os.getpid()}.tmp.{target.name}")
    try:
        if volume.source_format == "nifti":
            import nibabel as nib

            if volume.affine is not None:
                affine = np.asarray(volume.affine, dtype=np.float64)
            elif volume.spacing is not None:
                sz, sy, sx = volume.spacing
                affine = np.diag([sx, sy, sz, 1.0])
            else:
                affine = np.eye(4)
            img = nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0)), affine)
            img.set_data_dtype(np.uint8)
            if volume.spacing is not None:
                sz, sy, sx = volume.spacing
                img.header.set_zooms((sx, sy, sz))
            nib.save(img, str(tmp))
        else:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("prediction", data=mask, compression="gzip")
                if volume.source is not None:
                    f.attrs["source"] = str(volume.source)
                f.attrs["case_id"] = volume.case_id
        _publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
