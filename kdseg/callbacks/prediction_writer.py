"""Writes one predicted mask per volume during ``kdseg predict``; :func:`overlay_labels` draws one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from kdseg.data.writers import prediction_path, write_prediction

#: RGB in [0, 1] of the ACDC classes: background, RV, Myo, LV.
ACDC_COLOURS = np.array([[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 120, 255]], dtype=np.float32) / 255.0


def overlay_labels(image: np.ndarray, label: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Float ``(H, W, 3)``: the gray slice ``image`` (values in [0, 1]) with each labelled pixel
    blended with its class colour (:data:`ACDC_COLOURS`)."""
    gray = np.clip(image, 0, 1)[..., None].repeat(3, axis=2)
    colours = ACDC_COLOURS[np.clip(label.astype(int), 0, len(ACDC_COLOURS) - 1)]
    return np.where((label > 0)[..., None], (1 - alpha) * gray + alpha * colours, gray)


class VolumePredictionWriter(BasePredictionWriter):
    """Saves ``predict_step`` outputs under ``output_dir``: NIfTI (source affine and spacing)
    when the input was NIfTI, HDF5 (dataset ``prediction``) otherwise.

    Existing files are never overwritten: the targets are checked before the first volume is
    predicted, and the run stops naming the first file that exists.

    Args:
        output_dir: the folder to write to (created if needed).
    """

    def __init__(self, output_dir: str | Path = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def _volumes(self, trainer: pl.Trainer) -> list:
        volumes = getattr(trainer.datamodule, "predict_volumes", None)
        if volumes is None:
            raise TypeError("VolumePredictionWriter needs a data module with `predict_volumes`")
        return volumes

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for volume in self._volumes(trainer):
            target = prediction_path(volume, self.output_dir)
            if target.exists():
                raise FileExistsError(
                    f"{target} already exists: kdseg predict never overwrites; choose another "
                    "--prediction_writer.output_dir"
                )

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        volume = self._volumes(trainer)[prediction["index"]]
        path = write_prediction(volume, prediction["prediction"], self.output_dir)
        rank_zero_info(f"wrote {path}")
