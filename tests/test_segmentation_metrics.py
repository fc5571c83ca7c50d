"""Tests of kdseg.metrics.segmentation: hand-computed Dice/HD95/ASD (MONAI convention), a scipy
reference, empty cases (both conventions)."""

from __future__ import annotations

import json
import functools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from kdseg.metrics import ClassMetrics, distance_unit, summarize, volume_metrics
from kdseg.metrics.segmentation import dice_score, volume_diagonal

# ----------------------------------------------------------------------------- helpers

monai_metrics = functools.partial(volume_metrics, convention="monai")


def _squares_2d(shift: int) -> tuple[np.ndarray, np.ndarray]:
    """4x4 squares in a 10x10 image: rows 2..5 (prediction) and rows 2+shift..5+shift, cols 2..5."""
    pred = np.zeros((10, 10), dtype=np.int64)
    gt = np.zeros((10, 10), dtype=np.int64)
    pred[2:6, 2:6] = 1
    gt[2 + shift : 6 + shift, 2:6] = 1
    return pred, gt


def _cubes_3d() -> tuple[np.ndarray, np.ndarray]:
    """4x4x4 cubes in a (9, 8, 8) volume, z 2..5 (prediction) and z 3..6 (target), y/x 2..5."""
    pred = np.zeros((9, 8, 8), dtype=np.int64)
    gt = np.zeros((9, 8, 8), dtype=np.int64)
    pred[2:6, 2:6, 2:6] = 1
    gt[3:7, 2:6, 2:6] = 1
    return pred, gt


