"""Per-volume, per-class segmentation metrics: Dice, HD95 and ASD.

Every metric is computed on one whole 3D volume ``(D, H, W)`` (or one 2D image ``(H, W)``)
for each foreground class ``1 .. C-1``; background (class 0) is never scored. Distances are
in mm when the voxel spacing is known (``spacing`` in the same axis order as the array, e.g.
``(z, y, x)``) and in pixels (unit spacing) otherwise; :func:`distance_unit` names the unit.

* **Dice** ``2|P∩G| / (|P| + |G|)`` (a small pure function, :func:`dice_score`).
* **HD95** from :func:`monai.metrics.compute_hausdorff_distance` with ``percentile=95``.
* **ASD** (average *symmetric* surface distance) from
  :func:`monai.metrics.compute_average_surface_distance` with ``symmetric=True``.

What MONAI 1.6.1 computes (checked against its source and against an independent scipy
implementation in ``tests/test_segmentation_metrics.py``):

* The surface ("edge") of a mask is ``mask XOR binary_erosion(mask)`` with scipy's default
  structuring element, i.e. the *face*-connected cross (6-neighbourhood in 3D, 4 in 2D),
  not the full 26/8-neighbourhood, with everything outside the array counted as background
  (a mask touching the array border has a surface there).
* Distances are from each surface voxel of one mask to the nearest surface voxel of the
  other (voxel centres scaled by the spacing), so a voxel of P lying inside G still has a
  non-zero distance to G's surface.
* HD95 is ``max(p95(d(P→G)), p95(d(G→P)))``: the larger of the two *directed* 95th
  percentiles (linear interpolation, ``torch.quantile``). medpy's ``hd95`` instead takes
  the 95th percentile of both directions pooled, so numbers are not interchangeable.
* ASD is the mean of both directions pooled, ``(Σd(P→G) + Σd(G→P)) / (|∂P| + |∂G|)``
  (DeepMind surface-distance style); medpy's ``assd`` is the mean of the two directed means.

Empty-case policy (decided here, *before* MONAI is called, so MONAI never sees an empty
mask and its "is all 0, this may result in nan/inf distance" warnings cannot appear; MONAI
itself would return nan for such cases):

================  =========================  ======  =============================
status            ground truth / prediction  Dice    HD95 and ASD
================  =========================  ======  =============================
``"ok"``          present / present          Dice    from MONAI
``"both_empty"``  absent / absent            1.0     0.0
``"missed"``      present / absent           0.0     diagonal of the volume
``"spurious"``    absent / present           0.0     diagonal of the volume
================  =========================  ======  =============================

Reasons: an absent structure that is predicted absent is a correct prediction (perfect
scores). A missed or spurious structure has no surface pair to measure, and the widely
copied SSL4MIS ``calculate_metric_percase`` (medpy-based) returns a distance of 0 for it,
which *rewards* a miss with a perfect boundary score; dropping the case would hide it too.
Here it is penalised as the worst possible distance, the diagonal of the volume's physical
extent ``sqrt(sum((n_i * s_i) ** 2))`` (``s_i = 1`` without spacing), and the status is
kept so that :func:`summarize` can count misses per class.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

__all__ = [
    "ClassMetrics",
    "STATUSES",
    "dice_score",
    "distance_unit",
    "summarize",
    "volume_diagonal",
    "volume_metrics",
]

#: Every value :attr:`ClassMetrics.status` can take.
STATUSES: tuple[str, ...] = ("ok", "missed", "spurious", "both_empty")

_METRICS: tuple[str, ...] = ("dice", "hd95", "asd")


@dataclass
class ClassMetrics:
    """Metrics of one foreground class in one volume.

    Attributes:
        dice: Dice coefficient in [0, 1].
        hd95: 95th-percentile symmetric Hausdorff distance (mm, or pixels without spacing);
            nan when surface metrics were not requested.
        asd: average symmetric surface distance (same unit); nan when not requested.
        status: ``"ok"``, ``"missed"`` (in ground truth, prediction empty), ``"spurious"``
            (predicted, ground truth empty) or ``"both_empty"``; see the module docstring.
    """

    dice: float
    hd95: float
    asd: float
    status: str

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (JSON-serialisable apart from nan)."""
        return asdict(self)


