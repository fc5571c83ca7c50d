"""Segmentation metrics (per volume, per class): Dice, HD95, ASD and their summaries."""

from kdseg.metrics.segmentation import (
    STATUSES,
    ClassMetrics,
    dice_score,
    distance_unit,
    summarize,
    volume_diagonal,
    volume_metrics,
)

__all__ = [
    "STATUSES",
    "ClassMetrics",
    "dice_score",
    "distance_unit",
    "summarize",
    "volume_diagonal",
    "volume_metrics",
]
