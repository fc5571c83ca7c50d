"""Shared callbacks: EMA teacher update, prediction writing, run folders."""

from kdseg.callbacks.ema import EMATeacher, ema_decay_at, ema_update_
from kdseg.callbacks.prediction_writer import VolumePredictionWriter

__all__ = ["EMATeacher", "VolumePredictionWriter", "ema_decay_at", "ema_update_"]
