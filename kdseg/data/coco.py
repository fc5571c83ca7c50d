"""Reader of COCO instance-segmentation JSON (polygons, compressed or uncompressed RLE) as
:class:`InstanceSample` records."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kdseg.data.cell_images import read_gray_image
from kdseg.data.instances import CYTOPLASM, NUCLEUS, InstanceSample
from kdseg.data.volume import DataError

__all__ = ["DEFAULT_CATEGORY_MAP", "read_coco"]

DEFAULT_CATEGORY_MAP: dict[str, int] = {"cytoplasm": CYTOPLASM, "nucleus": NUCLEUS}


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
        image = read_gray_image(path)
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
