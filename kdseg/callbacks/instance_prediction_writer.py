"""Writes the predictions of the instance (Mask R-CNN) methods: one ``.npz`` and one overlay PNG per image."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from kdseg.callbacks.prediction_writer import VolumePredictionWriter

__all__ = ["InstancePredictionWriter", "overlay_instances", "safe_name"]


def safe_name(image_id: str) -> str:
    """A file name for ``image_id`` (path separators and odd characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(image_id)).strip("._") or "image"


def overlay_instances(image: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 3)``: the gray image with each instance's outline drawn (nuclei red,
    cytoplasms in cycling colours)."""
    from skimage.segmentation import find_boundaries

    rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    palette = np.array(
        [[0, 200, 0], [0, 120, 255], [255, 200, 0], [200, 0, 255], [0, 220, 220], [255, 120, 0]], np.uint8
    )
    order = np.argsort(labels == 2, kind="stable")  # nuclei last, on top
    for n, i in enumerate(order):
        edge = find_boundaries(masks[i], mode="inner")
        rgb[edge] = [255, 0, 0] if labels[i] == 2 else palette[n % len(palette)]
    return rgb


class InstancePredictionWriter(VolumePredictionWriter):
    """Writes ``<image_id>.npz`` (``masks`` bool ``(N, H, W)``, ``labels``, ``scores``, ``boxes``)
    and ``<image_id>_overlay.png`` per image under ``output_dir``; never overwrites.

    The targets of every image of the data module's ``predict_samples`` are checked before the
    first one is predicted. It subclasses :class:`VolumePredictionWriter` so that an instance
    method returning it from ``configure_callbacks`` replaces the CLI's volume writer (Lightning
    replaces a trainer callback by a model callback of a subclass), keeping the CLI's
    ``--prediction_writer.output_dir``.
    """

    def __init__(self, output_dir: str | Path = "predictions") -> None:
        super().__init__(output_dir=output_dir)

    @classmethod
    def replacing(cls, trainer: pl.Trainer | None, output_dir: str | Path | None) -> InstancePredictionWriter:
        """The writer into ``output_dir``; None: the trainer's volume writer's folder (the CLI's
        ``--prediction_writer.output_dir``), else ``predictions``."""
        if not output_dir:
            writers = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, VolumePredictionWriter)]
            output_dir = writers[0].output_dir if writers else "predictions"
        return cls(output_dir)

    def targets_for(self, image_id: str) -> list[Path]:
        name = safe_name(image_id)
        return [self.output_dir / f"{name}.npz", self.output_dir / f"{name}_overlay.png"]

    def _refuse_existing(self, image_id: str) -> None:
        for target in self.targets_for(image_id):
            if target.exists():
                raise FileExistsError(
                    f"{target} already exists: kdseg predict never overwrites; choose another "
                    "--prediction_writer.output_dir"
                )

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples = getattr(getattr(trainer, "datamodule", None), "predict_samples", None) or []
        for sample in samples:
            self._refuse_existing(sample.image_id)

    def write_on_batch_end(  # type: ignore[no-untyped-def]
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        from skimage import io

        self.output_dir.mkdir(parents=True, exist_ok=True)
        for item in prediction:
            self._refuse_existing(item["image_id"])
            npz_path, png_path = self.targets_for(item["image_id"])
            np.savez_compressed(
                npz_path, masks=item["masks"], labels=item["labels"], scores=item["scores"],
                boxes=item["boxes"], image_id=np.array(item["image_id"]),
            )
            overlay = overlay_instances(item["image"], item["masks"], item["labels"])
            io.imsave(str(png_path), overlay, check_contrast=False)
            rank_zero_info(f"wrote {npz_path} and {png_path.name} ({len(item['labels'])} instances)")
