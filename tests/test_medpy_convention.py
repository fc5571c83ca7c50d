"""kdseg's HD95 / ASD in the papers' (medpy) convention: hand values and medpy itself.

SSL4MIS / WSL4MIS ``code/test_2D_fully.py`` score each 3D volume per class with
``medpy.metric.binary.hd95(pred, gt)`` and ``asd(pred, gt)``; kdseg's default must give the
same per-case numbers, and keep its own policy for missed / spurious structures.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from medpy.metric import binary

from kdseg.metrics import ClassMetrics, volume_metrics
from kdseg.metrics.distances import check_convention, surface_distances
from test_segmentation_metrics import _random_labels


def _square_in_square() -> tuple[np.ndarray, np.ndarray]:
    """12x12 labels: prediction a 2x2 square (rows/cols 4..5) inside the 6x6 ground truth (2..7)."""
    pred = np.zeros((12, 12), dtype=np.int64)
    gt = np.zeros((12, 12), dtype=np.int64)
    pred[4:6, 4:6] = 1
    gt[2:8, 2:8] = 1
    return pred, gt


def test_square_in_square_by_hand():
    # d(P->G): each of the 4 prediction pixels is 2 px from the nearest gt border row/col.
    # d(G->P): the 20 gt border pixels: 8 x 2 (facing the square), 8 x sqrt5, 4 corners x sqrt8.
    # medpy asd = mean d(P->G) = 2; MONAI's symmetric ASD = (4*2 + 8*2 + 8 sqrt5 + 4 sqrt8) / 24.
    # HD95: pooled 24 values, p95 index 0.95*23 = 21.85 among the 4 sqrt8 (indices 20..23);
    # MONAI: max(2, p95 of d(G->P) at index 18.05 = sqrt8): both sqrt8 here.
    pred, gt = _square_in_square()
    medpy = volume_metrics(pred, gt, num_classes=2)[1]
    monai = volume_metrics(pred, gt, num_classes=2, convention="monai")[1]
    assert medpy.asd == pytest.approx(2.0)
    assert monai.asd == pytest.approx((24 + 8 * math.sqrt(5) + 4 * math.sqrt(8)) / 24, abs=1e-5)
    assert medpy.hd95 == pytest.approx(math.sqrt(8))
    assert monai.hd95 == pytest.approx(math.sqrt(8), abs=1e-5)
    # medpy's asd is directed: prediction -> ground truth, never the reverse.
    reverse = volume_metrics(gt, pred, num_classes=2)[1]
    assert reverse.asd == pytest.approx((16 + 8 * math.sqrt(5) + 4 * math.sqrt(8)) / 20)


@pytest.mark.parametrize("s_z", [1.0, 10.0])
def test_3d_anisotropic_cubes_by_hand(s_z):
    # 4^3 cubes shifted one slice in z, spacing (s_z, 1, 1): each border has 56 voxels, 16 at
    # s_z, 4 at min(s_z, 1), 36 at 0, in both directions. asd = (16 s_z + 4) / 56; pooled
    # p95 index 0.95*111 = 105.45 falls in the 32 values s_z (indices 80..111): hd95 = s_z.
    pred = np.zeros((9, 8, 8), dtype=np.int64)
    gt = np.zeros((9, 8, 8), dtype=np.int64)
    pred[2:6, 2:6, 2:6] = 1
    gt[3:7, 2:6, 2:6] = 1
    m = volume_metrics(pred, gt, num_classes=2, spacing=(s_z, 1.0, 1.0))[1]
    assert m.hd95 == pytest.approx(s_z)
    assert m.asd == pytest.approx((16 * s_z + 4) / 56)



@pytest.fixture()
def saved_predictions(tmp_path: Path) -> list[Path]:
    """Prediction / ground-truth volumes saved to disk, as a test run leaves them: a 3D
    volume without spacing, an anisotropic 3D one (ACDC-like 10 mm slices) and a 2D image."""
    rng = np.random.default_rng(7)
    files = []
    for name, shape, spacing in (
        ("volume3d", (8, 40, 36), None),
        ("anisotropic", (6, 32, 32), (10.0, 1.5, 1.25)),
        ("image2d", (48, 40), None),
    ):
        gt = _random_labels(rng, shape, 4)
        pred = np.roll(gt, shift=(1,) * (len(shape) - 1), axis=tuple(range(1, len(shape))))
        pred = np.where(rng.random(shape) < 0.03, _random_labels(rng, shape, 4), pred)
        pred[tuple(slice(0, 3) for _ in shape)] = 3  # a stray spurious-looking patch of class 3
        path = tmp_path / f"{name}.npz"
        np.savez(path, prediction=pred, label=gt, spacing=np.array(spacing if spacing else [np.nan]))
        files.append(path)
    return files


def test_per_case_hd95_asd_equal_medpy_on_saved_predictions(saved_predictions):
    differs = 0
    for path in saved_predictions:
        saved = np.load(path)
        pred, gt = saved["prediction"], saved["label"]
        spacing = None if np.isnan(saved["spacing"]).any() else tuple(saved["spacing"].tolist())
        metrics = volume_metrics(pred, gt, num_classes=4, spacing=spacing)
        monai = volume_metrics(pred, gt, num_classes=4, spacing=spacing, convention="monai")
        for c in (1, 2, 3):
            assert metrics[c].status == "ok", (path.name, c)
            p, g = pred == c, gt == c
            assert metrics[c].dice == pytest.approx(binary.dc(p, g), abs=1e-12)
            assert metrics[c].hd95 == pytest.approx(binary.hd95(p, g, voxelspacing=spacing), abs=1e-12)
            assert metrics[c].asd == pytest.approx(binary.asd(p, g, voxelspacing=spacing), abs=1e-12)
            differs += not (math.isclose(monai[c].hd95, metrics[c].hd95, abs_tol=1e-4)
                            and math.isclose(monai[c].asd, metrics[c].asd, abs_tol=1e-4))
    assert differs > 0  # the conventions really differ on these volumes


def test_miss_policy_is_kept_in_the_medpy_convention():
    pred = np.zeros((3, 4, 12), dtype=np.int64)
    gt = np.zeros((3, 4, 12), dtype=np.int64)
    pred[1, 1:3, 1:4] = gt[1, 1:3, 1:4] = 1
    gt[1, 1:3, 6:8] = 2  # missed: medpy itself would raise
    pred[0:2, 0:2, 9:11] = 3  # spurious
    with pytest.raises(RuntimeError):
        binary.hd95(pred == 2, gt == 2)
    m = volume_metrics(pred, gt, num_classes=5)
    assert m[2] == ClassMetrics(dice=0.0, hd95=13.0, asd=13.0, status="missed")  # sqrt(3^2+4^2+12^2)
    assert m[3] == ClassMetrics(dice=0.0, hd95=13.0, asd=13.0, status="spurious")
    assert m[4] == ClassMetrics(dice=1.0, hd95=0.0, asd=0.0, status="both_empty")


def test_bad_convention_and_empty_masks():
    with pytest.raises(ValueError, match="distance_convention must be one of medpy, monai"):
        check_convention("deepmind")
    a = np.zeros((4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="distance_convention"):
        volume_metrics(a, a, num_classes=2, convention="MedPy")
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(np.zeros((4, 4), bool), np.ones((4, 4), bool))


@pytest.mark.parametrize("convention", ["medpy", "monai"])
def test_method_evaluation_uses_the_convention(monkeypatch, convention):
    """The test step scores the volume medpy's way without the spacing (papers' code), or MONAI's
    way with it."""
    import torch

    import kdseg.methods.base as base
    from kdseg.methods.base import NetworkConfig
    from kdseg.methods.supervised import Supervised

    rng = np.random.default_rng(3)
    gt = _random_labels(rng, (5, 24, 24), 4)
    pred = np.roll(gt, 1, axis=1)
    monkeypatch.setattr(base, "predict_volume", lambda *args: torch.from_numpy(pred))
    method = Supervised(network=NetworkConfig(encoder_depth=3, decoder_channels=[16, 8, 8]),
                        distance_convention=convention)
    spacing = (10.0, 1.5, 1.5)
    batch = {"image": torch.zeros(1), "input_size": 24, "label": torch.from_numpy(gt),
             "spacing": torch.tensor(spacing, dtype=torch.float64), "case_id": "case0"}
    assert method.hparams["distance_convention"] == convention
    row = method._evaluate_volume(batch, surface=True)
    assert row["spacing"] == (None if convention == "medpy" else spacing)
    for c in (1, 2, 3):
        m = row["metrics"][c]
        if convention == "medpy":
            assert m["hd95"] == pytest.approx(binary.hd95(pred == c, gt == c), abs=1e-12)
            assert m["asd"] == pytest.approx(binary.asd(pred == c, gt == c), abs=1e-12)
        else:
            expected = surface_distances(pred == c, gt == c, spacing, "monai")
            assert (m["hd95"], m["asd"]) == pytest.approx(expected)


# ----------------------------------------------------------------------------- tables


def _fake_run(setting, method, seed, test_metrics):
    from types import SimpleNamespace

    from kdseg.evaluation.metric_ids import flatten_test_metrics

    plan = SimpleNamespace(setting=setting, method=method, seed=seed, iterations=[10], stages=[object()], error=None)
    return SimpleNamespace(plan=plan, has_metrics=True, status="finished", test_metrics=test_metrics,
                           metrics=flatten_test_metrics("semantic", test_metrics), folder=None)


def _summary(missed, spurious, hd95, convention="medpy"):
    per_class = {name: {"dice_mean": 0.8, "hd95_mean": hd95, "asd_mean": 1.0, "missed": m, "spurious": s}
                 for name, m, s in zip(("RV", "Myo", "LV"), missed, spurious)}
    return {"per_class": per_class, "mean": {"dice": 0.8, "hd95": hd95, "asd": 1.0}, "distance_unit": "pixel",
            "distance_convention": convention}


def test_table_names_the_convention_and_counts_misses():
    from types import SimpleNamespace

    from kdseg.results import tables

    method = SimpleNamespace(name="pce", label="pCE")
    setting = SimpleNamespace(name="acdc_scribble", title="ACDC", task="semantic", methods={"pce": method})
    results = [_fake_run(setting, method, 0, _summary([1, 0, 0], [0, 0, 2], 4.0)),
               _fake_run(setting, method, 1, _summary([2, 0, 0], [0, 1, 0], 6.0))]
    (row,) = tables.build_rows(setting, results, None)
    assert row.misses == {"RV": [3, 0], "Myo": [0, 1], "LV": [0, 2]}
    assert row.misses_cell(["RV", "Myo", "LV"]) == "3/0, 0/1, 0/2"
    assert row.stats["hd95_mean"].mean == pytest.approx(5.0)

    headers = [h for _, h, _ in tables._columns(setting, *tables._distance_tags(results, setting))]
    assert "HD95 mean (medpy, pixel)" in headers and "ASD RV (medpy, pixel)" in headers
    from kdseg.evaluation.volume import describe_distances

    text = describe_distances("medpy", "pixel")
    assert "medpy.metric.binary.hd95 / asd" in text and "no voxel spacing is used, as in the papers' code" in text

    header, lines = tables.csv_rows(SimpleNamespace(settings={"acdc_scribble": setting}), results, None)
    assert {"missed_RV", "spurious_LV", "distance_convention"} <= set(header)
    assert (lines[0]["missed_RV"], lines[0]["spurious_LV"], lines[0]["distance_convention"]) == (3, 2, "medpy")

    # Runs tested before the convention was recorded were MONAI's.
    old = [_fake_run(setting, method, 0, {k: v for k, v in _summary([0] * 3, [0] * 3, 1.0).items()
                                          if k != "distance_convention"})]
    assert tables._distance_tags(old, setting) == ("pixel", "monai")
