"""The one record every reader and generator returns: a 3D volume and what is known about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Bad input data: the message names the file (or key) and what was expected."""


@dataclass
class Volume:
    """One 3D image with its optional dense label and scribble.

    Arrays are ``(D, H, W)``: slices first, as in the ACDC HDF5 files and SimpleITK order.

    Attributes:
        case_id: unique name of the volume, e.g. ``patient001_frame01``.
        patient_id: the patient it belongs to (splits are by patient), e.g. ``patient001``.
        image: float32 ``(D, H, W)``, intensities scaled to [0, 1].
        label: uint8 ``(D, H, W)`` dense label (0 = background, 1..C-1 structures) or None.
        scribble: uint8 ``(D, H, W)`` scribble (0..C-1, ``scribble_ignore_index`` = not
            annotated) or None.
        spacing: voxel size in mm as ``(z, y, x)``, or None when unknown (metrics then in pixels).
        source: the file it was read from (None for generated data).
        source_format: ``"h5"``, ``"h5_slices"``, ``"nifti"`` or ``"phantom"``.
        affine: the NIfTI affine of the source, kept so predictions can be written back.
    """

    case_id: str
    patient_id: str
    image: np.ndarray
    label: np.ndarray | None = None
    scribble: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    source: Path | None = None
    source_format: str = "h5"
    affine: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])
