"""Methods: one LightningModule per file, selected in configs by ``class_path``.

Every method is exported here, so ``kdseg fit --help`` lists it and configs may write
``kdseg.methods.<Name>``; semantic methods derive from :class:`SegmentationMethod`, instance
(Mask R-CNN) methods from :class:`InstanceSegmentationMethod`.
"""

from kdseg.methods.action import ActionAnatomicalContrast, ActionGlobalDistillation, ActionLocalDistillation
from kdseg.methods.base import NetworkConfig, SegmentationMethod, TeacherStudentMethod
from kdseg.methods.dmpls import DMPLS
from kdseg.methods.fully_supervised import FullySupervised
from kdseg.methods.instance_base import (
    DetectorConfig,
    InstanceSegmentationMethod,
    InstanceTeacherStudentMethod,
)
from kdseg.methods.instance_mean_teacher import InstanceMeanTeacher
from kdseg.methods.instance_supervised import InstanceSupervised
from kdseg.methods.mean_teacher import MeanTeacher
from kdseg.methods.mmt_psm import MMTPSM
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
    "DMPLS",
    "DetectorConfig",
    "FullySupervised",
    "InstanceMeanTeacher",
    "InstanceSegmentationMethod",
    "InstanceSupervised",
    "InstanceTeacherStudentMethod",
    "MMTPSM",
    "MeanTeacher",
    "NetworkConfig",
    "PartialCE",
    "PartialCEEntropyMinimization",
    "ScribSD",
    "ScribSDPlus",
    "SegmentationMethod",
    "Supervised",
    "TeacherStudentMethod",
    "USTM",
    "UncertaintyAwareMeanTeacher",
]
