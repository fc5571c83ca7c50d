"""Data modules: ACDC (files on disk) and the built-in cardiac phantom share one interface.

Both serve
- ``train_dataloader``: a ``CombinedLoader`` of ``{"labeled": ..., "unlabeled": ...}`` 2D slice
  batches (``"unlabeled"`` only when ``unlabeled_batch_size > 0``), mode ``max_size_cycle``, of
  resumable ``StatefulDataLoader``s;
- ``val/test/predict_dataloader``: whole volumes, one at a time.

Supervision: ``dense`` serves ``label`` as target, ``scribble`` serves ``scribble`` (with
``scribble_ignore_index`` for unannotated pixels). ``labeled_patients: N`` makes the first N
patients of the train split labeled and the rest unlabeled; unlabeled volumes have their
annotations dropped at load time, so no method can leak them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader, rank_zero_info
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from kdseg.data.protocol import SplitProtocol, SplitSource, resolve_protocol
from kdseg.data.slices import SliceDataset, VolumeDataset, first_item
from kdseg.data.volume import DataError, Volume

Supervision = Literal["dense", "scribble"]
ACDC_CLASS_NAMES = {1: "RV", 2: "Myo", 3: "LV"}


class VolumeSegmentationDataModule(pl.LightningDataModule):
    """Shared logic; subclasses implement :meth:`load_split`.

    Args:
        supervision: ``dense`` (labels) or ``scribble`` (scribbles, unannotated = ignore).
        labeled_patients: the first N patients of the train split are labeled, the rest
            unlabeled; None = all labeled.
        image_size: training slices are resized to ``image_size`` x ``image_size``.
        batch_size: labeled slices per step.
        unlabeled_batch_size: unlabeled slices per step; 0 = no unlabeled stream.
        num_workers: dataloader workers.
        num_classes: classes including background.
        scribble_ignore_index: scribble value of unannotated pixels.
        augment: weak augmentation (rot90/flip or small rotation) of training slices.
        max_rotation_degrees: range of the small rotation.
    """

    class_names: dict[int, str] = ACDC_CLASS_NAMES

    def __init__(
        self,
        supervision: Supervision = "dense",
        labeled_patients: int | None = None,
        image_size: int = 256,
        batch_size: int = 12,
        unlabeled_batch_size: int = 0,
        num_workers: int = 0,
        num_classes: int = 4,
        scribble_ignore_index: int = 4,
        augment: bool = True,
        max_rotation_degrees: float = 20.0,
    ) -> None:
        super().__init__()
        if supervision not in ("dense", "scribble"):
            raise ValueError(f"data.supervision must be 'dense' or 'scribble', got {supervision!r}")
        if labeled_patients is not None and labeled_patients < 1:
            raise ValueError(f"data.labeled_patients must be >= 1 or null, got {labeled_patients}")
        if batch_size < 1 or unlabeled_batch_size < 0:
            raise ValueError("data.batch_size must be >= 1 and data.unlabeled_batch_size >= 0")
        self.supervision = supervision
        self.labeled_patients = labeled_patients
        self.image_size = image_size
        self.batch_size = batch_size
        self.unlabeled_batch_size = unlabeled_batch_size
        self.num_workers = num_workers
        self.num_classes = num_classes
        self.scribble_ignore_index = scribble_ignore_index
        self.augment = augment
        self.max_rotation_degrees = max_rotation_degrees
        self.labeled_volumes: list[Volume] = []
        self.unlabeled_volumes: list[Volume] = []
        self.val_volumes: list[Volume] = []
        self.test_volumes: list[Volume] = []
        self.predict_volumes: list[Volume] = []

    # -- what subclasses provide ---------------------------------------------------------------
    def load_split(self, split: str, require: tuple[str, ...]) -> list[Volume]:
        """All volumes of the patients of ``split`` (``train``/``val``/``test``/``predict``), in
        split order, each checked to have the arrays named in ``require``."""
        raise NotImplementedError

    def patients_in_split(self, split: str) -> list[str]:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    @property
    def target_key(self) -> str:
        return "label" if self.supervision == "dense" else "scribble"

    @property
    def has_unlabeled(self) -> bool:
        return self.unlabeled_batch_size > 0 and len(self.unlabeled_volumes) > 0

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self._setup_train()
            self.val_volumes = self.load_split("val", require=("label",))
        elif stage == "validate":
            self.val_volumes = self.load_split("val", require=("label",))
        elif stage == "test":
            self.test_volumes = self.load_split("test", require=("label",))
        elif stage == "predict":
            self.predict_volumes = self.load_split("predict", require=())

    def _setup_train(self) -> None:
        patients = self.patients_in_split("train")
        n_labeled = len(patients) if self.labeled_patients is None else self.labeled_patients
        if n_labeled > len(patients):
            raise DataError(
                f"data.labeled_patients={n_labeled} but the train split has only {len(patients)} patients"
            )
        train = self.load_split("train", require=())
        labeled_ids = set(patients[:n_labeled])
        self.labeled_volumes, self.unlabeled_volumes = [], []
        for volume in train:
            if volume.patient_id in labeled_ids:
                if getattr(volume, self.target_key) is None:
                    raise DataError(
                        f"{volume.source or volume.case_id}: labeled patient {volume.patient_id} has no "
                        f"'{self.target_key}' (needed for supervision={self.supervision!r})"
                    )
                self.labeled_volumes.append(volume)
            else:
                # Drop annotations of unlabeled patients so nothing downstream can use them.
                volume.label = None
                volume.scribble = None
                self.unlabeled_volumes.append(volume)
        if self.supervision == "scribble":
            self._check_scribbles_not_empty()
        if self.unlabeled_batch_size > 0 and not self.unlabeled_volumes:
            raise DataError(
                f"data.unlabeled_batch_size={self.unlabeled_batch_size} but every train patient is "
                "labeled: set data.labeled_patients to fewer patients, or unlabeled_batch_size to 0"
            )

    def _check_scribbles_not_empty(self) -> None:
        for volume in self.labeled_volumes:
            assert volume.scribble is not None
            if not (volume.scribble != self.scribble_ignore_index).any():
                raise DataError(
                    f"{volume.source or volume.case_id}: the scribble has no annotated pixel (all "
                    f"values are the ignore value {self.scribble_ignore_index})"
                )

    @property
    def num_labeled_slices(self) -> int:
        return sum(v.num_slices for v in self.labeled_volumes)

    def _slice_loader(self, volumes: list[Volume], target_key: str | None, batch_size: int) -> StatefulDataLoader:
        fill = self.scribble_ignore_index if target_key == "scribble" else 0
        dataset = SliceDataset(
            volumes, target_key, self.image_size, self.augment, fill, self.max_rotation_degrees
        )
        # Stateful: Lightning saves its position and shuffling generator in every checkpoint, so a
        # resumed fit continues the epoch with the same batches (kdseg.callbacks.rng_state).
        return StatefulDataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=len(dataset) >= batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> CombinedLoader:
        loaders = {"labeled": self._slice_loader(self.labeled_volumes, self.target_key, self.batch_size)}
        if self.has_unlabeled:
            loaders["unlabeled"] = self._slice_loader(self.unlabeled_volumes, None, self.unlabeled_batch_size)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _volume_loader(self, volumes: list[Volume]) -> DataLoader:
        return DataLoader(
            VolumeDataset(volumes, self.image_size),
            batch_size=1,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=first_item,
        )

    def val_dataloader(self) -> DataLoader:
        return self._volume_loader(self.val_volumes)

    def test_dataloader(self) -> DataLoader:
        return self._volume_loader(self.test_volumes)

    def predict_dataloader(self) -> DataLoader:
        return self._volume_loader(self.predict_volumes)


class ACDCDataModule(VolumeSegmentationDataModule):
    """ACDC (or any data in its layouts) from disk.

    Layouts read (auto-detected, see :mod:`kdseg.data.readers`): the HDF5 volumes of
    ``../shared/data/acdc`` (``volumes/patientNNN_frameMM.h5``), the SSL4MIS / WSL4MIS per-slice
    HDF5 layout, and raw ACDC NIfTI (``patientNNN/patientNNN_frameMM[_gt].nii.gz``; voxel spacing
    kept, so HD95/ASD are in mm).

    Which patients train, select the checkpoint (``val``) and are tested follows the root's
    protocol (:mod:`kdseg.data.protocol`, logged once): with ``splits/test.txt`` the SSL4MIS one
    (train / val / test files as they are); without it the last ``fallback_val_patients`` of
    ``train.txt`` select the checkpoint and ``val.txt`` is the test set.

    Args:
        root: the data folder.
        train_split, val_split, test_split: split files (one patient id a line); default
            ``<root>/splits/<name>.txt``; a file given here wins over the protocol's choice.
        predict_split: patients to predict; default the protocol's test set.
        fallback_val_patients: without a test split, how many patients at the end of the train
            split are held out for checkpoint selection.
        (other arguments: see :class:`VolumeSegmentationDataModule`)
    """

    def __init__(
        self,
        root: str | Path,
        train_split: str | Path | None = None,
        val_split: str | Path | None = None,
        test_split: str | Path | None = None,
        predict_split: str | Path | None = None,
        fallback_val_patients: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.given_splits = {
            "train": Path(train_split) if train_split else None,
            "val": Path(val_split) if val_split else None,
            "test": Path(test_split) if test_split else None,
        }
        self.predict_split = Path(predict_split) if predict_split else None
        self.fallback_val_patients = fallback_val_patients
        self._layout: str | None = None
        self._protocol: SplitProtocol | None = None

    def _check_root(self) -> str:
        from kdseg.data.layouts import detect_layout

        if self._layout is None:
            self._layout = detect_layout(self.root)
        return self._layout

    @property
    def protocol(self) -> SplitProtocol:
        """The resolved splits (read once, logged once)."""
        if self._protocol is None:
            self._check_root()
            self._protocol = resolve_protocol(
                self.root, self.given_splits["train"], self.given_splits["val"], self.given_splits["test"],
                holdout=self.fallback_val_patients,
            )
            rank_zero_info(self._protocol.describe())
        return self._protocol

    def _source(self, split: str) -> SplitSource:
        if split == "predict":
            if self.predict_split is None:
                return self.protocol.test
            from kdseg.data.readers import read_split_file

            if not self.predict_split.is_file():
                raise DataError(f"{self.predict_split}: the predict split file does not exist "
                                "(one patient id a line; set data.predict_split to another file)")
            return SplitSource(tuple(read_split_file(self.predict_split)), self.predict_split)
        return self.protocol.split(split)

    def patients_in_split(self, split: str) -> list[str]:
        self._check_root()
        return list(self._source(split).patients)

    def load_split(self, split: str, require: tuple[str, ...]) -> list[Volume]:
        from kdseg.data.readers import read_patients

        layout = self._check_root()
        source = self._source(split)
        return read_patients(
            self.root,
            list(source.patients),
            require=require,
            num_classes=self.num_classes,
            scribble_ignore_index=self.scribble_ignore_index,
            layout=layout,
            split_file=source.file,
        )


class PhantomDataModule(VolumeSegmentationDataModule):
    """The built-in synthetic cardiac short-axis phantom: needs no data on disk.

    Patients ``0 .. num_train_patients - 1`` form the train split, the next ``num_val_patients``
    the val split and the next ``num_test_patients`` the test split (also used for predict).
    Deterministic from ``seed``. Scribbles are generated from the masks
    (:func:`kdseg.data.scribbles.scribbles_from_label`).

    Args:
        num_train_patients, num_val_patients, num_test_patients: split sizes.
        num_slices: slices per volume; phantom_size: in-plane size of the generated volumes.
        seed: generator seed (independent of the training seed).
        (other arguments: see :class:`VolumeSegmentationDataModule`)
    """

    def __init__(
        self,
        num_train_patients: int = 16,
        num_val_patients: int = 4,
        num_test_patients: int = 4,
        num_slices: int = 8,
        phantom_size: int = 96,
        seed: int = 0,
        image_size: int = 64,
        batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, batch_size=batch_size, **kwargs)
        if self.num_classes != 4:
            raise ValueError("the cardiac phantom has 4 classes (background, RV, Myo, LV)")
        self.split_sizes = {
            "train": num_train_patients,
            "val": num_val_patients,
            "test": num_test_patients,
        }
        self.num_slices = num_slices
        self.phantom_size = phantom_size
        self.seed = seed

    def patients_in_split(self, split: str) -> list[str]:
        split = "test" if split == "predict" else split
        start = {"train": 0, "val": self.split_sizes["train"]}.get(
            split, self.split_sizes["train"] + self.split_sizes["val"]
        )
        return [f"phantom{i:03d}" for i in range(start, start + self.split_sizes[split])]

    def load_split(self, split: str, require: tuple[str, ...]) -> list[Volume]:
        from kdseg.data.phantom import make_phantom_volumes

        split = "test" if split == "predict" else split
        wanted = self.patients_in_split(split)
        return make_phantom_volumes(
            num_patients=len(wanted),
            seed=self.seed,
            num_slices=self.num_slices,
            size=(self.phantom_size, self.phantom_size),
            with_scribbles=True,
            patient_indices=[int(p.removeprefix("phantom")) for p in wanted],
        )
