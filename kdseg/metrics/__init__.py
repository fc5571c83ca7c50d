"""Segmentation metrics (per volume, per class): Dice, HD95, ASD and their summaries."""

from kdseg.metrics.distances import DISTANCE_CONVENTIONS, surface_distances

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
    "DISTANCE_CONVENTIONS",
    "STATUSES",
    "ClassMetrics",
    "dice_score",
    "distance_unit",
    "summarize",
    "surface_distances",
    "volume_diagonal",
    "volume_metrics",
]
