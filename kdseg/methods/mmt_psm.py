"""``mmt_psm``: Mask-guided Mean Teacher with Perturbation-Sensitive Mining.

Zhou, Chen, Lin, Heng, "Deep Semi-supervised Knowledge Distillation for Overlapping Cervical
Cell Instance Segmentation", MICCAI 2020 (arXiv 2007.10787); public code
Amandaynzhou/MMT-PSM (maskrcnn-benchmark). Built here on torchvision's Mask R-CNN.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdseg.losses.mgd import foreground_masks_per_level, mask_guided_feature_distillation
from kdseg.losses.psm import perturbation_sensitivity, psm_distillation_loss, select_sensitive_negatives
from kdseg.methods.instance_base import InstanceTeacherStudentMethod
from kdseg.networks.mask_rcnn import NUM_FPN_LEVELS, roi_class_logits


def make_adaptors(in_channels: int, out_channels: int, num_levels: int = NUM_FPN_LEVELS) -> nn.ModuleList:
    """One 1x1 convolution per FPN level (the MGD adaptors), Kaiming-uniform (a=1), zero bias."""
    adaptors = nn.ModuleList()
    for _ in range(num_levels):
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        nn.init.kaiming_uniform_(conv.weight, a=1)
        nn.init.zeros_(conv.bias)
        adaptors.append(conv)
    return adaptors


def adapt(adaptors: nn.ModuleList, features: dict[str, Tensor]) -> list[Tensor]:
    """Every FPN level through its adaptor, in the backbone's level order."""
    levels = list(features.values())
    if len(levels) != len(adaptors):
        raise ValueError(f"{len(levels)} FPN levels but {len(adaptors)} adaptors")
    return [a(f) for a, f in zip(adaptors, levels)]


