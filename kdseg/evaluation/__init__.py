"""Evaluation of a validation / test epoch: per-sample rows collected on each rank, gathered
across DDP ranks in one place (:class:`Evaluator`), summarised and written as result files.

One evaluator per task: :class:`VolumeEvaluator` (semantic segmentation, per 3D volume) and
:class:`InstanceEvaluator` (instance segmentation, per image).
"""

from kdseg.evaluation.base import Evaluator, next_free_path, write_test_results
from kdseg.evaluation.instance import InstanceEvaluator
from kdseg.evaluation.volume import VolumeEvaluator, format_summary_table

__all__ = [
    "Evaluator",
    "InstanceEvaluator",
    "VolumeEvaluator",
    "format_summary_table",
    "next_free_path",
    "write_test_results",
]
