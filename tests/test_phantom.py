"""The synthetic cardiac phantom: shapes, determinism, anatomy consistency, ACDC-like writing."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage as ndi

from kdseg.data.phantom import (
    generate_cardiac_slice,
    generate_cardiac_volume,
    make_phantom_volumes,
    write_acdc_like,
)
from kdseg.data.volume import Volume

BG, RV, MYO, LV = 0, 1, 2, 3
EIGHT = np.ones((3, 3), dtype=bool)


@pytest.fixture(scope="module")
def volumes() -> list[Volume]:
    # 6 patients x 2 frames of 8 slices, 64x64: ~0.2 s, shared by the tests below.
    return make_phantom_volumes(6, seed=11)


def check_label_consistency(label: np.ndarray) -> None:
    """Anatomical invariants of one (H, W) label slice."""
    assert set(np.unique(label).tolist()) <= {BG, RV, MYO, LV}
    lv, rv, myo = label == LV, label == RV, label == MYO
    if lv.any():
        # The Myo ring encloses the LV: one pixel out of the LV is only LV or Myo.
        around = ndi.binary_dilation(lv, EIGHT)
        assert set(np.unique(label[around]).tolist()) <= {MYO, LV}
        assert myo.any()
    if rv.any():
        around = ndi.binary_dilation(rv, EIGHT)
        assert (label[around] == MYO).any(), "RV must touch the myocardium"
        assert not (label[around] == LV).any(), "RV must not touch the LV"
        assert ndi.label(rv, structure=EIGHT)[1] == 1, "RV is one crescent"


def test_generate_volume_shapes_dtypes_ranges() -> None:
    image, label = generate_cardiac_volume(np.random.default_rng(0), 7, (48, 40))
    assert image.shape == label.shape == (7, 48, 40)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.min() == 0.0 and image.max() == 1.0  # per-volume scaling like ACDC
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
    for sl in label:
        check_label_consistency(sl)


def test_generate_slice_has_all_classes_and_contrast() -> None:
    for i in range(10):
        image, label = generate_cardiac_slice(np.random.default_rng(i), (64, 64))
        assert image.shape == label.shape == (64, 64)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
        check_label_consistency(label)
        # Bright blood pools, dark myocardium, RV slightly dimmer than LV on average.
        mean = {c: float(image[label == c].mean()) for c in range(4)}
        assert mean[LV] > mean[MYO] + 0.2 and mean[RV] > mean[MYO] + 0.15
        # Background is not flat: it has its own anatomy.
        assert image[label == BG].std() > 0.05


def test_make_phantom_volumes_records(volumes: list[Volume]) -> None:
    assert len(volumes) == 12
    assert [v.case_id for v in volumes[:4]] == [
        "phantom000_frame01", "phantom000_frame12", "phantom001_frame01", "phantom001_frame12"]
    for v in volumes:
        assert v.patient_id == v.case_id.split("_")[0]
        assert v.source is None and v.source_format == "phantom"
        assert v.spacing == (10.0, 1.5, 1.5)
        assert v.image.shape == v.label.shape == v.scribble.shape == (8, 64, 64)
        assert v.image.dtype == np.float32 and v.label.dtype == np.uint8
        assert v.scribble.dtype == np.uint8
        assert 0.0 <= v.image.min() and v.image.max() <= 1.0
        assert set(np.unique(v.scribble).tolist()) <= {0, 1, 2, 3, 4}
        # Scribbles come from the label: never a stroke outside its class.
        marked = v.scribble != 4
        assert np.array_equal(v.scribble[marked], v.label[marked])
        for sl in v.label:
            check_label_consistency(sl)


def test_mid_slices_have_all_classes_and_some_slice_misses_one(volumes: list[Volume]) -> None:
    for v in volumes:
        present = [set(np.unique(sl).tolist()) for sl in v.label]
        assert present[v.num_slices // 2 - 1] == {0, 1, 2, 3}
        assert present[0] == {0, 1, 2, 3}  # base
        # The apical end lacks the RV (and sometimes more), so metrics meet absent classes.
        assert RV not in present[-1]
        assert any(len(p) < 4 for p in present)


def test_determinism_and_independence_from_patient_count() -> None:
    a = make_phantom_volumes(2, seed=3, num_slices=4, size=(32, 32))
    b = make_phantom_volumes(2, seed=3, num_slices=4, size=(32, 32))
    for va, vb in zip(a, b, strict=True):
        assert va.case_id == vb.case_id
        for name in ("image", "label", "scribble"):
            assert np.array_equal(getattr(va, name), getattr(vb, name))
    # Patient 1 is the same whether 2 or 3 patients are asked for.
    c = make_phantom_volumes(3, seed=3, num_slices=4, size=(32, 32))
    assert np.array_equal(c[2].image, a[2].image) and np.array_equal(c[3].label, a[3].label)
    # Another seed, or another patient, is another heart.
    d = make_phantom_volumes(2, seed=4, num_slices=4, size=(32, 32))
    assert not np.array_equal(d[0].image, a[0].image)
    assert not np.array_equal(d[0].label, a[0].label)
    assert not np.array_equal(a[0].label, a[2].label)
    # The public generator is deterministic in its rng too.
    x = generate_cardiac_volume(np.random.default_rng(9), 3, (32, 32))
    y = generate_cardiac_volume(np.random.default_rng(9), 3, (32, 32))
    assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])


def test_second_frame_is_same_heart_in_systole(volumes: list[Volume]) -> None:
    for ed, es in zip(volumes[::2], volumes[1::2], strict=True):
        assert ed.patient_id == es.patient_id
        assert (es.label == LV).sum() < (ed.label == LV).sum()  # LV empties
        # Same place and size overall: the hearts overlap strongly.
        h_ed, h_es = ed.label > 0, es.label > 0
        dice = 2 * (h_ed & h_es).sum() / (h_ed.sum() + h_es.sum())
        assert dice > 0.7
        # The myocardium thickens (its mass is kept while the cavity shrinks): the ring's
        # half-width on the basal slice does not go down.
        def ring_half_width(label: np.ndarray) -> float:
            return float(ndi.distance_transform_edt(label == MYO).max())
        assert ring_half_width(es.label[0]) >= ring_half_width(ed.label[0])
        assert not np.array_equal(ed.image, es.image)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_slices"):
        generate_cardiac_volume(np.random.default_rng(0), 0, (32, 32))
    with pytest.raises(ValueError, match="size"):
        generate_cardiac_slice(np.random.default_rng(0), (8, 32))
    with pytest.raises(ValueError, match="frames"):
        make_phantom_volumes(1, seed=0, frames=())


def test_write_acdc_like_round_trip(tmp_path: Path) -> None:
    vols = make_phantom_volumes(3, seed=2, num_slices=3, size=(40, 36))
    splits = {"train": ["phantom000", "phantom001"], "val": ["phantom002"]}
    root = write_acdc_like(tmp_path / "acdc", vols, splits)
    assert root == tmp_path / "acdc"
    assert sorted(p.name for p in (root / "volumes").iterdir()) == sorted(
        f"{v.case_id}.h5" for v in vols)
    assert (root / "splits" / "train.txt").read_text().split() == ["phantom000", "phantom001"]
    assert (root / "splits" / "val.txt").read_text().splitlines() == ["phantom002"]
    for v in vols:
        with h5py.File(root / "volumes" / f"{v.case_id}.h5", "r") as f:
            assert set(f.keys()) == {"image", "label", "scribble"}
            # Same dtypes as the real ACDC files.
            assert f["image"].dtype == np.float32
            assert f["label"].dtype == np.uint8
            assert f["scribble"].dtype == np.uint16
            assert f["image"].compression == "gzip"
            assert np.array_equal(f["image"][()], v.image)
            assert np.array_equal(f["label"][()], v.label)
            assert np.array_equal(f["scribble"][()], v.scribble.astype(np.uint16))
