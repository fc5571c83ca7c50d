"""Methods: one LightningModule per file, selected in configs by ``class_path``.

Every method is exported here, so ``kdseg fit --help`` lists it and configs may write
``kdseg.methods.<Name>``; every method derives from :class:`Method` (construction hooks,
optimizer, checks): semantic methods through :class:`SegmentationMethod`, instance (Mask R-CNN)
methods through :class:`InstanceSegmentationMethod`.
"""

from kdseg.methods.action import ActionAnatomicalContrast, ActionGlobalDistillation, ActionLocalDistillation
from kdseg.methods.base import NetworkConfig, SegmentationMethod, TeacherStudentMethod
from kdseg.methods.dmpls import DMPLS
from kdseg.methods.fully_supervised import FullySupervised
from kdseg.methods.instance_base import InstanceSegmentationMethod, InstanceTeacherStudentMethod
from kdseg.methods.instance_mean_teacher import InstanceMeanTeacher
from kdseg.methods.instance_supervised import InstanceSupervised
from kdseg.methods.mean_teacher import MeanTeacher
from kdseg.methods.method import EMATeacherMixin, Method
from kdseg.methods.mmt_psm import MMTPSM
from kdseg.methods.pce import PartialCE
from kdseg.methods.pce_em import PartialCEEntropyMinimization
from kdseg.methods.scribsd import ScribSD
from kdseg.methods.scribsd_plus import ScribSDPlus
from kdseg.methods.supervised import Supervised
from kdseg.methods.ua_mt import UncertaintyAwareMeanTeacher
from kdseg.methods.ustm import USTM
from kdseg.networks.mask_rcnn import DetectorConfig

__all__ = [
    "ActionAnatomicalContrast",
    "ActionGlobalDistillation",
    "ActionLocalDistillation",
    "DMPLS",
    "DetectorConfig",
    "EMATeacherMixin",
    "FullySupervised",
    "InstanceMeanTeacher",
    "InstanceSegmentationMethod",
    "InstanceSupervised",
    "InstanceTeacherStudentMethod",
    "MMTPSM",
    "MeanTeacher",
    "Method",
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
