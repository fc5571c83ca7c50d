"""Data: readers of the formats users have, the built-in phantoms and the data modules."""

from kdseg.data.datamodule import ACDCDataModule, PhantomDataModule, VolumeSegmentationDataModule
from kdseg.data.volume import DataError, Volume

__all__ = ["ACDCDataModule", "DataError", "PhantomDataModule", "Volume", "VolumeSegmentationDataModule"]