def _border(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """mask XOR erode(mask); outside the array counts as background (scipy border_value=0)."""
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _reference(pred: np.ndarray, gt: np.ndarray, spacing, connectivity: int = 1) -> tuple[float, float]:
    """Independent HD95/ASD with scipy: EDT to the other mask's border, sampled on this border.

    HD95 = max of the two directed 95th percentiles (linear interpolation); ASD = mean of both
    directions pooled. connectivity=1 (face neighbours) is MONAI's border definition.
    """
    bp, bg = _border(pred, connectivity), _border(gt, connectivity)
    sampling = None if spacing is None else tuple(spacing)
    d_pg = ndimage.distance_transform_edt(~bg, sampling=sampling)[bp]
    d_gp = ndimage.distance_transform_edt(~bp, sampling=sampling)[bg]
    hd95 = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
    asd = np.concatenate([d_pg, d_gp]).mean()
    return float(hd95), float(asd)


def _random_labels(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """Smooth random blobs: argmax over smoothed noise, thresholded to leave background."""
    noise = rng.standard_normal((num_classes - 1, *shape))
    smooth = np.stack([ndimage.gaussian_filter(n, sigma=2.0) for n in noise])
    labels = smooth.argmax(0) + 1
    labels[smooth.max(0) < np.quantile(smooth.max(0), 0.4)] = 0
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------- Dice


def test_dice_by_hand():
    a = np.zeros((6, 6), dtype=bool)
    b = np.zeros((6, 6), dtype=bool)
    a[0:4, 0:4] = True  # 16 px
    b[2:6, 0:4] = True  # 16 px, overlap rows 2..3 x 4 cols = 8 px
    assert dice_score(a, b) == pytest.approx(2 * 8 / 32)  # 0.5
    c = np.zeros((6, 6), dtype=bool)
    d = np.zeros((6, 6), dtype=bool)
    c[0:3, 0:3] = True  # 9 px
    d[1:4, 1:4] = True  # 9 px, overlap 2x2 = 4
    assert dice_score(c, d) == pytest.approx(8 / 18)
    assert dice_score(a, a) == 1.0
    assert dice_score(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0

    # Through volume_metrics, per class: class 1 = (a, b), class 2 = (c shifted, d shifted).
    pred = np.zeros((6, 12), dtype=np.int64)
    gt = np.zeros((6, 12), dtype=np.int64)
    pred[:, :6][a] = 1
    gt[:, :6][b] = 1
    pred[:, 6:][c] = 2
    gt[:, 6:][d] = 2
    m = volume_metrics(pred, gt, num_classes=3, surface=False)
    assert set(m) == {1, 2}
    assert m[1].dice == pytest.approx(0.5)
    assert m[2].dice == pytest.approx(4 / 9)
    assert m[1].status == m[2].status == "ok"
    assert math.isnan(m[1].hd95) and math.isnan(m[1].asd)


# ----------------------------------------------------------------------------- HD95 / ASD by hand
# The MONAI convention (larger directed p95, pooled symmetric mean); the medpy one, the
# default, is tested against medpy itself in tests/test_medpy_convention.py.

# Squares shifted by k rows, unit spacing. Each border has 12 px (two full rows of 4 plus 2x2
# side pixels). Pred -> gt distances:
#   k=1: top row 4 x 1, side pixels 0, bottom-row inner 2 px x 1 (to the side of gt) -> 6 ones, 6 zeros;
#        ASD = 6/12 = 0.5; sorted p95 index 0.95*11 = 10.45 lies in the ones -> HD95 = 1.
#   k=2: top row 4 x 2, row 3 sides 2 x 1, row 4 sides 0, bottom row 0,1,1,0 -> sum 12;
#        ASD = 1.0; sorted [0,0,0,0,1,1,1,1,2,2,2,2] -> HD95 = 2. gt -> pred is symmetric.
@pytest.mark.parametrize(("shift", "hd95", "asd"), [(1, 1.0, 0.5), (2, 2.0, 1.0)])
def test_2d_squares_by_hand(shift, hd95, asd):
    pred, gt = _squares_2d(shift)
    m = monai_metrics(pred, gt, num_classes=2)[1]
    assert m.status == "ok"
    assert m.dice == pytest.approx(2 * (16 - 4 * shift) / 32)
    assert m.hd95 == pytest.approx(hd95, abs=1e-5)
    assert m.asd == pytest.approx(asd, abs=1e-5)


def test_2d_squares_anisotropic_by_hand():
    # k=2 with row spacing 2, column spacing 1: top row 4 x 4 mm, row 3 sides 2 x 2 mm,
    # row 4 sides 0, bottom row inner px 1 mm (column neighbour is nearer than 2 mm) -> sum 22.
    # ASD = 22/12; sorted [0,0,0,0,1,1,2,2,4,4,4,4] -> HD95 = 4 mm.
    pred, gt = _squares_2d(2)
    m = monai_metrics(pred, gt, num_classes=2, spacing=(2.0, 1.0))[1]
    assert m.hd95 == pytest.approx(4.0, abs=1e-5)
    assert m.asd == pytest.approx(22 / 12, abs=1e-5)


# Cubes 4^3 shifted by one slice in z, spacing (s_z, 1, 1). Border of each cube: 2 full
# 16-voxel faces + 2 rings of 12 = 56 voxels. Pred -> gt: bottom face 16 x s_z; rings and
# the top face's ring 36 x 0; top face interior 4 x min(s_z, 1) (in-plane ring of gt at the
# same z). So ASD = (16 s_z + 4) / 56 and, p95 index 0.95*55 = 52.25 falling in the 16 s_z
# values (sorted indices 40..55), HD95 = s_z. gt -> pred is the mirror image.
@pytest.mark.parametrize("s_z", [1.0, 10.0])
def test_3d_z_shift_anisotropic_by_hand(s_z):
    pred, gt = _cubes_3d()
    m = monai_metrics(pred, gt, num_classes=2, spacing=(s_z, 1.0, 1.0))[1]
    assert m.status == "ok"
    assert m.dice == pytest.approx(2 * 48 / 128)
    assert m.hd95 == pytest.approx(s_z, abs=1e-5)
    assert m.asd == pytest.approx((16 * s_z + 4) / 56, abs=1e-5)


def test_3d_no_spacing_is_pixels():
    pred, gt = _cubes_3d()
    m_px = monai_metrics(pred, gt, num_classes=2)[1]
    m_iso = monai_metrics(pred, gt, num_classes=2, spacing=(1.0, 1.0, 1.0))[1]
    assert (m_px.hd95, m_px.asd) == pytest.approx((m_iso.hd95, m_iso.asd))
    assert m_px.asd == pytest.approx(20 / 56, abs=1e-5)
    assert distance_unit(None) == "pixel"
    assert distance_unit((10.0, 1.0, 1.0)) == "mm"


def test_spacing_doubled_doubles_distances():
    rng = np.random.default_rng(0)
    gt = _random_labels(rng, (8, 20, 20), 3)
    pred = _random_labels(rng, (8, 20, 20), 3)
    spacing = (2.5, 0.7, 0.9)
    a = monai_metrics(pred, gt, num_classes=3, spacing=spacing)
    b = monai_metrics(pred, gt, num_classes=3, spacing=tuple(2 * s for s in spacing))
    for c in (1, 2):
        assert a[c].status == "ok"
        assert b[c].dice == a[c].dice
        assert b[c].hd95 == pytest.approx(2 * a[c].hd95, rel=1e-5)
        assert b[c].asd == pytest.approx(2 * a[c].asd, rel=1e-5)


# ----------------------------------------------------------------------------- scipy reference


@pytest.mark.parametrize(
    ("seed", "shape", "spacing"),
    [
        (1, (10, 24, 24), (2.5, 0.8, 0.8)),
        (2, (10, 24, 24), None),
        (3, (32, 32), (1.2, 0.6)),
    ],
)
def test_matches_scipy_reference(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    num_classes = 4
    gt = _random_labels(rng, shape, num_classes)
    # prediction: a perturbed copy (shifted + some random blobs) so distances are non-trivial
    pred = np.roll(gt, shift=1, axis=-1)
    noise = _random_labels(rng, shape, num_classes)
    pred = np.where(rng.random(shape) < 0.05, noise, pred)
    metrics = monai_metrics(pred, gt, num_classes=num_classes, spacing=spacing)
    for c in range(1, num_classes):
        assert metrics[c].status == "ok"
        hd95, asd = _reference(pred == c, gt == c, spacing)
        assert metrics[c].hd95 == pytest.approx(hd95, rel=1e-4, abs=1e-4)
        assert metrics[c].asd == pytest.approx(asd, rel=1e-4, abs=1e-4)
        assert metrics[c].dice == pytest.approx(dice_score(pred == c, gt == c))


def test_monai_border_is_face_connected():
    # Diamond |i|+|j| <= 2: face-connected erosion leaves the 5-px plus (border = 8 px),
    # full-connected erosion only the centre (border = 12 px). Against a shifted diamond the
    # two border definitions give different ASD; MONAI matches the face-connected one.
    ii, jj = np.mgrid[-5:6, -5:6]
    gt = (np.abs(ii) + np.abs(jj) <= 2).astype(np.int64)
    pred = np.roll(gt, 1, axis=0)
    m = monai_metrics(pred, gt, num_classes=2)[1]
    face = _reference(pred == 1, gt == 1, None, connectivity=1)
    full = _reference(pred == 1, gt == 1, None, connectivity=2)
    assert _border(gt == 1, 1).sum() == 8 and _border(gt == 1, 2).sum() == 12
    assert m.asd == pytest.approx(face[1], abs=1e-5)
    assert abs(face[1] - full[1]) > 1e-3


# ----------------------------------------------------------------------------- empty cases


def _empty_cases_volume() -> tuple[np.ndarray, np.ndarray]:
    """(3, 4, 12) volume: class 1 ok, 2 missed, 3 spurious, 4 absent from both."""
    pred = np.zeros((3, 4, 12), dtype=np.int64)
    gt = np.zeros((3, 4, 12), dtype=np.int64)
    pred[1, 1:3, 1:4] = 1
    gt[1, 1:3, 1:4] = 1
    gt[1, 1:3, 6:8] = 2  # missed
    pred[0:2, 0:2, 9:11] = 3  # spurious
    return pred, gt


@pytest.mark.parametrize("convention", ["medpy", "monai"])
@pytest.mark.parametrize(("spacing", "diag"), [(None, 13.0), ((2.0, 2.0, 2.0), 26.0)])
def test_empty_cases_policy(spacing, diag, convention):
    pred, gt = _empty_cases_volume()
    assert volume_diagonal(pred.shape, spacing) == pytest.approx(diag)  # sqrt(3^2+4^2+12^2) = 13
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = volume_metrics(pred, gt, num_classes=5, spacing=spacing, convention=convention)
    assert [str(w.message) for w in caught] == []  # no MONAI empty-mask / deprecation warnings
    assert m[1] == ClassMetrics(dice=1.0, hd95=0.0, asd=0.0, status="ok")
    assert m[2] == ClassMetrics(dice=0.0, hd95=diag, asd=diag, status="missed")
    assert m[3] == ClassMetrics(dice=0.0, hd95=diag, asd=diag, status="spurious")
    assert m[4] == ClassMetrics(dice=1.0, hd95=0.0, asd=0.0, status="both_empty")

    fast = volume_metrics(pred, gt, num_classes=5, spacing=spacing, surface=False)
    assert [fast[c].status for c in (1, 2, 3, 4)] == ["ok", "missed", "spurious", "both_empty"]
    assert [fast[c].dice for c in (1, 2, 3, 4)] == [1.0, 0.0, 0.0, 1.0]
    assert all(math.isnan(fast[c].hd95) and math.isnan(fast[c].asd) for c in fast)


def test_all_empty_volume_and_torch_input():
    z = torch.zeros((2, 5, 5), dtype=torch.long)
    m = volume_metrics(z, z, num_classes=3)
    assert all(v == ClassMetrics(1.0, 0.0, 0.0, "both_empty") for v in m.values())
    pred, gt = _cubes_3d()
    from_torch = volume_metrics(torch.from_numpy(pred), torch.from_numpy(gt), num_classes=2)
    assert from_torch == volume_metrics(pred, gt, num_classes=2)


def test_input_validation():
    a = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="shapes differ"):
        volume_metrics(a, np.zeros((4, 5), dtype=np.int64), num_classes=2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        volume_metrics(a + 2, a, num_classes=2)
    with pytest.raises(ValueError, match="spacing"):
        volume_metrics(a, a, num_classes=2, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        volume_metrics(np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64), num_classes=2)


# ----------------------------------------------------------------------------- summary


def test_summarize_by_hand():
    per_case = [
        {1: ClassMetrics(0.8, 2.0, 1.0, "ok"), 2: ClassMetrics(0.0, 13.0, 13.0, "missed")},
        {1: ClassMetrics(0.6, 4.0, 3.0, "ok"), 2: ClassMetrics(1.0, 0.0, 0.0, "both_empty")},
        {1: ClassMetrics(0.0, 13.0, 13.0, "spurious"), 2: ClassMetrics(0.0, 13.0, 13.0, "missed")},
    ]
    s = summarize(per_case, {0: "background", 1: "RV", 2: "LV"})
    json.dumps(s, allow_nan=False)
    assert s["num_volumes"] == 3
    rv, lv = s["per_class"]["RV"], s["per_class"]["LV"]
    assert rv["class_index"] == 1 and lv["class_index"] == 2
    assert rv["dice_mean"] == pytest.approx(1.4 / 3)
    assert rv["dice_std"] == pytest.approx(np.std([0.8, 0.6, 0.0]))
    assert rv["hd95_mean"] == pytest.approx(19 / 3)
    assert lv["asd_mean"] == pytest.approx(26 / 3)
    assert (rv["ok"], rv["missed"], rv["spurious"], rv["both_empty"]) == (2, 0, 1, 0)
    assert (lv["ok"], lv["missed"], lv["spurious"], lv["both_empty"]) == (0, 2, 0, 1)
    assert s["mean"]["dice"] == pytest.approx((1.4 / 3 + 1 / 3) / 2)
    assert s["mean"]["hd95"] == pytest.approx((19 / 3 + 26 / 3) / 2)
    assert s["missed"] == 2 and s["spurious"] == 1
    assert all(type(v) is float for v in s["mean"].values())


def test_summarize_real_metrics_counts_misses_and_fast_mode():
    pred, gt = _empty_cases_volume()
    cases = [volume_metrics(pred, gt, num_classes=5), volume_metrics(gt, gt, num_classes=5)]
    names = {1: "a", 2: "b", 3: "c", 4: "d"}
    s = summarize(cases, names)
    assert s["per_class"]["b"]["missed"] == 1 and s["per_class"]["c"]["spurious"] == 1
    assert s["per_class"]["b"]["hd95_mean"] == pytest.approx(13.0 / 2)  # diagonal, then 0 (perfect)
    assert s["missed"] == 1 and s["spurious"] == 1
    fast = summarize([volume_metrics(pred, gt, num_classes=5, surface=False)], names)
    json.dumps(fast, allow_nan=False)
    assert fast["mean"]["hd95"] is None and fast["per_class"]["a"]["asd_mean"] is None
    assert fast["mean"]["dice"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no name"):
        summarize(cases, {1: "a"})
