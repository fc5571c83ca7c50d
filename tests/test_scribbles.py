"""Scribbles simulated from dense labels: present classes always get a stroke inside their mask."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk

from kdseg.data.phantom import generate_cardiac_slice, generate_cardiac_volume
from kdseg.data.scribbles import scribbles_from_label
from kdseg.data.volume import DataError

IGNORE = 4


def check_scribble(label: np.ndarray, scribble: np.ndarray, num_classes: int = 4,
                   ignore: int = IGNORE) -> None:
    """The contract of scribbles_from_label on one (H, W) slice."""
    assert scribble.shape == label.shape and scribble.dtype == np.uint8
    assert set(np.unique(scribble).tolist()) <= set(range(num_classes)) | {ignore}
    for c in range(num_classes):
        mask, stroke = label == c, scribble == c
        if mask.any():
            assert stroke.any(), f"class {c} present but has no stroke"
            assert not (stroke & ~mask).any(), f"class {c} stroke leaves its mask"
        else:
            assert not stroke.any(), f"absent class {c} got a stroke"


def test_phantom_slices_every_present_class_has_a_stroke_inside_it() -> None:
    fractions: dict[int, list[float]] = {c: [] for c in range(4)}
    for i in range(20):
        rng = np.random.default_rng(i)
        _, label = generate_cardiac_slice(rng, (64, 64))
        scribble = scribbles_from_label(label, rng=rng)
        check_scribble(label, scribble)
        for c in range(4):
            fractions[c].append(float((scribble == c).sum() / (label == c).sum()))
    # Realistic scribbles: a small share of each structure (ACDC: ~10-20 % of RV/Myo/LV,
    # under 1 % of the background), never the whole mask.
    for c in (1, 2, 3):
        assert max(fractions[c]) < 0.4
        assert 0.03 < float(np.mean(fractions[c])) < 0.3
    assert max(fractions[0]) < 0.1


def test_whole_phantom_volumes_including_apical_slices() -> None:
    for seed in range(4):
        _, label = generate_cardiac_volume(np.random.default_rng(seed), 8, (48, 48))
        scribble = scribbles_from_label(label, rng=np.random.default_rng(seed))
        assert scribble.shape == label.shape
        for lab, scr in zip(label, scribble, strict=True):
            check_scribble(lab, scr)


def test_strokes_are_thin() -> None:
    _, label = generate_cardiac_slice(np.random.default_rng(5), (96, 96))
    scribble = scribbles_from_label(label, rng=np.random.default_rng(0))
    for c in range(4):
        stroke = scribble == c
        # A skeleton-like curve has no pixel whose whole 3x3 neighbourhood is stroke.
        assert not ndi.binary_erosion(stroke, np.ones((3, 3), bool)).any()
        assert ndi.label(stroke, structure=np.ones((3, 3)))[1] == 1  # one connected stroke
    thick = scribbles_from_label(label, rng=np.random.default_rng(0), thickness=2)
    check_scribble(label, thick)
    assert (thick != IGNORE).sum() > (scribble != IGNORE).sum()


@pytest.mark.parametrize("case", ["thin_line", "two_by_two", "single_pixel", "diagonal",
                                  "ring", "at_border", "many_parts"])
def test_hand_made_masks(case: str) -> None:
    label = np.zeros((24, 24), dtype=np.uint8)
    if case == "thin_line":
        label[10, 3:20] = 1  # 1-pixel-thin structure: no erosion possible
        label[14:20, 4:12] = 2
    elif case == "two_by_two":
        label[5:7, 5:7] = 3
        label[15:22, 12:20] = 1
    elif case == "single_pixel":
        label[12, 12] = 2
        label[0, 0] = 3  # in the corner, too
    elif case == "diagonal":
        idx = np.arange(3, 20)
        label[idx, idx] = 1  # 8-connected only
    elif case == "ring":
        label[disk((12, 12), 9)] = 2
        label[disk((12, 12), 6)] = 3
    elif case == "at_border":
        label[:, :6] = 1
        label[:8, 18:] = 3
    elif case == "many_parts":
        label[2:4, 2:4] = 1
        label[10:20, 10:20] = 1
        label[20, 2] = 1
    scribble = scribbles_from_label(label, rng=np.random.default_rng(1))
    check_scribble(label, scribble)


def test_background_only_and_foreground_only_slices() -> None:
    background = np.zeros((20, 30), dtype=np.int64)
    scribble = scribbles_from_label(background)
    check_scribble(background, scribble)
    assert 0 < (scribble == 0).sum() < 0.2 * background.size
    full = np.full((10, 10), 2, dtype=np.uint8)
    scribble = scribbles_from_label(full)
    check_scribble(full, scribble)
    assert not (scribble == 0).any()


def test_3d_is_slice_by_slice_and_deterministic() -> None:
    _, label = generate_cardiac_volume(np.random.default_rng(3), 4, (40, 40))
    vol = scribbles_from_label(label, rng=np.random.default_rng(7))
    rng = np.random.default_rng(7)
    per_slice = np.stack([scribbles_from_label(sl, rng=rng) for sl in label])
    assert vol.shape == label.shape and vol.dtype == np.uint8
    assert np.array_equal(vol, per_slice)
    # rng=None is reproducible.
    assert np.array_equal(scribbles_from_label(label), scribbles_from_label(label))


def test_other_num_classes_and_ignore_index() -> None:
    label = np.zeros((30, 30), dtype=np.int32)
    label[5:15, 5:15] = 1
    label[18:26, 18:28] = 2
    scribble = scribbles_from_label(label, num_classes=3, ignore_index=255,
                                    rng=np.random.default_rng(0))
    check_scribble(label, scribble, num_classes=3, ignore=255)


def test_bad_labels_raise_data_error() -> None:
    label = np.zeros((8, 8), dtype=np.uint8)
    label[2, 2] = 5
    with pytest.raises(DataError, match=r"\[0, 4\).*5"):
        scribbles_from_label(label)
    with pytest.raises(DataError, match="-1"):
        scribbles_from_label(np.full((8, 8), -1, dtype=np.int16))
    with pytest.raises(DataError, match="integer"):
        scribbles_from_label(np.full((8, 8), 0.5))
    with pytest.raises(DataError, match="shape"):
        scribbles_from_label(np.zeros(8, dtype=np.uint8))
    # Integral floats are accepted (labels often come back as float from resampling).
    check_scribble(np.ones((8, 8)), scribbles_from_label(np.ones((8, 8))))
    with pytest.raises(ValueError, match="ignore_index"):
        scribbles_from_label(np.zeros((8, 8), dtype=np.uint8), ignore_index=2)
