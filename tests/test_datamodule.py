"""Data modules: splits, labeled/unlabeled streams, targets, augmentation, real ACDC settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_ACDC, requires_acdc

from kdseg.data.datamodule import ACDCDataModule, PhantomDataModule
from kdseg.data.slices import SliceDataset, weak_augment


def small_phantom(**kwargs) -> PhantomDataModule:
    defaults = dict(
        num_train_patients=4, num_val_patients=1, num_test_patients=1, num_slices=3, phantom_size=40, image_size=32, batch_size=2
    )
    return PhantomDataModule(**{**defaults, **kwargs})


def test_phantom_labeled_unlabeled_streams() -> None:
    dm = small_phantom(labeled_patients=1, unlabeled_batch_size=3)
    dm.setup("fit")
    assert {v.patient_id for v in dm.labeled_volumes} == {"phantom000"}
    assert {v.patient_id for v in dm.unlabeled_volumes} == {"phantom001", "phantom002", "phantom003"}
    assert all(v.label is None and v.scribble is None for v in dm.unlabeled_volumes)  # nothing leaks
    assert [v.patient_id for v in dm.val_volumes] == ["phantom004", "phantom004"]
    batch = next(iter(dm.train_dataloader()))[0]
    assert set(batch) == {"labeled", "unlabeled"}
    assert batch["labeled"]["image"].shape == (2, 1, 32, 32)
    assert batch["labeled"]["target"].shape == (2, 32, 32) and batch["labeled"]["target"].dtype == torch.long
    assert batch["unlabeled"]["image"].shape == (3, 1, 32, 32)
    assert "target" not in batch["unlabeled"]
    volume = next(iter(dm.val_dataloader()))
    assert volume["image"].shape == (3, 40, 40) and volume["label"].shape == (3, 40, 40)
    assert volume["input_size"] == 32 and torch.allclose(volume["spacing"], torch.tensor([10.0, 1.5, 1.5], dtype=torch.float64))


def test_scribble_supervision_serves_scribbles_with_ignore() -> None:
    dm = small_phantom(supervision="scribble")
    dm.setup("fit")
    assert not dm.has_unlabeled
    targets = torch.cat([b["labeled"]["target"].flatten() for b, *_ in dm.train_dataloader()])
    values = set(targets.unique().tolist())
    assert 4 in values and values <= {0, 1, 2, 3, 4}
    assert (targets == 4).float().mean() > 0.5  # scribbles are sparse


def test_rotation_fills_scribbles_with_ignore_not_background() -> None:
    torch.manual_seed(3)
    image = torch.ones(1, 16, 16)
    scribble = torch.full((16, 16), 1, dtype=torch.long)
    seen_fill = False
    for _ in range(60):
        img, target = weak_augment(image, scribble, target_fill=4, max_rotation_degrees=30)
        assert set(target.unique().tolist()) <= {1, 4}
        seen_fill |= bool((target == 4).any())
        assert img.shape == (1, 16, 16)
    assert seen_fill


def test_slice_dataset_resizes_labels_without_new_values() -> None:
    dm = small_phantom()
    dm.setup("fit")
    ds = SliceDataset(dm.labeled_volumes, "label", image_size=24, augment=False)
    item = ds[0]
    assert item["image"].shape == (1, 24, 24)
    assert set(item["target"].unique().tolist()) <= {0, 1, 2, 3}
    assert len(ds) == sum(v.num_slices for v in dm.labeled_volumes)


def test_too_many_labeled_patients_is_an_error() -> None:
    dm = small_phantom(labeled_patients=9)
    with pytest.raises(ValueError, match="only 4 patients"):
        dm.setup("fit")


def test_unlabeled_batch_without_unlabeled_patients_is_an_error() -> None:
    dm = small_phantom(unlabeled_batch_size=2)
    with pytest.raises(ValueError, match="every train patient is labeled"):
        dm.setup("fit")


def test_acdc_module_on_acdc_like_folder(acdc_like_root: Path) -> None:
    dm = ACDCDataModule(acdc_like_root, labeled_patients=2, unlabeled_batch_size=2, image_size=32, batch_size=2)
    dm.setup("fit")
    assert len(dm.labeled_volumes) == 4 and len(dm.unlabeled_volumes) == 8
    dm.setup("test")
    assert len(dm.test_volumes) == 4
    dm.setup("predict")
    assert [v.case_id for v in dm.predict_volumes] == [v.case_id for v in dm.test_volumes]


def test_acdc_split_override(acdc_like_root: Path, tmp_path: Path) -> None:
    split = tmp_path / "mine.txt"
    split.write_text("phantom009\n")
    dm = ACDCDataModule(acdc_like_root, val_split=split, image_size=32)
    dm.setup("validate")
    assert {v.patient_id for v in dm.val_volumes} == {"phantom009"}


@requires_acdc
@pytest.mark.real_data
@pytest.mark.parametrize("labeled, slices", [(3, 68), (7, 136)])
def test_real_acdc_ssl4mis_settings(labeled: int, slices: int) -> None:
    dm = ACDCDataModule(SHARED_ACDC, labeled_patients=labeled, unlabeled_batch_size=12)
    dm.setup("fit")
    assert dm.num_labeled_slices == slices
    assert len({v.patient_id for v in dm.labeled_volumes}) == labeled
    # No test.txt in the shared copy: the last 5 of the 70 train patients select the checkpoint.
    assert len({v.patient_id for v in dm.unlabeled_volumes}) == 65 - labeled
    assert len(dm.val_volumes) == 10  # 5 patients x (ED, ES)
    assert all(v.label is not None for v in dm.val_volumes)


@requires_acdc
@pytest.mark.real_data
def test_real_acdc_scribbles_for_all_65_training_patients() -> None:
    dm = ACDCDataModule(SHARED_ACDC, supervision="scribble", image_size=64, batch_size=4)
    dm.setup("fit")
    assert len({v.patient_id for v in dm.labeled_volumes}) == 65  # 70 minus the 5 held out
    batch = next(iter(dm.train_dataloader()))[0]["labeled"]
    assert set(batch["target"].unique().tolist()) <= {0, 1, 2, 3, 4}
    assert np.isin(4, batch["target"].numpy())
