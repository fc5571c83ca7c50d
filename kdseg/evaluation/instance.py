"""Per-image evaluation of the instance-segmentation methods (AJI, F1, Dice, mAP; see
:class:`~kdseg.metrics.instance.InstanceMetricAccumulator`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from kdseg.evaluation.base import Evaluator
from kdseg.metrics.instance import InstanceMetricAccumulator
from kdseg.metrics.native_size import masks_to_size

__all__ = [
    "InstanceEvaluator", "format_instance_table", "instance_test_summary", "json_safe", "pack_masks", "unpack_masks"
]

#: ``(image_id, prediction, ground truth)``, masks bit-packed.
Record = tuple[str, dict[str, Any], dict[str, Any]]


def pack_masks(masks: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """Bool masks packed 8 per byte along the last axis, with their shape."""
    return np.packbits(masks, axis=-1), masks.shape


def unpack_masks(packed: tuple[np.ndarray, tuple[int, ...]]) -> np.ndarray:
    """The inverse of :func:`pack_masks`."""
    bits, shape = packed
    return np.unpackbits(bits, axis=-1, count=shape[-1]).astype(bool).reshape(shape)


def json_safe(value: Any) -> Any:
    """NaN (an undefined metric) as JSON ``null``."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class InstanceEvaluator(Evaluator[Record]):
    """One record per image: the detections and the ground truth, masks kept bit-packed until
    the epoch ends (8x less memory for large test sets)."""

    def __init__(self) -> None:
        super().__init__(key=lambda record: record[0])

    def add_batch(
        self, outputs: Sequence[dict[str, Tensor]], batch: Sequence[tuple[Tensor, dict[str, Tensor], str]]
    ) -> None:
        """Records the detections ``outputs`` of the images of ``batch`` (``(image, target, id)``)."""
        for out, (_, target, image_id) in zip(outputs, batch):
            # Scored at the target's size (native when the data module resized the image): the
            # mask probabilities are resized bilinearly, then thresholded (kdseg.metrics.native_size).
            masks = masks_to_size(out["masks"], tuple(target["masks"].shape[-2:]))
            pred = {
                "masks": pack_masks(masks.cpu().numpy()),
                "scores": out["scores"].float().cpu().numpy(),
                "labels": out["labels"].cpu().numpy(),
            }
            gt = {"masks": pack_masks(target["masks"].bool().cpu().numpy()), "labels": target["labels"].cpu().numpy()}
            self.add((str(image_id), pred, gt))

    def accumulate(
        self, class_names: dict[int, str], score_threshold: float, max_detections: int,
        records: list[Record] | None = None,
    ) -> InstanceMetricAccumulator:
        """The metrics of ``records`` (default: every rank's, a collective under DDP)."""
        accumulator = InstanceMetricAccumulator(
            classes=class_names, score_threshold=score_threshold, max_detections=max_detections
        )
        for image_id, pred, gt in self.gathered() if records is None else records:
            pred = {**pred, "masks": unpack_masks(pred["masks"])}
            accumulator.update(pred, {**gt, "masks": unpack_masks(gt["masks"])}, image_id)
        return accumulator


def format_instance_table(summary: dict[str, float], class_names: dict[int, str]) -> str:
    """A plain-text table of the instance metrics per class and their mean."""
    columns = [*class_names.values(), "mean"]
    lines = [f"{'metric':<10} " + " ".join(f"{n:>10}" for n in columns)]
    for metric in ("aji", "aji_gated", "f1", "dice", "map", "ap50", "ap75"):
        lines.append(f"{metric:<10} " + " ".join(f"{summary[f'{metric}_{n}']:>10.4f}" for n in columns))
    return "\n".join(lines)


def instance_test_summary(
    summary: dict[str, float], method: str, checkpoint: str | None, datamodule: Any,
    class_names: dict[int, str], score_threshold: float,
) -> dict[str, Any]:
    """``test_metrics.json`` of an instance method: the metrics and what they were scored on."""
    return {
        "method": method,
        "checkpoint": checkpoint,
        "data": getattr(datamodule, "source_name", None),
        "num_images": int(summary["num_images"]),
        "class_names": {int(k): v for k, v in class_names.items()},
        "score_threshold": score_threshold,
        # The size the metrics were scored at: native unless the data module says otherwise.
        "image_size": getattr(datamodule, "image_size", None),
        "eval_native_size": bool(getattr(datamodule, "eval_native_size", True)),
        "metrics": {k: json_safe(float(v)) for k, v in summary.items() if k != "num_images"},
    }
