"""Instance records, readers (ISBI 2014, unlabeled EDF, COCO), splits and the cytology phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from pycocotools import mask as mask_utils
from skimage import io

from kdseg.data.cytology_phantom import make_cytology_phantom
from kdseg.data.cell_images import read_unlabeled_images
from kdseg.data.coco import read_coco
from kdseg.data.instances import CYTOPLASM, NUCLEUS, InstanceSample, split_labeled
from kdseg.data.isbi2014 import read_isbi2014
from kdseg.data.volume import DataError

REPO = Path(__file__).resolve().parents[1]
ISBI = REPO.parent / "shared" / "data" / "isbi2014"
needs_isbi = pytest.mark.skipif(
    not (ISBI / "train" / "isbi_train_GT.mat").is_file(),
    reason=f"real ISBI 2014 data not found at {ISBI} (../shared/data/isbi2014)",
)


def save(path: Path, arr: np.ndarray) -> None:
    io.imsave(str(path), arr, check_contrast=False)


# --------------------------------------------------------------------------- record


def test_instance_sample_boxes_and_target():
    masks = np.zeros((3, 8, 10), dtype=bool)
    masks[0, 1:4, 2:6] = True  # rows 1-3, cols 2-5
    masks[1, 5, 7] = True  # single pixel
    masks[2, 0:6, 0:8] = True  # overlaps instance 0
    s = InstanceSample("a", np.zeros((8, 10)), masks, [1, 2, 1])
    assert s.image.dtype == np.float32 and s.labels.dtype == np.int64
    np.testing.assert_array_equal(s.boxes, [[2, 1, 6, 4], [7, 5, 8, 6], [0, 0, 8, 6]])
    t = s.to_target()
    assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (3, 4)
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == [1, 2, 1]
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (3, 8, 10)
    assert bool((t["boxes"][:, 2:] > t["boxes"][:, :2]).all())  # torchvision needs positive sizes
    assert t["masks"][0].sum() + t["masks"][2].sum() > torch.from_numpy(masks[0] | masks[2]).sum()


def test_instance_sample_validates():
    with pytest.raises(DataError, match="mask shape"):
        InstanceSample("a", np.zeros((8, 8)), np.zeros((1, 8, 9), bool), [1])
    with pytest.raises(DataError, match="labels"):
        InstanceSample("a", np.zeros((8, 8)), np.zeros((2, 8, 8), bool), [1])


# --------------------------------------------------------------------------- phantom


def test_phantom_deterministic_and_shapes():
    a = make_cytology_phantom(4, seed=3, size=96)
    b = make_cytology_phantom(4, seed=3, size=96)
    c = make_cytology_phantom(2, seed=4, size=96)
    first = make_cytology_phantom(1, seed=3, size=96)  # image i does not depend on num_images
    assert len(a) == 4
    for x, y in zip(a, b):
        assert x.image_id == y.image_id
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.masks, y.masks)
    np.testing.assert_array_equal(first[0].image, a[0].image)
    assert not np.array_equal(a[0].image, c[0].image)
    for s in a:
        assert s.image.shape == (96, 96) and s.image.dtype == np.float32
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        assert s.masks.dtype == bool and s.masks.shape[1:] == (96, 96)
        n = int((s.labels == CYTOPLASM).sum())
        assert 2 <= n <= 6 and int((s.labels == NUCLEUS).sum()) == n
        assert s.masks.reshape(len(s.labels), -1).any(axis=1).all()
        assert s.source is None


def test_phantom_overlap_nucleus_inside_and_darker_overlaps():
    samples = make_cytology_phantom(6, seed=0, size=128, cells_per_image=(3, 6), overlap=0.8)
    overlaps = 0
    for s in samples:
        cyto = s.masks[s.labels == CYTOPLASM]
        nuc = s.masks[s.labels == NUCLEUS]
        for k in range(len(cyto)):
            assert nuc[k].any() and not (nuc[k] & ~cyto[k]).any()  # nucleus k inside cell k
            assert nuc[k].sum() < 0.25 * cyto[k].sum()
        cover = cyto.sum(axis=0)
        if (cover >= 2).sum() > 10:
            overlaps += 1
            # Absorbance adds up: overlaps (no nucleus) are darker than single-cell cytoplasm.
            no_nuc = ~nuc.any(axis=0)
            assert s.image[(cover >= 2) & no_nuc].mean() < s.image[(cover == 1) & no_nuc].mean()
        assert s.image[cover == 0].mean() > s.image[nuc.any(axis=0)].mean() + 0.3
    assert overlaps >= 3
    apart = make_cytology_phantom(6, seed=0, size=128, cells_per_image=(2, 2), overlap=0.0)
    n_apart = sum(int((s.masks[s.labels == CYTOPLASM].sum(0) >= 2).sum() > 10) for s in apart)
    assert n_apart < overlaps


def test_phantom_bad_arguments():
    with pytest.raises(ValueError):
        make_cytology_phantom(1, 0, cells_per_image=(3, 2))
    with pytest.raises(ValueError):
        make_cytology_phantom(1, 0, overlap=1.5)


# --------------------------------------------------------------------------- COCO


def _write_coco(tmp_path: Path, categories=None) -> tuple[Path, dict]:
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    gray = np.full((20, 24), 200, np.uint8)
    gray[5:12, 4:14] = 90
    rgb = np.stack([gray] * 3, axis=-1)
    save(img_dir / "a.png", gray)
    save(img_dir / "b.png", rgb)

    cyto = np.zeros((20, 24), np.uint8)
    cyto[3:15, 2:18] = 1
    cyto_rle = mask_utils.encode(np.asfortranarray(cyto))
    cyto_rle["counts"] = cyto_rle["counts"].decode("ascii")  # compressed RLE string
    # uncompressed RLE of an overlapping nucleus rows 6-9, cols 10-19 (column-major runs)
    nuc = np.zeros((20, 24), np.uint8)
    nuc[6:10, 10:20] = 1
    flat = nuc.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 20, "width": 24},
            {"id": 2, "file_name": "b.png", "height": 20, "width": 24},
        ],
        "categories": categories or [{"id": 1, "name": "Cytoplasm"}, {"id": 7, "name": "nucleus"}],
        "annotations": [
            # polygon square x 4..13, y 5..11 (pixel corners)
            {"id": 10, "image_id": 1, "category_id": 7, "iscrowd": 0,
             "segmentation": [[4, 5, 14, 5, 14, 12, 4, 12]]},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": cyto_rle},
            {"id": 12, "image_id": 2, "category_id": 7, "iscrowd": 0,
             "segmentation": {"size": [20, 24], "counts": runs}},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path, {"cyto": cyto.astype(bool), "nuc": nuc.astype(bool)}


def test_coco_round_trip(tmp_path):
    path, ref = _write_coco(tmp_path)
    samples = read_coco(path, tmp_path / "imgs")
    assert [s.image_id for s in samples] == ["a", "b"]
    a, b = samples
    assert a.image.shape == (20, 24) and a.image.dtype == np.float32
    assert a.image.max() == pytest.approx(200 / 255, abs=1e-6)
    np.testing.assert_allclose(b.image, a.image, atol=2e-3)  # RGB converted to gray
    assert a.labels.tolist() == [NUCLEUS, CYTOPLASM]
    poly = a.masks[0]
    expected = np.zeros((20, 24), bool)
    expected[5:12, 4:14] = True
    inter, union = (poly & expected).sum(), (poly | expected).sum()
    assert inter / union > 0.8  # polygon rasterisation of the 10x7 rectangle
    np.testing.assert_array_equal(a.masks[1], ref["cyto"])  # compressed RLE exact
    np.testing.assert_array_equal(b.masks[0], ref["nuc"])  # uncompressed RLE exact
    assert b.labels.tolist() == [NUCLEUS]
    assert (a.masks[0] & a.masks[1]).any()  # overlapping instances kept apart


def test_coco_category_map_and_errors(tmp_path):
    path, _ = _write_coco(tmp_path)
    s = read_coco(path, tmp_path / "imgs", category_map={"CYTOPLASM": 5, "Nucleus": 6})
    assert s[0].labels.tolist() == [6, 5]
    with pytest.raises(DataError, match="unknown category 'nucleus'"):
        read_coco(path, tmp_path / "imgs", category_map={"cytoplasm": 1})
    data = json.loads(path.read_text())
    data["annotations"].append(dict(data["annotations"][0], id=99, image_id=42))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match="image_id 42") as exc:
        read_coco(bad, tmp_path / "imgs")
    assert "bad.json" in str(exc.value)
    with pytest.raises(DataError, match="a.png"):
        read_coco(path, tmp_path)  # wrong image root
    with pytest.raises(DataError, match="not found"):
        read_coco(tmp_path / "missing.json", tmp_path)


# --------------------------------------------------------------------------- ISBI (synthetic layout)


def _fake_isbi(root: Path, cellnum=(2, 1), cyto_shape=(16, 16), keys=None) -> Path:
    img_dir = root / "train" / "images"
    img_dir.mkdir(parents=True)
    n_img = len(cellnum)
    cyto = np.empty((n_img, 1), dtype=object)
    nuclei = np.empty((n_img, 1), dtype=object)
    for i in range(n_img):
        save(img_dir / f"{i + 1}.tif", np.full((16, 16), 180 + i, np.uint8))
        cells = np.empty((2, 1), dtype=object)
        for k in range(2):
            m = np.zeros(cyto_shape, np.uint8)
            m[2 + 3 * k : 10 + 3 * k, 2:10] = 1  # two overlapping cells
            cells[k, 0] = m
        cyto[i, 0] = cells
        nuc = np.zeros((16, 16), np.uint8)
        nuc[4:7, 4:7] = 1
        nuc[11:14, 5:8] = 1
        nuc[0, 15] = 1  # a 1-pixel speck, dropped
        nuclei[i, 0] = nuc
    content = {"train_Cytoplasm": cyto, "train_Nuclei": nuclei, "CellNum": np.array(cellnum, np.uint8)[:, None]}
    if keys is not None:
        content = {k: content.get(k, np.zeros(1)) for k in keys}
    scipy.io.savemat(str(root / "train" / "isbi_train_GT.mat"), content)
    return root


def test_isbi_reader_on_synthetic_layout(tmp_path):
    root = _fake_isbi(tmp_path / "ok", cellnum=(2, 2))
    samples = read_isbi2014(root)
    assert [s.image_id for s in samples] == ["isbi2014_01", "isbi2014_02"]
    s = samples[0]
    assert s.labels.tolist() == [1, 1, 2, 2]
    assert (s.masks[0] & s.masks[1]).sum() == 5 * 8  # overlapping cells kept as two masks
    assert s.masks[2].sum() == 9 and s.masks[3].sum() == 9
    assert s.source == root / "train" / "images" / "1.tif"
    assert read_isbi2014(root / "train")[1].image_id == "isbi2014_02"  # the train folder works too


def test_isbi_reader_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_isbi2014(tmp_path / "nowhere")
    root = _fake_isbi(tmp_path / "count", cellnum=(2, 3))
    with pytest.raises(DataError, match="CellNum"):
        read_isbi2014(root)
    root = _fake_isbi(tmp_path / "shape", cyto_shape=(16, 17), cellnum=(2, 2))
    with pytest.raises(DataError, match=r"shape \(16, 17\)"):
        read_isbi2014(root)
    root = _fake_isbi(tmp_path / "keys", keys=["foo", "train_Nuclei"])
    with pytest.raises(DataError, match="train_Cytoplasm") as exc:
        read_isbi2014(root)
    assert "foo" in str(exc.value) and "isbi_train_GT.mat" in str(exc.value)
    root = _fake_isbi(tmp_path / "img", cellnum=(2, 2))
    (root / "train" / "images" / "2.tif").unlink()
    with pytest.raises(DataError, match="2.tif"):
        read_isbi2014(root)


# --------------------------------------------------------------------------- unlabeled, split


def test_unlabeled_resize_keeps_aspect(tmp_path):
    save(tmp_path / "x.png", np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1)))  # 64x128
    (s,) = read_unlabeled_images(tmp_path, size=32)
    assert s.image.shape == (16, 32) and s.masks.shape == (0, 16, 32) and s.labels.shape == (0,)
    assert s.image_id == "x" and 0.0 <= s.image.min() and s.image.max() <= 1.0
    (full,) = read_unlabeled_images(tmp_path, size=None)
    assert full.image.shape == (64, 128)
    with pytest.raises(DataError, match="no files"):
        read_unlabeled_images(tmp_path, pattern="*.jpg")


def test_split_labeled():
    samples = make_cytology_phantom(10, seed=1, size=32, cells_per_image=(1, 1))
    lab, unl = split_labeled(samples, num_labeled=3, seed=0)
    lab2, _ = split_labeled(samples, num_labeled=3, seed=0)
    lab3, _ = split_labeled(samples, num_labeled=3, seed=1)
    assert len(lab) == 3 and len(unl) == 7
    assert [s.image_id for s in lab] == [s.image_id for s in lab2]
    assert [s.image_id for s in lab] != [s.image_id for s in lab3]
    assert not {s.image_id for s in lab} & {s.image_id for s in unl}
    assert len(split_labeled(samples, fraction=0.25)[0]) == 2  # round(2.5) -> 2
    assert len(split_labeled(samples, fraction=0.01)[0]) == 1
    with pytest.raises(ValueError):
        split_labeled(samples, num_labeled=3, fraction=0.5)
    with pytest.raises(ValueError):
        split_labeled(samples, num_labeled=11)


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def isbi_samples():
    return read_isbi2014(ISBI)


@needs_isbi
@pytest.mark.real_data
def test_isbi2014_real(isbi_samples):
    mat = scipy.io.loadmat(str(ISBI / "train" / "isbi_train_GT.mat"), variable_names=["CellNum"])
    cellnum = mat["CellNum"].ravel()
    assert len(isbi_samples) == 36
    for s, n in zip(isbi_samples, cellnum):
        assert s.image.shape == (512, 512) and s.masks.shape[1:] == (512, 512)
        n_cells = int((s.labels == CYTOPLASM).sum())
        n_nuc = int((s.labels == NUCLEUS).sum())
        assert n_cells == int(n)
        assert n_nuc > 0
        assert s.masks.reshape(len(s.labels), -1).any(axis=1).all()
    # Cells overlap in the real data (the whole point of not flattening).
    assert any((s.masks[s.labels == CYTOPLASM].sum(0) >= 2).any() for s in isbi_samples)
    t = isbi_samples[0].to_target()
    assert t["masks"].shape[1:] == (512, 512) and t["boxes"].shape == (len(isbi_samples[0].labels), 4)


@needs_isbi
@pytest.mark.real_data
def test_edf_unlabeled_real():
    samples = read_unlabeled_images(ISBI / "edf", pattern="EDF*.png", size=512)
    assert len(samples) == 16
    assert [s.image_id for s in samples][:2] == ["EDF000", "EDF001"]
    for s in samples:
        assert s.image.shape == (512, 512) and s.image.dtype == np.float32
        assert s.masks.shape == (0, 512, 512)
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
