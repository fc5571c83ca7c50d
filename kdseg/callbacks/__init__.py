"""Shared callbacks: EMA teacher update, prediction writing, run folders."""

from kdseg.callbacks.ema import EMATeacher, ema_decay_at, ema_update_
from kdseg.callbacks.instance_prediction_writer import InstancePredictionWriter
from kdseg.callbacks.prediction_writer import VolumePredictionWriter

__all__ = ["EMATeacher", "InstancePredictionWriter", "VolumePredictionWriter", "ema_decay_at", "ema_update_"]