def distance_unit(spacing: Sequence[float] | None) -> str:
    """Unit of HD95/ASD: ``"mm"`` when a spacing is known, ``"pixel"`` otherwise."""
    return "pixel" if spacing is None else "mm"


def dice_score(prediction: np.ndarray, target: np.ndarray) -> float:
    """Dice ``2|P∩G| / (|P| + |G|)`` of two boolean masks of the same shape (any shape).

    Returns 1.0 when both masks are empty (correctly predicted absence).
    """
    p = np.asarray(prediction, dtype=bool)
    g = np.asarray(target, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction and target shapes differ: {p.shape} vs {g.shape}")
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / total


def volume_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    """Diagonal of the volume's physical extent, ``sqrt(sum((n_i * s_i) ** 2))``.

    Args:
        shape: spatial shape ``(D, H, W)`` or ``(H, W)``.
        spacing: voxel size per axis in the same order, or None for unit spacing (pixels).
    """
    s = (1.0,) * len(shape) if spacing is None else tuple(float(v) for v in spacing)
    return float(math.sqrt(sum((n * v) ** 2 for n, v in zip(shape, s, strict=True))))


def _to_numpy_labels(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == bool or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise TypeError(f"{name} must be an integer label array, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)) or not np.all(x == np.round(x)):
            raise TypeError(f"{name} must hold integer labels, got non-integer values of dtype {x.dtype}")
    return x.astype(np.int64, copy=False)


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    s = tuple(float(v) for v in spacing)
    if len(s) != ndim:
        raise ValueError(f"spacing {s} has {len(s)} values for a {ndim}D array (same axis order expected)")
    if not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing must be positive and finite, got {s}")
    return s


def _monai_surface_metrics(
    pred_onehot: torch.Tensor, gt_onehot: torch.Tensor, spacing: tuple[float, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """HD95 and ASD per channel of ``(1, K, *spatial)`` bool one-hot masks, all non-empty."""
    with warnings.catch_warnings():
        # Empty masks never reach MONAI (policy above); this only guards against the message.
        warnings.filterwarnings("ignore", message=r".*is all 0, this may result in nan/inf distance.*")
        # MONAI 1.6.1 passes its own deprecated `always_return_as_numpy` argument internally
        # (get_edge_surface_distance -> get_mask_edges), emitting a FutureWarning every call.
        warnings.filterwarnings("ignore", message=r".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(
            pred_onehot, gt_onehot, include_background=True, percentile=95, spacing=spacing
        )
        asd = compute_average_surface_distance(
            pred_onehot, gt_onehot, include_background=True, symmetric=True, spacing=spacing
        )
    return hd95[0].double().numpy(), asd[0].double().numpy()


def volume_metrics(
    prediction: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    num_classes: int,
    spacing: tuple[float, ...] | None = None,
    surface: bool = True,
) -> dict[int, ClassMetrics]:
    """Dice, HD95 and ASD of every foreground class of one volume.

    Args:
        prediction: integer labels ``(D, H, W)`` or ``(H, W)``, values in ``[0, num_classes)``.
        target: ground-truth labels, same shape and range.
        num_classes: number of classes ``C`` including background; classes ``1..C-1`` are scored.
        spacing: voxel size in the same axis order as the arrays (e.g. ``(z, y, x)`` mm);
            None means unit spacing and distances in pixels.
        surface: when False only Dice (and status) is computed; ``hd95``/``asd`` are nan.
            For fast validation.

    Returns:
        ``{class_index: ClassMetrics}`` for ``class_index`` in ``1..num_classes-1``. Empty
        cases follow the policy in the module docstring.
    """
    pred = _to_numpy_labels(prediction, "prediction")
    gt = _to_numpy_labels(target, "target")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and target shapes differ: {pred.shape} vs {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"expected a (D, H, W) or (H, W) label array, got shape {pred.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    for name, arr in (("prediction", pred), ("target", gt)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes}), got range [{arr.min()}, {arr.max()}]"
            )
    sp = _check_spacing(spacing, pred.ndim)
    worst = volume_diagonal(pred.shape, sp)
    nan = float("nan")

    results: dict[int, ClassMetrics] = {}
    ok_classes: list[int] = []
    for c in range(1, num_classes):
        p, g = pred == c, gt == c
        p_any, g_any = bool(p.any()), bool(g.any())
        dice = dice_score(p, g)
        if p_any and g_any:
            results[c] = ClassMetrics(dice=dice, hd95=nan, asd=nan, status="ok")
            ok_classes.append(c)
        elif not p_any and not g_any:
            zero = 0.0 if surface else nan
            results[c] = ClassMetrics(dice=1.0, hd95=zero, asd=zero, status="both_empty")
        else:
            d = worst if surface else nan
            results[c] = ClassMetrics(dice=0.0, hd95=d, asd=d, status="missed" if g_any else "spurious")

    if surface and ok_classes:
        idx = np.asarray(ok_classes)
        # (1, K, *spatial) one-hot of the classes present in both; MONAI loops over channels.
        p_oh = torch.from_numpy(pred[None] == idx.reshape((-1,) + (1,) * pred.ndim))[None]
        g_oh = torch.from_numpy(gt[None] == idx.reshape((-1,) + (1,) * gt.ndim))[None]
        hd95, asd = _monai_surface_metrics(p_oh, g_oh, sp)
        for k, c in enumerate(ok_classes):
            results[c].hd95 = float(hd95[k])
            results[c].asd = float(asd[k])
    return results


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarize(per_case: list[dict[int, ClassMetrics]], class_names: Mapping[int, str]) -> dict[str, Any]:
    """Aggregate :func:`volume_metrics` outputs over volumes.

    Args:
        per_case: one ``{class_index: ClassMetrics}`` per volume, all with the same classes.
        class_names: ``{class_index: name}`` for every scored class (extra entries, e.g. the
            background, are ignored).

    Returns:
        A JSON-serialisable dict (plain floats/ints/str, ``None`` for a metric that is not
        available in every volume, e.g. HD95 after ``surface=False``)::

            {
              "num_volumes": N,
              "per_class": {name: {"class_index": c,
                                   "dice_mean", "dice_std", "hd95_mean", "hd95_std",
                                   "asd_mean", "asd_std",          # over volumes, std ddof=0
                                   "ok", "missed", "spurious", "both_empty"}},  # counts
              "mean": {"dice", "hd95", "asd"},   # mean over classes of the per-class means
              "missed": total missed, "spurious": total spurious,
            }

        Missed/spurious volumes enter the means with the policy values (Dice 0, distances
        = volume diagonal); the counts tell how many there were.
    """
    if not per_case:
        raise ValueError("summarize needs at least one volume")
    classes = sorted(per_case[0])
    for i, case in enumerate(per_case):
        if sorted(case) != classes:
            raise ValueError(f"volume {i} has classes {sorted(case)}, expected {classes}")
    missing = [c for c in classes if c not in class_names]
    if missing:
        raise ValueError(f"class_names has no name for classes {missing}")
    names = [str(class_names[c]) for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")

    per_class: dict[str, dict[str, Any]] = {}
    class_means: dict[str, list[float]] = {m: [] for m in _METRICS}
    for c in classes:
        entry: dict[str, Any] = {"class_index": int(c)}
        for m in _METRICS:
            vals = np.array([getattr(case[c], m) for case in per_case], dtype=np.float64)
            mean, std = float(vals.mean()), float(vals.std())
            entry[f"{m}_mean"] = _json_float(mean)
            entry[f"{m}_std"] = _json_float(std)
            class_means[m].append(mean)
        for s in STATUSES:
            entry[s] = int(sum(case[c].status == s for case in per_case))
        per_class[str(class_names[c])] = entry

    mean = {m: _json_float(float(np.mean(v))) if v else None for m, v in class_means.items()}
    return {
        "num_volumes": len(per_case),
        "per_class": per_class,
        "mean": mean,
        "missed": int(sum(e["missed"] for e in per_class.values())),
        "spurious": int(sum(e["spurious"] for e in per_class.values())),
    }
