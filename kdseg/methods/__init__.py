"""Methods: one LightningModule per file, selected in configs by ``class_path``."""

from kdseg.methods.base import NetworkConfig, SegmentationMethod, TeacherStudentMethod
from kdseg.methods.fully_supervised import FullySupervised
from kdseg.methods.mean_teacher import MeanTeacher
from kdseg.methods.pce import PartialCE
from kdseg.methods.supervised import Supervised

__all__ = [
    "FullySupervised",
    "MeanTeacher",
    "NetworkConfig",
    "PartialCE",
    "SegmentationMethod",
    "Supervised",
    "TeacherStudentMethod",
]
