"""Cytology images read as grayscale float32 in [0, 1], and folders of images without annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdseg.data.instances import InstanceSample
from kdseg.data.volume import DataError

__all__ = ["read_gray_image", "read_unlabeled_images"]


def _to_gray_float01(arr: np.ndarray, path: Path) -> np.ndarray:
    """Grayscale float32 in [0, 1] from a 2D, (1,H,W), (H,W,1), RGB or RGBA image."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        from skimage.color import rgb2gray

        rgb = arr[..., :3]
        if np.issubdtype(rgb.dtype, np.integer):
            rgb = rgb.astype(np.float64) / float(np.iinfo(rgb.dtype).max)
        arr = rgb2gray(rgb.astype(np.float64))
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2D grayscale or RGB image, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return (arr.astype(np.float64) / float(np.iinfo(arr.dtype).max)).astype(np.float32)
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: image contains NaN or inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:  # float image not in [0, 1]: min-max rescale
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return arr.astype(np.float32)


def read_gray_image(path: Path) -> np.ndarray:
    """One image file as grayscale float32 ``(H, W)`` in [0, 1]; DataError if missing or unreadable."""
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        from skimage import io

        arr = io.imread(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is bad input
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    return _to_gray_float01(arr, path)


def _empty_sample(image_id: str, image: np.ndarray, source: Path | None) -> InstanceSample:
    return InstanceSample(
        image_id=image_id,
        image=image,
        masks=np.zeros((0,) + image.shape, dtype=bool),
        labels=np.zeros((0,), dtype=np.int64),
        source=source,
    )


def read_unlabeled_images(
    folder: Path, pattern: str = "*.png", size: int | None = 512
) -> list[InstanceSample]:
    """Read a folder of images without annotations (e.g. the EDF images) as unlabeled samples.

    Args:
        folder: the folder; files matching ``pattern`` are read in sorted name order.
        pattern: glob pattern.
        size: the longer side after resizing (aspect ratio kept; bilinear with anti-aliasing),
            so 1024x1024 EDF images become 512x512 like the ISBI training images. None keeps
            the original size.

    Returns:
        Samples with ``image_id`` = file stem and empty masks ``(0, H, W)``.
    """
    from skimage.transform import resize

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not files:
        raise DataError(f"{folder}: no files match {pattern!r}")
    if size is not None and size < 1:
        raise ValueError(f"size must be positive or None, got {size}")
    samples = []
    for path in files:
        image = read_gray_image(path)
        if size is not None and max(image.shape) != size:
            scale = size / max(image.shape)
            shape = tuple(max(1, int(round(s * scale))) for s in image.shape)
            image = resize(
                image, shape, order=1, anti_aliasing=scale < 1, preserve_range=True
            ).astype(np.float32)
            image = np.clip(image, 0.0, 1.0)
        samples.append(_empty_sample(path.stem, image, path))
    return samples
