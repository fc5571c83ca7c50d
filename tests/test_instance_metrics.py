"""Instance metrics on overlapping masks: AJI (Kumar and MMT-PSM gated), matching, F1, Dice, mAP."""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest
import torch

from kdseg.data.cytology_phantom import make_cytology_phantom
from kdseg.metrics.aji import aggregated_jaccard_index, aggregated_jaccard_index_gated
from kdseg.metrics.instance import InstanceMetricAccumulator
from kdseg.metrics.instance_matching import f1_at_iou, match_instances, matched_dice
from kdseg.metrics.instance_overlap import pairwise_iou


def box_mask(shape, r0, r1, c0, c1):
    """Bool mask with rows r0..r1 and columns c0..c1 (inclusive) set."""
    m = np.zeros(shape, dtype=bool)
    m[r0 : r1 + 1, c0 : c1 + 1] = True
    return m


def stack(*masks, shape=(10, 10)):
    return np.stack(masks) if masks else np.zeros((0,) + shape, dtype=bool)


# --------------------------------------------------------------------------- independent reference
# Pure-Python set arithmetic over pixel coordinates, written from the papers' definitions.


def pixel_sets(masks):
    return [set(zip(*np.nonzero(m))) for m in masks]


def reference_aji(pred, gt):
    P, G = pixel_sets(pred), pixel_sets(gt)
    C = U = 0
    used = set()
    for g in G:
        best_j, best_iou = None, 0.0
        for j, s in enumerate(P):
            inter, union = len(g & s), len(g | s)
            if inter and inter / union > best_iou:
                best_j, best_iou = j, inter / union
        if best_j is None:
            U += len(g)
        else:
            C += len(g & P[best_j])
            U += len(g | P[best_j])
            used.add(best_j)
    U += sum(len(s) for j, s in enumerate(P) if j not in used)
    return C / U if U else math.nan


def reference_aji_gated(pred, gt, thr=0.5):
    # MMT-PSM style: GTs in order, each takes the unused prediction with the highest IoU >= thr.
    P, G = pixel_sets(pred), pixel_sets(gt)
    C = U = 0
    used = set()
    for g in G:
        best_j, best_iou = None, thr
        for j, s in enumerate(P):
            if j in used:
                continue
            iou = len(g & s) / len(g | s) if (g | s) else 0.0
            if iou >= best_iou and iou > 0 and (best_j is None or iou > best_iou):
                best_j, best_iou = j, iou
        if best_j is None:
            U += len(g)
        else:
            used.add(best_j)
            C += len(g & P[best_j])
            U += len(g | P[best_j])
    U += sum(len(s) for j, s in enumerate(P) if j not in used)
    return C / U if U else math.nan


def brute_force_tp(pred, gt, thr=0.5):
    """Largest number of one-to-one pairs with IoU >= thr, by trying every assignment."""
    P, G = pixel_sets(pred), pixel_sets(gt)
    ok = [[len(g | s) > 0 and len(g & s) / len(g | s) >= thr for s in P] for g in G]
    best = 0
    small, large = (G, P) if len(G) <= len(P) else (P, G)
    for perm in itertools.permutations(range(len(large)), len(small)):
        if len(G) <= len(P):
            n = sum(ok[i][j] for i, j in enumerate(perm))
        else:
            n = sum(ok[j][i] for i, j in enumerate(perm))
        best = max(best, n)
    return best


