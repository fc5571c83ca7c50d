"""Reader of the ISBI 2014 overlapping cervical cytology training set
(``train/images/N.tif`` + ``train/isbi_train_GT.mat``) as :class:`InstanceSample` records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kdseg.data.cell_images import read_gray_image
from kdseg.data.instances import CYTOPLASM, NUCLEUS, InstanceSample
from kdseg.data.volume import DataError

__all__ = ["read_isbi2014"]

ISBI_MAT_NAME = "isbi_train_GT.mat"
ISBI_CYTO_KEY = "train_Cytoplasm"
ISBI_NUCLEI_KEY = "train_Nuclei"
ISBI_CELLNUM_KEY = "CellNum"


def _isbi_train_dir(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: ISBI 2014 folder not found")
    for cand in (root / "train", root):
        if (cand / "images").is_dir() or (cand / ISBI_MAT_NAME).is_file():
            return cand
    raise DataError(
        f"{root}: not an ISBI 2014 folder (expected train/images/N.tif and train/{ISBI_MAT_NAME})"
    )


def _mat_cells(entry: Any, mat_path: Path, row: int) -> list[np.ndarray]:
    """The list of per-cell masks of one ``train_Cytoplasm`` row."""
    arr = np.asarray(entry)
    if arr.dtype == object:
        return [np.asarray(x) for x in arr.ravel()]
    if arr.ndim == 2:  # a single cell stored directly as a matrix
        return [arr]
    if arr.ndim == 3:  # (H, W, cells) numeric stack
        return [arr[..., k] for k in range(arr.shape[-1])]
    raise DataError(
        f"{mat_path}: {ISBI_CYTO_KEY}[{row}] has unexpected type/shape {arr.dtype} {arr.shape}"
    )


def read_isbi2014(root: Path, min_nucleus_area: int = 5) -> list[InstanceSample]:
    """Read the ISBI 2014 overlapping cervical cytology training set.

    Args:
        root: the ``isbi2014`` folder (holding ``train/``) or the ``train`` folder itself, with
            ``images/N.tif`` (N = 1..36) and ``isbi_train_GT.mat``.
        min_nucleus_area: nucleus connected components smaller than this (pixels) are dropped.

    Returns:
        One sample per image, in order N = 1, 2, ...: ``image_id`` ``"isbi2014_NN"``; the
        cytoplasm masks (one per cell, overlapping, from ``train_Cytoplasm``) first, label 1, then
        the nuclei, label 2, split from the all-nuclei mask ``train_Nuclei`` by 8-connected
        components (in scan order).

    Raises:
        DataError: missing folder/files, a mat without the expected keys, a mask whose shape is
            not the image's, or a cell count different from ``CellNum``.
    """
    import scipy.io
    from skimage import measure

    train = _isbi_train_dir(Path(root))
    mat_path = train / ISBI_MAT_NAME
    img_dir = train / "images"
    if not mat_path.is_file():
        raise DataError(f"{mat_path}: ISBI 2014 ground-truth file not found")
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: ISBI 2014 image folder not found")
    try:
        mat = scipy.io.loadmat(str(mat_path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{mat_path}: cannot read MATLAB file ({exc})") from exc
    keys = sorted(k for k in mat if not k.startswith("__"))
    missing = [k for k in (ISBI_CYTO_KEY, ISBI_NUCLEI_KEY) if k not in mat]
    if missing:
        raise DataError(f"{mat_path}: missing key(s) {missing}; the file has keys {keys}")
    cyto = np.asarray(mat[ISBI_CYTO_KEY], dtype=object).ravel()
    nuclei = np.asarray(mat[ISBI_NUCLEI_KEY], dtype=object).ravel()
    if len(cyto) != len(nuclei):
        raise DataError(
            f"{mat_path}: {ISBI_CYTO_KEY} has {len(cyto)} rows but {ISBI_NUCLEI_KEY} has {len(nuclei)}"
        )
    cellnum = None
    if ISBI_CELLNUM_KEY in mat:
        cellnum = np.asarray(mat[ISBI_CELLNUM_KEY]).ravel().astype(np.int64)
        if len(cellnum) != len(cyto):
            raise DataError(
                f"{mat_path}: {ISBI_CELLNUM_KEY} has {len(cellnum)} entries for {len(cyto)} images"
            )

    samples: list[InstanceSample] = []
    for row in range(len(cyto)):
        n = row + 1
        img_path = img_dir / f"{n}.tif"
        if not img_path.is_file():
            raise DataError(f"{img_path}: image {n} listed in {mat_path.name} not found")
        image = read_gray_image(img_path)
        cells = _mat_cells(cyto[row], mat_path, row)
        if cellnum is not None and len(cells) != int(cellnum[row]):
            raise DataError(
                f"{mat_path}: image {n} has {len(cells)} cytoplasm masks but "
                f"{ISBI_CELLNUM_KEY} says {int(cellnum[row])}"
            )
        cell_masks = []
        for k, m in enumerate(cells):
            m = np.asarray(m)
            if m.shape != image.shape:
                raise DataError(
                    f"{mat_path}: {ISBI_CYTO_KEY} mask {k} of image {n} has shape {m.shape}, "
                    f"image {img_path.name} has shape {image.shape}"
                )
            cell_masks.append(m > 0)
        nuc_all = np.asarray(nuclei[row])
        if nuc_all.dtype == object:  # tolerate a (1,1) wrapper
            nuc_all = np.asarray(nuc_all.ravel()[0]) if nuc_all.size == 1 else nuc_all
        if nuc_all.shape != image.shape:
            raise DataError(
                f"{mat_path}: {ISBI_NUCLEI_KEY} mask of image {n} has shape {nuc_all.shape}, "
                f"image {img_path.name} has shape {image.shape}"
            )
        comp = measure.label(nuc_all > 0, connectivity=2)
        areas = np.bincount(comp.ravel())
        nuc_masks = [comp == c for c in range(1, len(areas)) if areas[c] >= min_nucleus_area]
        masks = np.stack(cell_masks + nuc_masks) if (cell_masks or nuc_masks) else (
            np.zeros((0,) + image.shape, dtype=bool)
        )
        labels = np.array([CYTOPLASM] * len(cell_masks) + [NUCLEUS] * len(nuc_masks), dtype=np.int64)
        samples.append(
            InstanceSample(f"isbi2014_{n:02d}", image, masks, labels, source=img_path)
        )
    return samples
