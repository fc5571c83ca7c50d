"""Checks of the arrays read from disk: keys, dtypes, value ranges, shapes and finiteness.

Each check returns the array in the dtype a :class:`~kdseg.data.volume.Volume` holds (image
float32, label and scribble uint8) or raises one :class:`DataError` naming the file and what was
expected.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from kdseg.data.volume import DataError

__all__ = ["ARRAY_KEYS", "check_image", "check_label", "check_params", "check_require", "validated_arrays"]

#: The arrays a case file may hold.
ARRAY_KEYS = ("image", "label", "scribble")


def check_require(require: Iterable[str]) -> tuple[str, ...]:
    """``require`` as a tuple; ValueError when it names a key other than :data:`ARRAY_KEYS`."""
    require = tuple(require)
    bad = [k for k in require if k not in ARRAY_KEYS]
    if bad:
        raise ValueError(f"require names unknown keys {bad}: expected some of {ARRAY_KEYS}")
    return require


def _values(arr: np.ndarray, limit: int = 20) -> str:
    vals = np.unique(arr)
    shown = ", ".join(str(v.item()) for v in vals[:limit])
    return f"[{shown}{', ...' if len(vals) > limit else ''}]"


def _to_int_mask(arr: np.ndarray, where: str, what: str) -> np.ndarray:
    """Integer array (int64-safe) from a label/scribble array; DataError if not integral."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "iub":
        return arr
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{where}: {what} must hold integer class values, found "
                            f"non-integer values (dtype {arr.dtype})")
        return arr.astype(np.int64)
    raise DataError(f"{where}: {what} must be an integer array, found dtype {arr.dtype}")


def check_label(arr: np.ndarray, where: str, num_classes: int) -> np.ndarray:
    """A label map as uint8 with values in ``[0, num_classes)``."""
    arr = _to_int_mask(arr, where, "'label'")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(f"{where}: 'label' values must be in 0..{num_classes - 1} "
                        f"(num_classes={num_classes}), found values {_values(arr)}")
    return arr.astype(np.uint8, copy=False)


def _check_scribble(arr: np.ndarray, where: str, num_classes: int, ignore: int) -> np.ndarray:
    arr = _to_int_mask(arr, where, "'scribble'")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        bad = (arr < 0) | ((arr >= num_classes) & (arr != ignore))
        if np.any(bad):
            raise DataError(f"{where}: 'scribble' values must be in 0..{num_classes - 1} or "
                            f"the ignore value {ignore}, found values {_values(arr)}")
    return arr.astype(np.uint8, copy=False)


def check_image(arr: np.ndarray, where: str, ndim: int) -> np.ndarray:
    """A non-empty, finite, numeric ``ndim``-D image as float32."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{where}: 'image' must be numeric, found dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise DataError(f"{where}: 'image' must be {ndim}D, found shape {arr.shape}")
    if arr.size == 0:  # 0 slices would train on nothing or fail later in validation
        raise DataError(f"{where}: 'image' is empty (shape {arr.shape}): a volume needs at least "
                        "one slice of at least one pixel")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        n = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise DataError(f"{where}: 'image' contains {n} NaN/inf values")
    return arr


def _check_shape(name: str, arr: np.ndarray, image: np.ndarray, where: str) -> None:
    if arr.shape != image.shape:
        raise DataError(f"{where}: '{name}' shape {arr.shape} does not match 'image' "
                        f"shape {image.shape}")


def validated_arrays(arrays: dict[str, np.ndarray], where: str, num_classes: int,
               ignore: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``(image, label, scribble)`` of one file, checked (absent label / scribble stay None)."""
    image = check_image(arrays["image"], where, arrays["image"].ndim)
    label = scribble = None
    if arrays.get("label") is not None:
        _check_shape("label", arrays["label"], image, where)
        label = check_label(arrays["label"], where, num_classes)
    if arrays.get("scribble") is not None:
        _check_shape("scribble", arrays["scribble"], image, where)
        scribble = _check_scribble(arrays["scribble"], where, num_classes, ignore)
    return image, label, scribble


def check_params(num_classes: int, ignore: int) -> None:
    """ValueError unless ``num_classes`` and the scribble ignore value fit in uint8."""
    if num_classes < 1 or num_classes > 255:
        raise ValueError(f"num_classes must be in 1..255, got {num_classes}")
    if not 0 <= ignore <= 255:
        raise ValueError(f"scribble_ignore_index must be in 0..255 (stored as uint8), "
                         f"got {ignore}")
