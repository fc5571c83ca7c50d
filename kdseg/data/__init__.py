"""Data: readers of the formats users have, the built-in phantoms and the data modules
(every data module is exported here, so ``kdseg fit --help`` lists it)."""

from kdseg.data.datamodule import ACDCDataModule, PhantomDataModule, VolumeSegmentationDataModule
from kdseg.data.instance_datamodule import CervicalCellDataModule
from kdseg.data.volume import DataError, Volume

__all__ = [
    "ACDCDataModule",
    "CervicalCellDataModule",
    "DataError",
    "PhantomDataModule",
    "Volume",
    "VolumeSegmentationDataModule",
]