class MMTPSM(InstanceTeacherStudentMethod):
    """MMT-PSM: ``L = L_sup + w(t) * (w_psm * L_psm + w_mgd * L_mgd)``.

    Per unlabeled batch:

    1. **Pseudo-labels and shared RoIs.** The EMA teacher detects on the clean (unperturbed)
       view; detections with score >= ``pseudo_label_score`` (after per-class NMS) are
       pseudo-labels. RoIs are drawn from the teacher's RPN proposals (+ the pseudo boxes) as
       Mask R-CNN samples training RoIs (IoU >= 0.5 positive, at most 25 % positives) and are
       shared by every teacher view and the student. The public code also takes the teacher's
       detections and RPN proposals from one view: ``GeneralizedRCNN.forward_teacher``
       (``maskrcnn_benchmark/modeling/detector/generalized_rcnn.py``) detects on ``images[0]``
       and passes only the first view's FPN features (``aug_features[0]``, a tuple) to
       ``rpn.forward_teacher``, whose K-view averaging branch runs for a list only (its comment:
       multiple views are not used for teacher proposals). Departure: that view is the first
       perturbed one; the clean view is used here so that the pseudo-labels and RoIs do not
       depend on the random erasing.
    2. **K-times augmented self-ensemble.** The teacher sees ``num_views`` = K views, each with
       its own photometric jitter and random erasing; odd views are also horizontally flipped
       (K = 4: two perturbations, each plain and flipped, as the public code's ``AUG_K = 2``).
       A flipped view's FPN features are flipped back to the clean frame; its RoI features are
       pooled there at the shared RoIs and mirrored before the box head, which is exactly the
       mirrored RoI in the flipped image (mirroring the boxes instead would be off by one feature
       cell, torchvision's RoIAlign being ``aligned=False``; see
       :func:`~kdseg.networks.mask_rcnn.roi_class_logits`). The flipped-back features also
       serve MGD (cell-exact on the pooled levels; the max-pooled 5th level is exact when its
       input width is odd, otherwise off by one cell). The student sees one further perturbed,
       unflipped view.
    3. **PSM** (:mod:`kdseg.losses.psm`): ``sensitivity`` of each RoI = sum over classes of the
       std over the K views of the teacher's class probabilities. All positive RoIs are kept and
       the ``negative_ratio`` x #positives most sensitive negatives (``psm: false``: random
       negatives, weight 1 — the ablation without PSM). ``L_psm`` = soft cross-entropy from
       ``sharpen(mean_k teacher logits, temperature)`` to the student's logits, mined negatives
       weighted ``negative_weight``, divided by the number of classes (as the public code).
       RoIs are pooled over the whole batch, as the public code does.
    4. **MGD** (:mod:`kdseg.losses.mgd`): each FPN level (5, with the max-pooled one) of student
       and of every teacher view goes through 1x1 adaptors to ``adaptor_channels`` (the
       teacher's adaptors are the EMA of the student's); ``L_mgd`` is the squared difference
       inside the teacher's foreground (pasted pseudo-label masks, average-pooled to the level
       and binarised at 0.5), normalised by foreground size x channels, averaged over views and
       levels. ``mgd_mask_gate: false`` uses the whole image (the ablation without the gate).

    Defaults are the public code's training script: lambda = 5 (``consistency_weight``),
    ``psm_weight`` 0.2, ``mgd_weight`` 1, temperature 0.5, negative weight 1.5, ramp-up 250
    steps after a 1000-step warm-up, EMA 0.99, adaptors to half the FPN width (256 -> 128).
    Not reproduced: the relation-NMS module of the public code (torchvision's NMS is used), its
    final ramp-down of the unlabeled weight and its dropout in the box head.

    Scale of ``L_mgd`` from scratch: ``L_mgd`` is a raw squared feature difference, so its
    size follows the FPN features' scale, which nothing fixes when the detector is trained from
    scratch (the public config starts from a trained Mask R-CNN, ``MODEL.WEIGHT:
    e2e_mask_rcnn_R_50_FPN_1x.pth`` in ``configs/pap/e2e_mask_rcnn_R_50_FPN_1x.yaml``).
    ``mgd_weight`` is therefore a budget setting: the cpu profile
    (``experiments/reproduce/profiles/cpu.yaml``) lowers it so that the MGD gradient is of the
    supervised one's order; the configs keep the public script's 1 (``MT.FG_HINT 1.`` in
    ``scripts/train_mt.sh``). Measurements: ``experiments/results/notes/mmt_psm.md``.

    Args:
        num_views: K teacher views (1 = the single-view ablation; sensitivities are then all 0
            and the mined negatives random).
        psm: mine the most sensitive negatives (False: random negatives with weight 1).
        negative_ratio: negatives kept per positive RoI.
        negative_weight: weight of the mined negatives in ``L_psm``.
        temperature: sharpening temperature of the teacher target.
        psm_weight, mgd_weight: ``w_psm`` and ``w_mgd`` (``mgd_weight: 0`` = without MGD; the
            adaptors are then not run).
        mgd_mask_gate: restrict ``L_mgd`` to the teacher's foreground.
        adaptor_channels: output channels of the MGD adaptors (None: half the FPN width).
        (other arguments: see :class:`~kdseg.methods.instance_base.InstanceTeacherStudentMethod`)
    """

    def __init__(
        self,
        num_views: int = 4,
        psm: bool = True,
        negative_ratio: float = 0.5,
        negative_weight: float = 1.5,
        temperature: float = 0.5,
        psm_weight: float = 0.2,
        mgd_weight: float = 1.0,
        mgd_mask_gate: bool = True,
        adaptor_channels: int | None = None,
        consistency_weight: float = 5.0,
        **kwargs: Any,
    ) -> None:
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        if psm_weight < 0 or mgd_weight < 0:
            raise ValueError("psm_weight and mgd_weight must be >= 0")
        super().__init__(consistency_weight=consistency_weight, **kwargs)
        self.num_views = num_views
        self.psm = psm
        self.negative_ratio = negative_ratio
        self.negative_weight = negative_weight
        self.temperature = temperature
        self.psm_weight = psm_weight
        self.mgd_weight = mgd_weight
        self.mgd_mask_gate = mgd_mask_gate

    def configure_heads(self, detector: nn.Module) -> None:
        """The MGD adaptors, one per FPN level, as ``detector.mgd_adaptors`` (EMA'd with the rest)."""
        fpn_channels = self.detector_config.fpn_channels
        out_channels = self.hparams.get("adaptor_channels") or max(fpn_channels // 2, 1)
        detector.mgd_adaptors = make_adaptors(fpn_channels, int(out_channels))

    @property
    def needs_foreground(self) -> bool:
        return self.mgd_weight > 0 and self.mgd_mask_gate

    def unlabeled_loss(self, images: Sequence[Tensor]) -> tuple[Tensor, dict[str, Any]]:
        teacher, student = self.ema_teacher, self.student
        targets = self.teacher_targets(images)
        use_mgd = self.mgd_weight > 0
        teacher_logits, teacher_feats = [], []
        with torch.no_grad():
            for k in range(self.num_views):
                view = self.view(teacher, images, targets)
                flipped = k % 2 == 1
                if flipped:  # features of the mirrored image, mirrored back to the clean frame
                    features = {n: f.flip(-1) for n, f in teacher.backbone(view.tensors.flip(-1)).items()}
                else:
                    features = teacher.backbone(view.tensors)
                teacher_logits.append(
                    roi_class_logits(teacher, features, targets.rois, targets.image_sizes, mirror=flipped)
                )
                if use_mgd:
                    teacher_feats.append(adapt(teacher.mgd_adaptors, features))
        student_view = self.view(student, images, targets)
        student_features = self.student_features(student_view)
        student_logits = roi_class_logits(student, student_features, targets.rois, targets.image_sizes)

        # L_psm
        stacked = torch.stack(teacher_logits)  # (K, R, C)
        is_positive = torch.cat(targets.roi_labels) > 0
        sensitivity = perturbation_sensitivity(torch.softmax(stacked, dim=-1))
        negatives = select_sensitive_negatives(sensitivity, is_positive, self.negative_ratio, random=not self.psm)
        l_psm = psm_distillation_loss(
            student_logits, stacked, is_positive, negatives, self.temperature,
            self.negative_weight if self.psm else 1.0,
        )
        # L_mgd
        if use_mgd:
            student_adapted = adapt(student.mgd_adaptors, student_features)
            masks = (
                foreground_masks_per_level(targets.foreground, [f.shape[-2:] for f in student_adapted])
                if self.mgd_mask_gate else None
            )
            l_mgd = mask_guided_feature_distillation(student_adapted, teacher_feats, masks)
        else:
            l_mgd = student_logits.sum() * 0.0
        term = self.psm_weight * l_psm + self.mgd_weight * l_mgd
        logs: dict[str, Any] = {
            "train/psm": l_psm.detach(),
            "train/mgd": l_mgd.detach(),
            "train/pseudo_labels": float(targets.num_pseudo_labels),
            "train/positive_rois": float(is_positive.sum()),
            "train/mined_negatives": float(negatives.numel()),
        }
        if negatives.numel():
            logs["train/sensitivity_mined"] = sensitivity[negatives].mean().detach()
        return term, logs
