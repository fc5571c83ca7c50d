"""Methods: one LightningModule per file, selected in configs by ``class_path``."""

from kdseg.methods.action import ActionAnatomicalContrast, ActionGlobalDistillation, ActionLocalDistillation
from kdseg.methods.base import NetworkConfig, SegmentationMethod, TeacherStudentMethod
from kdseg.methods.dmpls import DMPLS
from kdseg.methods.fully_supervised import FullySupervised
from kdseg.methods.mean_teacher import MeanTeacher
from kdseg.methods.pce import PartialCE
from kdseg.methods.pce_em import PartialCEEntropyMinimization
from kdseg.methods.scribsd import ScribSD
from kdseg.methods.scribsd_plus import ScribSDPlus
from kdseg.methods.supervised import Supervised
from kdseg.methods.ua_mt import UncertaintyAwareMeanTeacher
from kdseg.methods.ustm import USTM

__all__ = [
    "ActionAnatomicalContrast",
    "ActionGlobalDistillation",
    "ActionLocalDistillation",
    "UncertaintyAwareMeanTeacher",
    "DMPLS",
    "FullySupervised",
    "PartialCEEntropyMinimization",
    "ScribSD",
    "ScribSDPlus",
    "USTM",
    "MeanTeacher",
    "NetworkConfig",
    "PartialCE",
    "SegmentationMethod",
    "Supervised",
    "TeacherStudentMethod",
]
