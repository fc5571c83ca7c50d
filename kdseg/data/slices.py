"""Torch datasets over volumes: 2D training slices (with weak augmentation) and whole volumes.

Training is slice-wise at a fixed ``image_size`` (as SSL4MIS / WSL4MIS); evaluation is per 3D
volume at the original in-plane size, so metrics are comparable with the literature.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from kdseg.data.volume import Volume


def resize_slice(image: Tensor, size: int, mode: str) -> Tensor:
    """Resizes ``(..., H, W)`` to ``(..., size, size)``; ``mode`` is ``bilinear`` or ``nearest``."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    lead = image.shape[:-2]
    x = image.reshape(1, -1, *image.shape[-2:]).float()
    if mode == "nearest":
        out = F.interpolate(x, size=(size, size), mode="nearest-exact")
    else:
        out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*lead, size, size)


def weak_augment(
    image: Tensor, target: Tensor | None, target_fill: int, max_rotation_degrees: float
) -> tuple[Tensor, Tensor | None]:
    """SSL4MIS's weak augmentation: with p=0.5 a random rot90 + flip, otherwise with p=0.5 a small
    rotation in ``[-max_rotation_degrees, max_rotation_degrees]``.

    Args:
        image: ``(1, H, W)`` float.
        target: ``(H, W)`` long or None. Pixels a rotation brings in from outside get
            ``target_fill``: background (0) for dense labels, the ignore value for scribbles (an
            unannotated corner must not turn into background supervision).
    """
    if torch.rand(()) < 0.5:
        k = int(torch.randint(0, 4, ()))
        image = torch.rot90(image, k, dims=(-2, -1))
        target = None if target is None else torch.rot90(target, k, dims=(-2, -1))
        if torch.rand(()) < 0.5:
            image = torch.flip(image, dims=(-1,))
            target = None if target is None else torch.flip(target, dims=(-1,))
    elif torch.rand(()) < 0.5 and max_rotation_degrees > 0:
        angle = float((torch.rand(()) * 2 - 1) * max_rotation_degrees)
        image = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        if target is not None:
            target = TF.rotate(
                target[None], angle, interpolation=InterpolationMode.NEAREST, fill=float(target_fill)
            )[0]
    return image.contiguous(), None if target is None else target.contiguous()


class SliceDataset(Dataset):
    """All 2D slices of some volumes, resized to ``image_size``, optionally weakly augmented.

    Items: ``{"image": (1, S, S) float32, "target": (S, S) long (if ``target_key``),
    "case_id": str, "slice_index": int}``.

    Args:
        volumes: the volumes whose slices are served.
        target_key: ``"label"``, ``"scribble"`` or None (unlabeled: no target is ever served).
        image_size: output size S.
        augment: apply :func:`weak_augment`.
        target_fill: value for pixels rotated in from outside (see :func:`weak_augment`).
    """

    def __init__(
        self,
        volumes: list[Volume],
        target_key: str | None,
        image_size: int,
        augment: bool,
        target_fill: int = 0,
        max_rotation_degrees: float = 20.0,
    ) -> None:
        self.volumes = volumes
        self.target_key = target_key
        self.image_size = image_size
        self.augment = augment
        self.target_fill = target_fill
        self.max_rotation_degrees = max_rotation_degrees
        self.index = [(v, s) for v, vol in enumerate(volumes) for s in range(vol.num_slices)]
        # Resized slices, filled on first use: resizing (antialiased) cost a third of an item's time
        # and gives the same result every epoch. Targets keep their source dtype (uint8 / uint16) to
        # hold a quarter to an eighth of int64's memory; the served copies are int64 as before.
        self._resized: dict[int, tuple[Tensor, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def resized(self, i: int) -> tuple[Tensor, Tensor | None]:
        """Slice ``i`` at ``image_size``: image ``(1, S, S)`` float32, target ``(S, S)`` long or None
        (fresh tensors: the cache is never handed out)."""
        if i not in self._resized:
            v, s = self.index[i]
            volume = self.volumes[v]
            image = resize_slice(torch.from_numpy(np.ascontiguousarray(volume.image[s]))[None], self.image_size,
                                 "bilinear").float()
            stored = None
            if self.target_key is not None:
                array = getattr(volume, self.target_key)
                target = resize_slice(torch.from_numpy(array[s].astype(np.int64)), self.image_size, "nearest").long()
                stored = target.numpy().astype(array.dtype)
            self._resized[i] = (image, stored)
        image, stored = self._resized[i]
        return image.clone(), None if stored is None else torch.from_numpy(stored.astype(np.int64))

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, s = self.index[i]
        volume = self.volumes[v]
        image, target = self.resized(i)
        if self.augment:
            image, target = weak_augment(image, target, self.target_fill, self.max_rotation_degrees)
        item: dict[str, Any] = {"image": image.float(), "case_id": volume.case_id, "slice_index": s}
        if target is not None:
            item["target"] = target
        return item


class VolumeDataset(Dataset):
    """Whole volumes for validation, test and prediction (batch size 1, see :func:`first_item`).

    Items: ``{"image": (D, H, W) float32, "label": (D, H, W) long (when known), "case_id": str,
    "index": int, "spacing": (3,) float64 (NaN when unknown), "input_size": int}``.
    """

    def __init__(self, volumes: list[Volume], input_size: int) -> None:
        self.volumes = volumes
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        volume = self.volumes[i]
        spacing = volume.spacing if volume.spacing is not None else (math.nan,) * 3
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(volume.image)).float(),
            "case_id": volume.case_id,
            "index": i,
            "spacing": torch.tensor(spacing, dtype=torch.float64),
            "input_size": self.input_size,
        }
        if volume.label is not None:
            item["label"] = torch.from_numpy(volume.label.astype(np.int64))
        return item


def first_item(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate for batch size 1 over volumes of different sizes: the item itself."""
    if len(batch) != 1:
        raise ValueError("volume loaders use batch_size=1 (volumes differ in size)")
    return batch[0]
