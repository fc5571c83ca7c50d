"""Data module for overlapping cervical cell instance segmentation (ISBI 2014, COCO, phantom).

:class:`CervicalCellDataModule` reads one of three sources, chosen by which arguments are set:

- ``coco_json`` (+ ``image_root``): a COCO instance-segmentation file (:func:`read_coco`);
- ``root``: the ISBI 2014 training set (``train/images/N.tif`` + ``isbi_train_GT.mat``,
  :func:`read_isbi2014`), optionally with the 16 EDF images (``edf_root``, ``use_edf``) as extra
  unlabeled data;
- neither (``root: null``): the built-in cytology phantom (:func:`make_cytology_phantom`), so
  every config runs without data on disk. The phantom lives in this data module rather than in a
  separate one so that an ISBI config and its phantom twin differ only in data arguments.

Splits (deterministic from ``split_seed``): ``num_val_images`` and ``num_test_images`` annotated
images are held out first; of the remaining *training pool*, ``num_labeled`` images (or
``labeled_fraction`` of the pool, via :func:`split_labeled`) are labeled and the rest are
unlabeled, their masks dropped at load time so no method can use them. ``num_test_images: 0``
tests on the validation images (ISBI 2014's own test set is not part of the training release).

Batches (lists, because torchvision's detection models take lists of images):

- train: a ``CombinedLoader`` (``max_size_cycle``) of ``{"labeled": [(image, target), ...],
  "unlabeled": [image, ...]}`` (``"unlabeled"`` only when ``unlabeled_batch_size > 0`` and there
  are unlabeled images); ``image`` is float32 ``(1, H, W)`` in [0, 1], ``target`` the dict of
  :meth:`InstanceSample.to_target` (``boxes``, ``labels``, ``masks``);
- val / test: ``[(image, target, image_id), ...]``; ``target`` at the image's native size even
  when ``image`` was resized (``eval_native_size``, below);
- predict: ``[(image, image_id), ...]``, from ``predict_root`` (a folder of images) when set,
  else the test images.

Sizes: ``image_size`` resizes every image at load (longer side; masks by area interpolation
then >= 0.5) to shrink the problem for a CPU; ``crop_size`` additionally trains on random
``crop_size`` crops (instances cut to nothing, or to fewer than ``min_instance_area`` pixels,
are dropped). Training images are weakly augmented (random rot90 / flips) when ``augment``.
Validation / test metrics are scored at the images' native size (``eval_native_size``, default):
the network sees the resized image, its masks are resized back to the native ground truth by
the method (:meth:`kdseg.evaluation.InstanceEvaluator.add_batch`), as
the ISBI 2014 literature reports at 512 px and as ACDC volumes are scored at their own size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from kdseg.data.cell_images import read_unlabeled_images
from kdseg.data.coco import read_coco
from kdseg.data.instances import CLASS_NAMES, InstanceSample, split_labeled
from kdseg.data.isbi2014 import read_isbi2014
from kdseg.data.volume import DataError

__all__ = [
    "CervicalCellDataModule",
    "EvalInstanceDataset",
    "LabeledInstanceDataset",
    "PredictImageDataset",
    "UnlabeledImageDataset",
    "list_collate",
    "resize_sample",
]


# --------------------------------------------------------------------------- sample operations


def resize_sample(sample: InstanceSample, size: int) -> InstanceSample:
    """``sample`` resized so that its longer side is ``size`` (aspect ratio kept).

    The image is resized bilinearly (anti-aliased), each mask by area interpolation then
    thresholded at 0.5; instances that vanish are dropped.
    """
    h, w = sample.image.shape
    if max(h, w) == size:
        return sample
    scale = size / max(h, w)
    shape = (max(1, int(round(h * scale))), max(1, int(round(w * scale))))
    image = torch.from_numpy(sample.image)[None, None]
    image = F.interpolate(image, size=shape, mode="bilinear", align_corners=False, antialias=scale < 1)
    image_np = image[0, 0].clamp(0, 1).numpy()
    if sample.num_instances:
        masks = torch.from_numpy(sample.masks.astype(np.float32))[None]
        mode = "area" if scale < 1 else "nearest-exact"
        masks_np = (F.interpolate(masks, size=shape, mode=mode)[0] >= 0.5).numpy()
    else:
        masks_np = np.zeros((0,) + shape, dtype=bool)
    keep = masks_np.reshape(masks_np.shape[0], -1).any(axis=1)
    return InstanceSample(sample.image_id, image_np, masks_np[keep], sample.labels[keep], sample.source)


def _random_crop_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    ch, cw = min(size, h), min(size, w)
    top = int(torch.randint(0, h - ch + 1, ()))
    left = int(torch.randint(0, w - cw + 1, ()))
    return top, left, ch, cw


def _weak_geometry(image: Tensor, masks: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Random rot90 (k in 0..3) and random horizontal flip of ``(1, H, W)`` and ``(N, H, W)``."""
    k = int(torch.randint(0, 4, ()))
    flip = bool(torch.rand(()) < 0.5)
    image = torch.rot90(image, k, dims=(-2, -1))
    masks = None if masks is None else torch.rot90(masks, k, dims=(-2, -1))
    if flip:
        image = image.flip(-1)
        masks = None if masks is None else masks.flip(-1)
    return image.contiguous(), None if masks is None else masks.contiguous()


