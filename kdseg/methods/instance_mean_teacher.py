"""``instance_mean_teacher``: Mean Teacher for Mask R-CNN, plain RoI classification consistency.

The baseline MMT-PSM is compared with: the same EMA teacher, pseudo-label RoIs and perturbations,
but one teacher view, no mining and no feature distillation.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.methods.instance_base import InstanceTeacherStudentMethod
from kdseg.networks.mask_rcnn import roi_class_logits


class InstanceMeanTeacher(InstanceTeacherStudentMethod):
    """``L = L_sup + w(t) * L_cons`` on unlabeled images.

    Per unlabeled batch: the teacher's detections on the clean view are the pseudo-labels;
    RoIs are sampled against them as Mask R-CNN samples training RoIs (25 % positives at most)
    and shared by both networks. The teacher classifies them on one perturbed view, the student
    on another; ``L_cons = mean_{r,c} (softmax(z^s_r)_c - softmax(z^t_r)_c)^2`` over every
    sampled RoI (Tarvainen & Valpola's MSE consistency).

    (arguments: see :class:`~kdseg.methods.instance_base.InstanceTeacherStudentMethod`)
    """

    def unlabeled_loss(self, images: Sequence[Tensor]) -> tuple[Tensor, dict[str, Any]]:
        targets = self.teacher_targets(images)
        with torch.no_grad():
            teacher_view = self.view(self.ema_teacher, images, targets)
            teacher_features = self.ema_teacher.backbone(teacher_view.tensors)
            teacher_logits = roi_class_logits(self.ema_teacher, teacher_features, targets.rois, targets.image_sizes)
        student_view = self.view(self.student, images, targets)
        student_features = self.student_features(student_view)
        student_logits = roi_class_logits(self.student, student_features, targets.rois, targets.image_sizes)
        if student_logits.shape[0] == 0:
            consistency = student_logits.sum() * 0.0
        else:
            consistency = F.mse_loss(torch.softmax(student_logits, dim=-1), torch.softmax(teacher_logits, dim=-1))
        positives = int(sum(int((lab > 0).sum()) for lab in targets.roi_labels))
        return consistency, {
            "train/L_cons": consistency.detach(),
            "train/pseudo_labels": float(targets.num_pseudo_labels),
            "train/positive_rois": float(positives),
        }