def random_instances(rng, n, shape=(24, 24)):
    """Random overlapping discs and rectangles."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            cy, cx = rng.uniform(0, shape[0], 2)
            r = rng.uniform(2, 7)
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            r0, c0 = rng.integers(0, shape[0] - 3, 2)
            m = box_mask(shape, r0, r0 + rng.integers(2, 9), c0, c0 + rng.integers(2, 9))
        if m.any():
            out.append(m)
    return np.stack(out) if out else np.zeros((0,) + shape, dtype=bool)


# --------------------------------------------------------------------------- AJI


def test_aji_hand_computed_toy():
    # GT A: rows 0-3, cols 0-3 (16 px).    GT B: rows 5-8, cols 5-8 (16 px).
    # P1: rows 0-3, cols 1-4 -> |A∩P1| = 4*3 = 12, |A∪P1| = 16 + 16 - 12 = 20.
    # P2: rows 6-9, cols 5-8 -> |B∩P2| = 3*4 = 12, |B∪P2| = 20.
    # C = 12 + 12 = 24, U = 20 + 20 = 40, AJI = 0.6.
    gt = stack(box_mask((10, 10), 0, 3, 0, 3), box_mask((10, 10), 5, 8, 5, 8))
    pred = stack(box_mask((10, 10), 0, 3, 1, 4), box_mask((10, 10), 6, 9, 5, 8))
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(24 / 40)
    # A false positive P3 (rows 0-1, cols 8-9, 4 px) is never matched: U += 4 -> 24 / 44.
    pred3 = np.concatenate([pred, box_mask((10, 10), 0, 1, 8, 9)[None]])
    assert aggregated_jaccard_index(pred3, gt) == pytest.approx(24 / 44)
    # Both GTs pass IoU 0.6 >= 0.5, so the gated AJI agrees here.
    assert aggregated_jaccard_index_gated(pred3, gt) == pytest.approx(24 / 44)
    # Perfect prediction (any order).
    assert aggregated_jaccard_index(gt[::-1], gt) == pytest.approx(1.0)


def test_aji_overlapping_gt_instances_not_flattened():
    # GT1 rows/cols 0-5 (36 px) and GT2 rows/cols 3-8 (36 px) share a 3x3 = 9 px region.
    g1, g2 = box_mask((10, 10), 0, 5, 0, 5), box_mask((10, 10), 3, 8, 3, 8)
    gt = stack(g1, g2)
    # The exact overlapping prediction scores 1: a label map would have lost the 9 shared px.
    assert aggregated_jaccard_index(gt.copy(), gt) == pytest.approx(1.0)
    # P2 = GT2 without the shared region (27 px): IoU(GT2, P2) = 27/36 > IoU(GT2, P1) = 9/63.
    # C = 36 + 27 = 63, U = 36 + 36 = 72.
    pred = stack(g1, g2 & ~g1)
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(63 / 72)
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(reference_aji(pred, gt))


def test_prediction_reused_by_two_gts_kumar_vs_gated():
    # GT1 rows 0-3 cols 0-3, GT2 rows 0-3 cols 4-7 (16 px each); one prediction covers both (32 px).
    gt = stack(box_mask((10, 10), 0, 3, 0, 3), box_mask((10, 10), 0, 3, 4, 7))
    pred = stack(box_mask((10, 10), 0, 3, 0, 7))
    # Kumar: both GTs pick the prediction (IoU 0.5 each): C = 16 + 16, U = 32 + 32 -> 0.5.
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(0.5)
    # Gated (one-to-one): GT1 takes it (IoU 0.5 >= 0.5) -> C = 16, U = 32; GT2 is missed -> U += 16.
    assert aggregated_jaccard_index_gated(pred, gt) == pytest.approx(16 / 48)


def test_gated_ignores_partial_overlaps():
    # GT 16 px (rows/cols 0-3); prediction rows 0-3, cols 2-5: inter 8, union 24, IoU 1/3 < 0.5.
    gt = stack(box_mask((10, 10), 0, 3, 0, 3))
    pred = stack(box_mask((10, 10), 0, 3, 2, 5))
    assert aggregated_jaccard_index(pred, gt) == pytest.approx(8 / 24)
    # Gated: no match -> C = 0, U = |G| + |S| = 32.
    assert aggregated_jaccard_index_gated(pred, gt) == 0.0
    # A lower gate accepts it.
    assert aggregated_jaccard_index_gated(pred, gt, iou_threshold=0.3) == pytest.approx(8 / 24)


def test_gated_prefers_higher_score_on_ties():
    gt = stack(box_mask((10, 10), 0, 3, 0, 3))
    a = box_mask((10, 10), 0, 3, 0, 4)  # 20 px, IoU 0.8
    b = box_mask((10, 10), 0, 4, 0, 3)  # 20 px, IoU 0.8
    pred = stack(a, b)
    # Either way C = 16, U = 20 + 20 (the unmatched one) = 40.
    assert aggregated_jaccard_index_gated(pred, gt, pred_scores=[0.1, 0.9]) == pytest.approx(16 / 40)
    with pytest.raises(ValueError):
        aggregated_jaccard_index_gated(pred, gt, pred_scores=[0.1])


def test_aji_against_independent_implementation():
    rng = np.random.default_rng(7)
    for _ in range(25):
        gt = random_instances(rng, int(rng.integers(0, 5)))
        pred = random_instances(rng, int(rng.integers(0, 5)))
        # Sometimes make predictions that are perturbed copies of the GT, so matches happen.
        if len(gt) and rng.random() < 0.5:
            pred = np.concatenate([np.roll(gt, int(rng.integers(-2, 3)), axis=2), pred])
        ours, ref = aggregated_jaccard_index(pred, gt), reference_aji(pred, gt)
        ours_g, ref_g = aggregated_jaccard_index_gated(pred, gt), reference_aji_gated(pred, gt)
        if math.isnan(ref):
            assert math.isnan(ours) and math.isnan(ours_g)
            continue
        assert ours == pytest.approx(ref)
        assert ours_g == pytest.approx(ref_g)
        assert ours_g <= ours + 1e-12
        m = match_instances(pred, gt)
        assert m.tp == brute_force_tp(pred, gt)


def test_aji_empty_cases():
    gt = stack(box_mask((10, 10), 0, 3, 0, 3))
    empty = stack()
    assert aggregated_jaccard_index(empty, gt) == 0.0
    assert aggregated_jaccard_index_gated(empty, gt) == 0.0
    assert aggregated_jaccard_index(gt, empty) == 0.0  # only false positives
    assert math.isnan(aggregated_jaccard_index(empty, empty))
    with pytest.raises(ValueError):
        aggregated_jaccard_index(np.zeros((1, 5, 5), bool), gt)


def test_inputs_torch_and_probabilities():
    gt = stack(box_mask((10, 10), 0, 3, 0, 3), box_mask((10, 10), 5, 8, 5, 8))
    probs = torch.from_numpy(gt.astype(np.float32) * 0.9)[:, None]  # (P, 1, H, W) probabilities
    assert aggregated_jaccard_index(probs, torch.from_numpy(gt)) == pytest.approx(1.0)
    assert pairwise_iou(probs, gt).shape == (2, 2)


# --------------------------------------------------------------------------- matching, F1, Dice


def test_f1_and_dice_toy():
    gt = stack(box_mask((10, 10), 0, 3, 0, 3), box_mask((10, 10), 5, 8, 5, 8))
    pred = stack(
        box_mask((10, 10), 0, 3, 1, 4),  # IoU 0.6 with GT A, Dice 2*12/32 = 0.75
        box_mask((10, 10), 6, 9, 5, 8),  # IoU 0.6 with GT B, Dice 0.75
        box_mask((10, 10), 0, 1, 8, 9),  # false positive
    )
    m = match_instances(pred, gt)
    assert (m.tp, m.fp, m.fn) == (2, 1, 0)
    assert sorted(zip(m.gt_idx.tolist(), m.pred_idx.tolist())) == [(0, 0), (1, 1)]
    assert np.allclose(m.iou, 0.6)
    # F1 = 2*2 / (2*2 + 1 + 0) = 0.8
    assert f1_at_iou(pred, gt) == pytest.approx(0.8)
    assert matched_dice(pred, gt) == pytest.approx(0.75)
    # At IoU 0.7 nothing matches: F1 0, Dice 0 (GT exists but nothing matched).
    assert f1_at_iou(pred, gt, 0.7) == 0.0
    assert matched_dice(pred, gt, 0.7) == 0.0


def test_matching_is_one_to_one_with_overlapping_gt():
    # Two nearly identical overlapping GTs; one prediction passes IoU 0.5 with both.
    g1 = box_mask((10, 10), 0, 5, 0, 5)
    g2 = box_mask((10, 10), 0, 5, 0, 6)
    pred = stack(g1)
    m = match_instances(pred, stack(g1, g2))
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)
    assert m.gt_idx.tolist() == [0]  # the better pair (IoU 1) is kept
    # Two predictions, where greedy-by-IoU would pair badly: Hungarian gets both matched.
    p_a = g1.copy()
    p_b = g2.copy()
    m2 = match_instances(stack(p_b, p_a), stack(g1, g2))
    assert m2.tp == 2 and np.allclose(m2.iou, 1.0)


def test_f1_dice_empty():
    gt = stack(box_mask((10, 10), 0, 3, 0, 3))
    empty = stack()
    assert f1_at_iou(empty, gt) == 0.0
    assert f1_at_iou(gt, empty) == 0.0
    assert math.isnan(f1_at_iou(empty, empty))
    assert matched_dice(empty, gt) == 0.0
    assert math.isnan(matched_dice(gt, empty))


# --------------------------------------------------------------------------- accumulator


def _perfect_pred(sample, shift=0):
    masks = torch.from_numpy(np.roll(sample.masks, shift, axis=2))
    return {
        "masks": masks,
        "scores": torch.linspace(1.0, 0.9, len(sample.labels)),
        "labels": torch.from_numpy(sample.labels),
    }


def _target(sample):
    return {"masks": torch.from_numpy(sample.masks), "labels": torch.from_numpy(sample.labels)}


@pytest.fixture(scope="module")
def phantoms():
    return make_cytology_phantom(3, seed=5, size=64, cells_per_image=(2, 4))


def test_accumulator_perfect_predictions(phantoms):
    acc = InstanceMetricAccumulator()
    for s in phantoms:
        acc.update(_perfect_pred(s), _target(s), s.image_id)
    res = acc.compute()
    for name in ("cytoplasm", "nucleus", "mean"):
        for key in ("aji", "aji_gated", "f1", "dice", "map", "ap50", "ap75"):
            assert res[f"{key}_{name}"] == pytest.approx(1.0), (key, name)
    assert res["num_images"] == 3
    rows = acc.per_image_rows()
    assert len(rows) == 3 * 2
    assert {r["class"] for r in rows} == {"cytoplasm", "nucleus"}


def test_accumulator_shifted_predictions_lower(phantoms):
    acc = InstanceMetricAccumulator()
    for s in phantoms:
        acc.update(_perfect_pred(s, shift=3), _target(s), s.image_id)
    res = acc.compute()
    assert res["map_mean"] < 1.0
    assert res["map_nucleus"] < res["map_cytoplasm"]  # a 3 px shift hurts small nuclei most
    assert res["aji_cytoplasm"] < 1.0 and res["aji_nucleus"] < res["aji_cytoplasm"]
    assert res["map_mean"] == pytest.approx((res["map_cytoplasm"] + res["map_nucleus"]) / 2, abs=1e-6)
    assert 0.0 <= res["ap75_mean"] <= res["ap50_mean"] <= 1.0


def test_accumulator_missing_predictions_are_misses(phantoms, tmp_path):
    acc = InstanceMetricAccumulator()
    s0, s1 = phantoms[0], phantoms[1]
    acc.update(_perfect_pred(s0), _target(s0), "perfect")
    empty = {
        "masks": torch.zeros((0,) + s1.image.shape, dtype=torch.bool),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.int64),
    }
    acc.update(empty, _target(s1), "nothing")
    res = acc.compute()
    # AJI: per-image mean of 1 and 0.
    assert res["aji_cytoplasm"] == pytest.approx(0.5)
    assert res["aji_gated_nucleus"] == pytest.approx(0.5)
    # F1 pooled: TP = cells of image 0, FN = cells of image 1.
    n0, n1 = int((s0.labels == 1).sum()), int((s1.labels == 1).sum())
    assert res["f1_cytoplasm"] == pytest.approx(2 * n0 / (2 * n0 + n1))
    assert res["dice_cytoplasm"] == pytest.approx(1.0)  # Dice is over matched objects only
    assert res["map_mean"] < 1.0
    rows = {(r["image_id"], r["class"]): r for r in acc.per_image_rows()}
    assert rows[("nothing", "cytoplasm")]["aji"] == 0.0
    assert rows[("nothing", "nucleus")]["f1"] == 0.0
    assert rows[("nothing", "nucleus")]["fn"] == n1
    out = acc.write_csv(tmp_path / "rows.csv")
    with out.open() as f:
        read = list(csv.DictReader(f))
    assert len(read) == 4 and read[0]["image_id"] == "perfect"
    with pytest.raises(ValueError, match="already"):
        acc.update(empty, _target(s1), "nothing")


def test_accumulator_class_missing_only_in_predictions(phantoms):
    # Predict only the cytoplasm: nuclei are all misses, cytoplasm perfect.
    acc = InstanceMetricAccumulator()
    s = phantoms[0]
    keep = s.labels == 1
    pred = {
        "masks": torch.from_numpy(s.masks[keep]),
        "scores": torch.ones(int(keep.sum())),
        "labels": torch.from_numpy(s.labels[keep]),
    }
    acc.update(pred, _target(s), s.image_id)
    res = acc.compute()
    assert res["aji_cytoplasm"] == pytest.approx(1.0)
    assert res["aji_nucleus"] == 0.0 and res["f1_nucleus"] == 0.0 and res["dice_nucleus"] == 0.0
    assert res["map_nucleus"] == 0.0 and res["map_cytoplasm"] == pytest.approx(1.0)
    assert res["aji_mean"] == pytest.approx(0.5)


def test_accumulator_score_threshold_and_batches(phantoms):
    # A low-score false positive is ignored by AJI/F1 (score_threshold 0.5) but ranked by mAP.
    acc = InstanceMetricAccumulator()
    preds, targets = [], []
    for s in phantoms[:2]:
        p = _perfect_pred(s)
        fp = torch.zeros((1,) + s.image.shape, dtype=torch.bool)
        fp[0, :5, :5] = True
        preds.append(
            {
                "masks": torch.cat([p["masks"], fp]),
                "scores": torch.cat([p["scores"], torch.tensor([0.1])]),
                "labels": torch.cat([p["labels"], torch.tensor([1])]),
            }
        )
        targets.append(_target(s))
    acc.update(preds, targets, [s.image_id for s in phantoms[:2]])
    res = acc.compute()
    assert res["aji_cytoplasm"] == pytest.approx(1.0) and res["f1_cytoplasm"] == pytest.approx(1.0)
    assert res["map_cytoplasm"] == pytest.approx(1.0)  # lowest-ranked FP after full recall
    acc_all = InstanceMetricAccumulator(score_threshold=0.0, compute_map=False)
    acc_all.update(preds, targets)
    assert acc_all.compute()["f1_cytoplasm"] < 1.0
    assert math.isnan(acc_all.compute()["map_mean"])


def test_accumulator_empty():
    res = InstanceMetricAccumulator().compute()
    assert math.isnan(res["aji_mean"]) and math.isnan(res["map_mean"]) and res["num_images"] == 0


def test_map_counts_a_pair_at_iou_exactly_0_8_as_coco_does():
    # GT 10 x 13 = 130 px, prediction its first 8 rows = 104 px: IoU = 104/130 = 0.8 exactly.
    # COCO matches at IoU >= t, so thresholds 0.50 .. 0.80 (7 of 10) count the pair: AP = 0.7.
    # With torchmetrics' float32 thresholds 0.8 becomes 0.800000012 and AP drops to 0.6.
    gt = box_mask((20, 20), 2, 11, 3, 15)[None]
    pred = box_mask((20, 20), 2, 9, 3, 15)[None]
    assert gt.sum() == 130 and pred.sum() == 104
    acc = InstanceMetricAccumulator(classes={1: "cytoplasm"})
    acc.update({"masks": pred, "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.long)},
               {"masks": gt, "labels": torch.ones(1, dtype=torch.long)}, "img")
    res = acc.compute()
    assert res["map_cytoplasm"] == pytest.approx(0.7)
    assert res["map_mean"] == pytest.approx(0.7)
    assert res["ap50_cytoplasm"] == pytest.approx(1.0) and res["ap75_cytoplasm"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- native-size scoring


def test_masks_to_size_bilinear_then_threshold_by_hand():
    from kdseg.metrics.native_size import masks_to_size

    # Probabilities 1 in columns 1..2 of a 1 x 4 row, upsampled x2 (align_corners=False): output
    # column x samples input (x + 0.5) / 2 - 0.5, so x = 1 -> 0.25 (p 0.25, off), x = 2 -> 0.75
    # (p 0.75, on), ..., x = 5 -> 2.25 (p 0.75, on), x = 6 -> 2.75 (p 0.25, off).
    probs = torch.tensor([[[0.0, 1.0, 1.0, 0.0]] * 2])  # (1, 2, 4)
    out = masks_to_size(probs[:, None], (4, 8))
    assert out.dtype == torch.bool and out.shape == (1, 4, 8)
    assert out[0, 0].tolist() == [False, False, True, True, True, True, False, False]
    # A soft edge moves with the probabilities, which a binary mask would have lost: p = 0.45
    # at column 1 is off at the input size, yet its upsampled right half (0.45 .. 1) is on.
    soft = masks_to_size(torch.tensor([[[0.0, 0.45, 1.0, 1.0]]]), (1, 8))
    assert soft[0, 0].tolist() == [False, False, False, True, True, True, True, True]
    same = masks_to_size(torch.tensor([[[0.2, 0.5]]]), (1, 2))
    assert same[0, 0].tolist() == [False, True]
    assert masks_to_size(torch.zeros((0, 1, 4, 4)), (8, 8)).shape == (0, 8, 8)


def test_prediction_at_a_smaller_size_is_scored_against_the_native_ground_truth():
    from kdseg.data.instance_datamodule import CervicalCellDataModule, resize_sample
    from kdseg.evaluation import InstanceEvaluator
    from kdseg.evaluation.instance import unpack_masks
    from kdseg.metrics.aji import aggregated_jaccard_index

    dm = CervicalCellDataModule(phantom_num_images=5, phantom_size=128, image_size=64, num_val_images=2)
    dm.setup("fit")
    image, target, image_id = dm.val_dataloader().dataset[0]
    assert image.shape == (1, 64, 64) and target["masks"].shape[-2:] == (128, 128)
    native = dm.val_targets[0]
    assert native.image_id == image_id and native.masks.shape[-2:] == (128, 128)
    small = CervicalCellDataModule(phantom_num_images=5, phantom_size=128, image_size=64, num_val_images=2,
                                   eval_native_size=False)
    small.setup("fit")
    assert small.val_dataloader().dataset[0][1]["masks"].shape[-2:] == (64, 64)

    # The "network" predicts the ground truth as seen at 64 px (resize_sample's area + 0.5).
    seen = resize_sample(native, 64)
    outputs = [{"masks": torch.from_numpy(seen.masks).float()[:, None], "labels": torch.from_numpy(seen.labels),
                "scores": torch.ones(len(seen.labels))}]

    assert image.shape == (1, 64, 64)
    evaluator = InstanceEvaluator()
    evaluator.add_batch(outputs, [(image, target, image_id)])
    (_, pred, gt), = evaluator.rows
    pred_masks, gt_masks = unpack_masks(pred["masks"]), unpack_masks(gt["masks"])
    assert pred_masks.shape[-2:] == gt_masks.shape[-2:] == (128, 128)
    assert np.array_equal(gt_masks, native.masks)
    keep = np.isin(seen.labels, [1])
    native_aji = aggregated_jaccard_index(pred_masks[keep], native.masks[native.labels == 1])
    # Scored at 64 px the prediction would be perfect; at 128 px the resampling shows.
    assert aggregated_jaccard_index(seen.masks[keep], seen.masks[keep]) == 1.0
    assert 0.8 < native_aji < 1.0