def list_collate(batch: list[Any]) -> list[Any]:
    """Keeps a batch as a list (detection models take lists of differently sized images)."""
    return list(batch)


# --------------------------------------------------------------------------- datasets


class LabeledInstanceDataset(Dataset):
    """Training items ``(image (1, H, W) float32, target dict)``, optionally cropped / augmented.

    Args:
        samples: labeled samples.
        crop_size: random square crops of this size (None: whole images).
        augment: random rot90 / horizontal flip.
        min_instance_area: instances with fewer pixels after cropping are dropped.
    """

    def __init__(
        self, samples: Sequence[InstanceSample], crop_size: int | None = None, augment: bool = True,
        min_instance_area: int = 4,
    ) -> None:
        self.samples = list(samples)
        self.crop_size = crop_size
        self.augment = augment
        self.min_instance_area = min_instance_area

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        s = self.samples[index]
        image = torch.from_numpy(s.image)[None]
        masks = torch.from_numpy(s.masks)
        labels = torch.from_numpy(s.labels)
        if self.crop_size is not None:
            top, left, ch, cw = _random_crop_box(*s.image.shape, self.crop_size)
            image = image[:, top : top + ch, left : left + cw]
            masks = masks[:, top : top + ch, left : left + cw]
        if self.augment:
            image, masks = _weak_geometry(image, masks)
        assert masks is not None
        keep = masks.flatten(1).sum(dim=1) >= max(self.min_instance_area, 1)
        sample = InstanceSample(s.image_id, image[0].numpy(), masks[keep].numpy(), labels[keep].numpy())
        return image.contiguous().float(), sample.to_target()


class UnlabeledImageDataset(Dataset):
    """Training items ``image (1, H, W) float32`` (no target), optionally cropped / augmented."""

    def __init__(self, samples: Sequence[InstanceSample], crop_size: int | None = None, augment: bool = True) -> None:
        self.samples = list(samples)
        self.crop_size = crop_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tensor:
        s = self.samples[index]
        image = torch.from_numpy(s.image)[None]
        if self.crop_size is not None:
            top, left, ch, cw = _random_crop_box(*s.image.shape, self.crop_size)
            image = image[:, top : top + ch, left : left + cw]
        if self.augment:
            image, _ = _weak_geometry(image, None)
        return image.contiguous().float()


class EvalInstanceDataset(Dataset):
    """Validation / test items ``(image (1, H, W), target dict, image_id)``, whole images.

    ``targets``: the same images' annotations at another (native) size, paired by position;
    None = each sample's own annotations.
    """

    def __init__(self, samples: Sequence[InstanceSample], targets: Sequence[InstanceSample] | None = None) -> None:
        self.samples = list(samples)
        self.targets = list(targets) if targets is not None else self.samples
        if [s.image_id for s in self.targets] != [s.image_id for s in self.samples]:
            raise ValueError("evaluation targets must be the same images as the samples, in the same order")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor], str]:
        s = self.samples[index]
        return torch.from_numpy(s.image)[None].float(), self.targets[index].to_target(), s.image_id


