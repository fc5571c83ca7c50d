"""SliceDataset's cache of resized slices: items identical to resizing on every call, the same
augmentation draws, and served copies that never alias the cache."""

from __future__ import annotations

import numpy as np
import torch

from kdseg.data.phantom import make_phantom_volumes
from kdseg.data.slices import SliceDataset, resize_slice, weak_augment


def _uncached_item(ds: SliceDataset, i: int) -> dict:
    """The item as SliceDataset built it before the cache: resize on every call."""
    v, s = ds.index[i]
    volume = ds.volumes[v]
    image = resize_slice(torch.from_numpy(np.ascontiguousarray(volume.image[s]))[None], ds.image_size, "bilinear")
    array = getattr(volume, ds.target_key)
    target = resize_slice(torch.from_numpy(array[s].astype(np.int64)), ds.image_size, "nearest").long()
    if ds.augment:
        image, target = weak_augment(image, target, ds.target_fill, ds.max_rotation_degrees)
    return {"image": image.float(), "target": target}


def test_cached_items_equal_uncached_ones_with_the_same_draws() -> None:
    volumes = make_phantom_volumes(2, seed=3, num_slices=3, size=(40, 36))
    for target_key in ("label", "scribble"):
        ds = SliceDataset(volumes, target_key, image_size=32, augment=True, target_fill=4)
        for epoch in range(3):  # epoch 0 fills the cache, later epochs read it
            for i in range(len(ds)):
                torch.manual_seed(100 * epoch + i)
                expected = _uncached_item(ds, i)
                torch.manual_seed(100 * epoch + i)
                item = ds[i]
                assert item["target"].dtype == torch.long and item["image"].dtype == torch.float32
                assert torch.equal(item["image"], expected["image"])
                assert torch.equal(item["target"], expected["target"])
        assert len(ds._resized) == len(ds)


def test_served_items_do_not_alias_the_cache() -> None:
    volumes = make_phantom_volumes(1, seed=0, num_slices=2, size=(32, 32))
    ds = SliceDataset(volumes, "label", image_size=32, augment=False)
    first = ds[0]
    first["image"].fill_(-1.0)
    first["target"].fill_(7)
    again = ds[0]
    assert torch.equal(again["image"][0], torch.from_numpy(volumes[0].image[0]).float())
    assert torch.equal(again["target"], torch.from_numpy(volumes[0].label[0].astype(np.int64)))
