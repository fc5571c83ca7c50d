"""HD95 and ASD of two non-empty boolean masks, in one of two conventions.

``"medpy"`` (the default everywhere in kdseg) is the papers' convention. SSL4MIS and WSL4MIS
score ACDC with ``medpy.metric.binary`` on each whole 3D test volume, per class
(``calculate_metric_percase`` in SSL4MIS ``code/test_2D_fully.py`` and WSL4MIS
``code/test_2D_fully.py``): ``hd95(pred, gt)`` and ``asd(pred, gt)``, called **without**
``voxelspacing``, so distances are in voxel index units (SSL4MIS ``code/val_2D.py``, used for
checkpoint selection, calls ``hd95`` without spacing in one stored revision and with
``voxelspacing=[10, 1, 1]`` in another). medpy itself is called here, so the numbers are medpy's:

* surface of a mask: ``mask XOR binary_erosion(mask)``, face-connected structuring element
  (``connectivity=1``), outside the array counted as background;
* ``hd95``: 95th percentile (numpy, linear interpolation) of the distances of *both* directions
  pooled, ``p95(d(P→G) ∪ d(G→P))``;
* ``asd``: the *directed* mean ``mean(d(P→G))`` from the prediction's surface to the ground
  truth's (medpy's ``asd``; its symmetric ``assd`` is not what the papers' code calls).

``"monai"`` is kdseg's earlier convention, kept as an option: MONAI 1.6.1
``compute_hausdorff_distance(percentile=95)``, the larger of the two *directed* 95th percentiles
``max(p95(d(P→G)), p95(d(G→P)))``, and ``compute_average_surface_distance(symmetric=True)``,
both directions pooled ``(Σd(P→G) + Σd(G→P)) / (|∂P| + |∂G|)``. Same surface definition.

Both take an optional voxel spacing in the array's axis order (distances then in mm); whether
a caller passes one is its choice (see :class:`kdseg.methods.base.SegmentationMethod`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["DISTANCE_CONVENTIONS", "check_convention", "surface_distances"]

#: The accepted values of ``distance_convention``.
DISTANCE_CONVENTIONS: tuple[str, ...] = ("medpy", "monai")


def check_convention(convention: str) -> str:
    """``convention`` itself, or ValueError naming the accepted values."""
    if convention not in DISTANCE_CONVENTIONS:
        raise ValueError(
            f"distance_convention must be one of {', '.join(DISTANCE_CONVENTIONS)}, got {convention!r}"
        )
    return convention


def _medpy(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None) -> tuple[float, float]:
    from medpy.metric.binary import asd, hd95

    return float(hd95(pred, gt, voxelspacing=spacing)), float(asd(pred, gt, voxelspacing=spacing))


def _monai(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None) -> tuple[float, float]:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p = torch.from_numpy(np.ascontiguousarray(pred))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(gt))[None, None]
    with warnings.catch_warnings():
        # MONAI 1.6.1 passes its own deprecated `always_return_as_numpy` argument internally
        # (get_edge_surface_distance -> get_mask_edges), emitting a FutureWarning every call.
        warnings.filterwarnings("ignore", message=r".*always_return_as_numpy.*", category=FutureWarning)
        hd = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing)
        mean = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=spacing)
    return float(hd.reshape(-1)[0]), float(mean.reshape(-1)[0])


def surface_distances(
    prediction: np.ndarray,
    target: np.ndarray,
    spacing: tuple[float, ...] | None = None,
    convention: str = "medpy",
) -> tuple[float, float]:
    """``(hd95, asd)`` of two boolean masks of the same shape ``(D, H, W)`` or ``(H, W)``.

    Args:
        prediction, target: boolean masks, both non-empty (the caller applies its policy for
            empty masks first; medpy raises on them and MONAI returns nan).
        spacing: voxel size per axis in the array's order, or None for voxel units.
        convention: ``"medpy"`` or ``"monai"`` (module docstring).
    """
    check_convention(convention)
    p = np.asarray(prediction, dtype=bool)
    g = np.asarray(target, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction and target shapes differ: {p.shape} vs {g.shape}")
    if not p.any() or not g.any():
        raise ValueError("surface distances need two non-empty masks")
    return _medpy(p, g, spacing) if convention == "medpy" else _monai(p, g, spacing)
