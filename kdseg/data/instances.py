"""Instance-segmentation records and readers for overlapping cervical cells.

Every reader returns :class:`InstanceSample` records: one 2D grayscale image with a stack of
boolean instance masks, one per object, **overlapping allowed** (a cell's cytoplasm may lie
over another cell's). The masks are never flattened to a label map, because a label map cannot
represent a pixel that belongs to two cells.

Readers:

- :func:`read_isbi2014`: the ISBI 2014 overlapping cervical cytology training set
  (``train/images/N.tif`` + ``train/isbi_train_GT.mat``).
- :func:`read_unlabeled_images`: a folder of images without annotations (e.g. the 16 EDF
  1024x1024 images), resized to the training scale.
- :func:`read_coco`: a COCO instance-segmentation JSON (polygons, compressed or uncompressed RLE).

Class ids follow torchvision's detection models (0 is background): 1 = cytoplasm, 2 = nucleus.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdseg.data.volume import DataError

CYTOPLASM = 1
NUCLEUS = 2
CLASS_NAMES: dict[int, str] = {CYTOPLASM: "cytoplasm", NUCLEUS: "nucleus"}
DEFAULT_CATEGORY_MAP: dict[str, int] = {"cytoplasm": CYTOPLASM, "nucleus": NUCLEUS}

ISBI_MAT_NAME = "isbi_train_GT.mat"
ISBI_CYTO_KEY = "train_Cytoplasm"
ISBI_NUCLEI_KEY = "train_Nuclei"
ISBI_CELLNUM_KEY = "CellNum"


@dataclass
class InstanceSample:
    """One 2D image with its instance masks.

    Attributes:
        image_id: unique name of the image (used in per-image metric rows).
        image: float32 ``(H, W)`` grayscale intensities in [0, 1].
        masks: bool ``(N, H, W)``, one mask per instance; instances may overlap. ``(0, H, W)``
            for unlabeled images.
        labels: int64 ``(N,)`` class of each instance: 1 = cytoplasm (whole cell extent,
            nucleus included, as in ISBI 2014), 2 = nucleus. 0 is reserved for background.
        source: the file the image was read from (None for generated data).
    """

    image_id: str
    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    source: Path | None = None

    def __post_init__(self) -> None:
        where = str(self.source) if self.source is not None else self.image_id
        self.image = np.asarray(self.image, dtype=np.float32)
        if self.image.ndim != 2:
            raise DataError(f"{where}: image must be 2D (H, W), got shape {self.image.shape}")
        masks = np.asarray(self.masks)
        if masks.ndim != 3:
            raise DataError(f"{where}: masks must be (N, H, W), got shape {masks.shape}")
        if masks.shape[1:] != self.image.shape:
            raise DataError(
                f"{where}: mask shape {masks.shape[1:]} != image shape {self.image.shape}"
            )
        self.masks = masks.astype(bool, copy=False)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if labels.shape[0] != masks.shape[0]:
            raise DataError(
                f"{where}: {labels.shape[0]} labels for {masks.shape[0]} masks"
            )
        self.labels = labels

    @property
    def num_instances(self) -> int:
        return int(self.masks.shape[0])

    @property
    def boxes(self) -> np.ndarray:
        """float32 ``(N, 4)`` boxes ``x1, y1, x2, y2`` enclosing each mask.

        Pixel-edge convention: a mask covering columns 3..7 gives ``x1 = 3, x2 = 8``, so even a
        one-pixel mask has a positive width and height (torchvision rejects degenerate boxes).
        An empty mask gives ``0, 0, 0, 0``.
        """
        out = np.zeros((self.num_instances, 4), dtype=np.float32)
        for i, m in enumerate(self.masks):
            rows = np.flatnonzero(m.any(axis=1))
            cols = np.flatnonzero(m.any(axis=0))
            if rows.size == 0:
                continue
            out[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        return out

    def to_target(self) -> dict[str, Any]:
        """The target dict torchvision's detection models (Mask R-CNN) expect.

        ``boxes`` float32 ``(N, 4)`` xyxy, ``labels`` int64 ``(N,)``, ``masks`` uint8 ``(N, H, W)``.
        """
        import torch

        return {
            "boxes": torch.from_numpy(self.boxes),
            "labels": torch.from_numpy(self.labels.copy()),
            "masks": torch.from_numpy(self.masks.astype(np.uint8)),
        }


# --------------------------------------------------------------------------- helpers


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


def _read_image(path: Path) -> np.ndarray:
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


# --------------------------------------------------------------------------- ISBI 2014


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
        image = _read_image(img_path)
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


# --------------------------------------------------------------------------- unlabeled


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
        image = _read_image(path)
        if size is not None and max(image.shape) != size:
            scale = size / max(image.shape)
            shape = tuple(max(1, int(round(s * scale))) for s in image.shape)
            image = resize(
                image, shape, order=1, anti_aliasing=scale < 1, preserve_range=True
            ).astype(np.float32)
            image = np.clip(image, 0.0, 1.0)
        samples.append(_empty_sample(path.stem, image, path))
    return samples


# --------------------------------------------------------------------------- COCO


def _decode_segmentation(seg: Any, h: int, w: int, json_path: Path, ann_id: Any) -> np.ndarray:
    from pycocotools import mask as mask_utils

    try:
        if isinstance(seg, list):  # polygons
            polys = [list(map(float, p)) for p in seg if len(p) >= 6]
            if not polys:
                raise ValueError("no polygon with at least 3 points")
            outside = _polygon_points_outside(polys, h, w)
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        elif isinstance(seg, dict) and "counts" in seg:
            size = [int(s) for s in seg.get("size", [h, w])]
            if size != [h, w]:
                raise DataError(
                    f"{json_path}: annotation {ann_id} RLE size {size} != image size {[h, w]}"
                )
            counts = seg["counts"]
            if isinstance(counts, list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(seg, h, w)
            else:  # compressed RLE string
                rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"unsupported segmentation of type {type(seg).__name__}")
        m = mask_utils.decode(rle)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{json_path}: annotation {ann_id}: bad segmentation ({exc})") from exc
    if m.ndim == 3:
        m = m.any(axis=2)
    if isinstance(seg, list) and outside:
        # pycocotools rasterises only the part inside the image: say so, refuse if nothing is left.
        if not m.any():
            raise DataError(f"{json_path}: annotation {ann_id}: the polygon lies wholly outside the "
                            f"{h}x{w} image (no pixel left after clipping)")
        warnings.warn(f"{json_path}: annotation {ann_id}: {outside} polygon point(s) outside the "
                      f"{h}x{w} image; the mask is clipped to the image", stacklevel=2)
    return m.astype(bool)


def _polygon_points_outside(polys: list[list[float]], h: int, w: int) -> int:
    """How many ``(x, y)`` points of COCO polygons lie outside ``[0, w] x [0, h]`` (COCO polygon
    coordinates are pixel-edge positions, so ``x = w`` is the image's right border)."""
    points = np.concatenate([np.asarray(p[: len(p) // 2 * 2], dtype=np.float64).reshape(-1, 2) for p in polys])
    inside = (points[:, 0] >= 0) & (points[:, 0] <= w) & (points[:, 1] >= 0) & (points[:, 1] <= h)
    return int((~inside).sum())


def read_coco(
    json_path: Path,
    image_root: Path,
    category_map: dict[str, int] | None = None,
    include_crowd: bool = False,
) -> list[InstanceSample]:
    """Read a COCO instance-segmentation JSON.

    Args:
        json_path: the COCO JSON (``images``, ``annotations``, ``categories``).
        image_root: folder the images' ``file_name`` are relative to. Grayscale or RGB(A)
            images (RGB is converted to gray).
        category_map: category name -> label, matched case-insensitively; default
            ``{"cytoplasm": 1, "nucleus": 2}``.
        include_crowd: keep ``iscrowd = 1`` annotations (skipped by default: COCO treats them as
            regions to ignore, not instances).

    Returns:
        One sample per entry of ``images`` (in file order, also images without annotations),
        ``image_id`` = ``file_name`` without extension; annotations in file order.
        Segmentations may be polygons, uncompressed RLE (``counts`` list) or compressed RLE.

    Raises:
        DataError: unreadable JSON, missing image file, an annotation referring to an image or
            category not listed, a category name not in ``category_map``, or a size mismatch.
    """
    json_path = Path(json_path)
    image_root = Path(image_root)
    if not json_path.is_file():
        raise DataError(f"{json_path}: COCO JSON not found")
    try:
        data = json.loads(json_path.read_text())
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{json_path}: cannot parse JSON ({exc})") from exc
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DataError(f"{json_path}: not a COCO instance file (needs 'images' and 'annotations')")
    cmap = {k.lower(): int(v) for k, v in (category_map or DEFAULT_CATEGORY_MAP).items()}
    categories = {c["id"]: str(c.get("name", c["id"])) for c in data.get("categories", [])}

    images = {}
    for im in data["images"]:
        if "id" not in im or "file_name" not in im:
            raise DataError(f"{json_path}: image entry without 'id' or 'file_name': {im}")
        images[im["id"]] = im
    anns_by_image: dict[Any, list[dict]] = {k: [] for k in images}
    for ann in data["annotations"]:
        ann_id = ann.get("id", "?")
        if ann.get("image_id") not in images:
            raise DataError(
                f"{json_path}: annotation {ann_id} refers to image_id {ann.get('image_id')!r} "
                "which is not in 'images'"
            )
        cat_id = ann.get("category_id")
        if cat_id not in categories:
            raise DataError(
                f"{json_path}: annotation {ann_id} refers to category_id {cat_id!r} "
                f"not in 'categories' {sorted(categories)}"
            )
        name = categories[cat_id]
        if name.lower() not in cmap:
            raise DataError(
                f"{json_path}: unknown category {name!r} (id {cat_id}); "
                f"category_map knows {sorted(cmap)}"
            )
        if ann.get("iscrowd", 0) and not include_crowd:
            continue
        anns_by_image[ann["image_id"]].append(ann)

    samples = []
    for img_id, im in images.items():
        path = image_root / im["file_name"]
        if not path.is_file():
            raise DataError(f"{json_path}: image {im['file_name']!r} not found at {path}")
        image = _read_image(path)
        h, w = image.shape
        if ("height" in im and int(im["height"]) != h) or ("width" in im and int(im["width"]) != w):
            raise DataError(
                f"{json_path}: image {im['file_name']!r} is {h}x{w} but the JSON says "
                f"{im.get('height')}x{im.get('width')}"
            )
        masks, labels = [], []
        for ann in anns_by_image[img_id]:
            m = _decode_segmentation(ann.get("segmentation"), h, w, json_path, ann.get("id", "?"))
            masks.append(m)
            labels.append(cmap[categories[ann["category_id"]].lower()])
        stack = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
        stem = str(Path(im["file_name"]).with_suffix("").as_posix())
        samples.append(InstanceSample(stem, image, stack, np.array(labels, dtype=np.int64), path))
    return samples


# --------------------------------------------------------------------------- splits


def split_labeled(
    samples: Sequence[InstanceSample],
    num_labeled: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> tuple[list[InstanceSample], list[InstanceSample]]:
    """Deterministic random split into (labeled, unlabeled); give exactly one of the sizes.

    Args:
        samples: all samples.
        num_labeled: how many are labeled.
        fraction: the labeled fraction in [0, 1] (rounded, at least 1 when > 0).
        seed: the same seed and input give the same split.

    Returns:
        ``(labeled, unlabeled)``, each in the input order. Unlabeled samples are returned as
        they are (masks kept); ignoring their masks is the caller's job.
    """
    n = len(samples)
    if (num_labeled is None) == (fraction is None):
        raise ValueError("give exactly one of num_labeled and fraction")
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        num_labeled = int(round(fraction * n))
        if fraction > 0 and n > 0:
            num_labeled = max(1, num_labeled)
    assert num_labeled is not None
    if not 0 <= num_labeled <= n:
        raise ValueError(f"num_labeled must be in [0, {n}], got {num_labeled}")
    perm = np.random.default_rng(seed).permutation(n)
    chosen = set(perm[:num_labeled].tolist())
    labeled = [s for i, s in enumerate(samples) if i in chosen]
    unlabeled = [s for i, s in enumerate(samples) if i not in chosen]
    return labeled, unlabeled