class PredictImageDataset(Dataset):
    """Prediction items ``(image (1, H, W), image_id)``."""

    def __init__(self, samples: Sequence[InstanceSample]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        s = self.samples[index]
        return torch.from_numpy(s.image)[None].float(), s.image_id


# --------------------------------------------------------------------------- data module


def _drop_annotations(sample: InstanceSample) -> InstanceSample:
    return InstanceSample(
        sample.image_id, sample.image, np.zeros((0,) + sample.image.shape, dtype=bool),
        np.zeros((0,), dtype=np.int64), sample.source,
    )


class CervicalCellDataModule(pl.LightningDataModule):
    """ISBI 2014 / COCO / phantom cervical cells for Mask R-CNN methods (see the module docstring).

    Args:
        root: ISBI 2014 folder (holding ``train/``); None with ``coco_json`` None = the phantom.
        coco_json, image_root: a COCO instance JSON and the folder its file names are relative
            to (``image_root`` defaults to the JSON's folder).
        edf_root: folder of the extra unlabeled EDF images (ISBI); ``use_edf`` adds them to the
            unlabeled pool. ``edf_pattern``: their file glob.
        num_labeled, labeled_fraction: size of the labeled part of the training pool (give at
            most one; neither = every pool image labeled).
        num_val_images, num_test_images: annotated images held out for validation / test
            (``num_test_images: 0`` tests on the validation images).
        split_seed: seed of the held-out and labeled splits.
        image_size: resize every image (longer side) at load; None keeps the original size.
            EDF images (1024 px) are resized to ``image_size`` or, when None, to 512 (ISBI scale).
        eval_native_size: validation / test targets stay at the native size (ISBI: 512 px), so
            metrics are scored there; False scores at ``image_size`` (kdseg before 2026-12).
        crop_size: random square training crops (None: whole images).
        batch_size, unlabeled_batch_size: labeled / unlabeled images per training step
            (``unlabeled_batch_size: 0`` = no unlabeled stream).
        eval_batch_size: images per validation / test / predict step.
        augment: random rot90 / flips of training images.
        min_instance_area: training instances cut by a crop to fewer pixels are dropped.
        num_workers: data loader workers.
        predict_root, predict_pattern: images to predict (default: the test images).
        phantom_num_images: annotated phantom images (split like ISBI's 36).
        phantom_num_unlabeled: extra unannotated phantom images (the phantom's "EDF"; added
            when ``use_edf``).
        phantom_size, phantom_seed, phantom_cells, phantom_overlap: phantom generation
            (:func:`make_cytology_phantom`).
        num_classes: classes including background (3: background, cytoplasm, nucleus), fixed by
            the data; the CLI links it to the model's ``num_classes``.
    """

    class_names: dict[int, str] = dict(CLASS_NAMES)

    def __init__(
        self,
        root: str | None = None,
        coco_json: str | None = None,
        image_root: str | None = None,
        edf_root: str | None = None,
        use_edf: bool = True,
        edf_pattern: str = "*.png",
        num_labeled: int | None = None,
        labeled_fraction: float | None = None,
        num_val_images: int = 6,
        num_test_images: int = 0,
        split_seed: int = 0,
        image_size: int | None = None,
        eval_native_size: bool = True,
        crop_size: int | None = None,
        batch_size: int = 2,
        unlabeled_batch_size: int = 0,
        eval_batch_size: int = 1,
        augment: bool = True,
        min_instance_area: int = 4,
        num_workers: int = 0,
        predict_root: str | None = None,
        predict_pattern: str = "*.png",
        phantom_num_images: int = 24,
        phantom_num_unlabeled: int = 0,
        phantom_size: int = 128,
        phantom_seed: int = 0,
        phantom_cells: tuple[int, int] = (2, 6),
        phantom_overlap: float = 0.3,
        num_classes: int = len(CLASS_NAMES) + 1,
    ) -> None:
        super().__init__()
        if num_classes != len(CLASS_NAMES) + 1:
            raise ValueError(f"data.num_classes must be {len(CLASS_NAMES) + 1} (background, "
                             f"{', '.join(CLASS_NAMES.values())}), got {num_classes}")
        if root is not None and coco_json is not None:
            raise ValueError("give data.root (ISBI 2014) or data.coco_json, not both")
        if num_labeled is not None and labeled_fraction is not None:
            raise ValueError("give at most one of data.num_labeled and data.labeled_fraction")
        if batch_size < 1 or unlabeled_batch_size < 0 or eval_batch_size < 1:
            raise ValueError("data.batch_size, data.eval_batch_size must be >= 1, unlabeled_batch_size >= 0")
        if num_val_images < 1 or num_test_images < 0:
            raise ValueError("data.num_val_images must be >= 1 and data.num_test_images >= 0")
        for name, value in (("image_size", image_size), ("crop_size", crop_size)):
            if value is not None and value < 32:
                raise ValueError(f"data.{name} must be >= 32 or null, got {value}")
        self.num_classes = num_classes
        self.root = root
        self.coco_json = coco_json
        self.image_root = image_root
        self.edf_root = edf_root
        self.use_edf = use_edf
        self.edf_pattern = edf_pattern
        self.num_labeled = num_labeled
        self.labeled_fraction = labeled_fraction
        self.num_val_images = num_val_images
        self.num_test_images = num_test_images
        self.split_seed = split_seed
        self.image_size = image_size
        self.eval_native_size = eval_native_size
        self.crop_size = crop_size
        self.batch_size = batch_size
        self.unlabeled_batch_size = unlabeled_batch_size
        self.eval_batch_size = eval_batch_size
        self.augment = augment
        self.min_instance_area = min_instance_area
        self.num_workers = num_workers
        self.predict_root = predict_root
        self.predict_pattern = predict_pattern
        self.phantom = dict(
            num_images=phantom_num_images, num_unlabeled=phantom_num_unlabeled, size=phantom_size,
            seed=phantom_seed, cells=tuple(phantom_cells), overlap=phantom_overlap,
        )
        self.labeled_samples: list[InstanceSample] = []
        self.unlabeled_samples: list[InstanceSample] = []
        self.val_samples: list[InstanceSample] = []
        self.test_samples: list[InstanceSample] = []
        # The validation / test images' annotations at native size (same order as the samples).
        self.val_targets: list[InstanceSample] = []
        self.test_targets: list[InstanceSample] = []
        self.predict_samples: list[InstanceSample] = []
        self._loaded = False

    # -- loading ------------------------------------------------------------------------------------
    @property
    def source_name(self) -> str:
        return "coco" if self.coco_json else ("isbi2014" if self.root else "phantom")

    def _read_annotated(self) -> list[InstanceSample]:
        if self.coco_json is not None:
            json_path = Path(self.coco_json)
            return read_coco(json_path, Path(self.image_root) if self.image_root else json_path.parent)
        if self.root is not None:
            return read_isbi2014(Path(self.root))
        from kdseg.data.cytology_phantom import make_cytology_phantom

        p = self.phantom
        return make_cytology_phantom(p["num_images"], p["seed"], p["size"], p["cells"], p["overlap"])

    def _read_extra_unlabeled(self) -> list[InstanceSample]:
        if not self.use_edf:
            return []
        if self.source_name == "phantom":
            if self.phantom["num_unlabeled"] <= 0:
                return []
            from kdseg.data.cytology_phantom import make_cytology_phantom

            p = self.phantom
            extra = make_cytology_phantom(p["num_unlabeled"], p["seed"] + 1, p["size"], p["cells"], p["overlap"])
            return [_drop_annotations(s) for s in extra]
        if self.edf_root is None:
            return []
        return read_unlabeled_images(Path(self.edf_root), self.edf_pattern, size=self.image_size or 512)

    def _resize(self, samples: list[InstanceSample]) -> list[InstanceSample]:
        if self.image_size is None:
            return samples
        return [resize_sample(s, self.image_size) for s in samples]

    def load(self) -> None:
        """Reads the source once and makes the splits (idempotent)."""
        if self._loaded:
            return
        native = self._read_annotated()
        samples = self._resize(native)
        targets = native if self.eval_native_size else samples
        held_out = self.num_val_images + self.num_test_images
        if len(samples) <= held_out:
            raise DataError(
                f"{self.source_name}: {len(samples)} annotated images, but {self.num_val_images} validation + "
                f"{self.num_test_images} test images are held out and at least one must remain for training"
            )
        order = np.random.default_rng(self.split_seed).permutation(len(samples))
        val_idx = set(order[: self.num_val_images].tolist())
        test_idx = set(order[self.num_val_images : held_out].tolist())
        self.val_samples = [s for i, s in enumerate(samples) if i in val_idx]
        self.val_targets = [s for i, s in enumerate(targets) if i in val_idx]
        self.test_samples = [s for i, s in enumerate(samples) if i in test_idx] or list(self.val_samples)
        self.test_targets = [s for i, s in enumerate(targets) if i in test_idx] or list(self.val_targets)
        pool = [s for i, s in enumerate(samples) if i not in val_idx and i not in test_idx]
        if self.num_labeled is None and self.labeled_fraction is None:
            labeled, unlabeled = pool, []
        else:
            if self.num_labeled is not None and self.num_labeled > len(pool):
                raise DataError(
                    f"data.num_labeled={self.num_labeled} but the training pool has only {len(pool)} images "
                    f"({len(samples)} annotated minus {held_out} held out)"
                )
            labeled, unlabeled = split_labeled(pool, self.num_labeled, self.labeled_fraction, seed=self.split_seed)
        if not labeled:
            raise DataError("no labeled training image: raise data.num_labeled / data.labeled_fraction")
        for s in labeled:
            if s.num_instances == 0:
                raise DataError(f"{s.source or s.image_id}: labeled image without any annotated instance")
        self.labeled_samples = labeled
        self.unlabeled_samples = [_drop_annotations(s) for s in unlabeled] + self._read_extra_unlabeled()
        if self.crop_size is not None:
            train = self.labeled_samples + self.unlabeled_samples
            small = [s.image_id for s in train if min(s.image.shape) < self.crop_size]
            if small:
                raise DataError(f"data.crop_size={self.crop_size} is larger than image(s) {small[:3]}")
        self._loaded = True

    def setup(self, stage: str) -> None:
        self.load()
        if stage == "fit" and self.unlabeled_batch_size > 0 and not self.unlabeled_samples:
            raise DataError(
                f"data.unlabeled_batch_size={self.unlabeled_batch_size} but there is no unlabeled image: "
                "label fewer images (data.num_labeled) or add EDF images (data.edf_root, data.use_edf)"
            )
        if stage == "predict":
            if self.predict_root is not None:
                self.predict_samples = read_unlabeled_images(
                    Path(self.predict_root), self.predict_pattern, size=self.image_size
                )
            else:
                self.predict_samples = list(self.test_samples)

    @property
    def has_unlabeled(self) -> bool:
        return self.unlabeled_batch_size > 0 and bool(self.unlabeled_samples)

    # -- loaders ------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> StatefulDataLoader:
        # Stateful: a resumed fit continues the epoch with the same batches (see datamodule.py).
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) >= batch_size,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=list_collate,
        )

    def train_dataloader(self) -> CombinedLoader:
        labeled = LabeledInstanceDataset(self.labeled_samples, self.crop_size, self.augment, self.min_instance_area)
        loaders: dict[str, StatefulDataLoader] = {"labeled": self._loader(labeled, self.batch_size, shuffle=True)}
        if self.has_unlabeled:
            unlabeled = UnlabeledImageDataset(self.unlabeled_samples, self.crop_size, self.augment)
            loaders["unlabeled"] = self._loader(unlabeled, self.unlabeled_batch_size, shuffle=True)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(EvalInstanceDataset(self.val_samples, self.val_targets), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> StatefulDataLoader:
        return self._loader(EvalInstanceDataset(self.test_samples, self.test_targets), self.eval_batch_size,
                            shuffle=False)

    def predict_dataloader(self) -> StatefulDataLoader:
        return self._loader(PredictImageDataset(self.predict_samples), self.eval_batch_size, shuffle=False)
