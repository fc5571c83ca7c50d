"""Instance-segmentation records for overlapping cervical cells, and their labeled / unlabeled split.

An :class:`InstanceSample` is one 2D grayscale image with a stack of boolean instance masks, one
per object, **overlapping allowed** (a cell's cytoplasm may lie over another cell's). The masks
are never flattened to a label map, because a label map cannot represent a pixel that belongs to
two cells.

Readers returning these records: :func:`~kdseg.data.isbi2014.read_isbi2014` (the ISBI 2014
training set), :func:`~kdseg.data.cell_images.read_unlabeled_images` (a folder of images without
annotations, e.g. the EDF images) and :func:`~kdseg.data.coco.read_coco` (a COCO instance JSON).

Class ids follow torchvision's detection models (0 is background): 1 = cytoplasm, 2 = nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdseg.data.volume import DataError

__all__ = ["CLASS_NAMES", "CYTOPLASM", "NUCLEUS", "InstanceSample", "split_labeled"]

CYTOPLASM = 1
NUCLEUS = 2
CLASS_NAMES: dict[int, str] = {CYTOPLASM: "cytoplasm", NUCLEUS: "nucleus"}


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
