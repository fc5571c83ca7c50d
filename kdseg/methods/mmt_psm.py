"""``mmt_psm``: MMT-PSM, Zhou, Chen, Lin, Heng, "Deep Semi-supervised Knowledge Distillation for
Overlapping Cervical Cell Instance Segmentation", MICCAI 2020 (arXiv 2007.10787); public code
Amandaynzhou/MMT-PSM (maskrcnn-benchmark). Built here on torchvision's Mask R-CNN.

Loss (the unlabeled part in :meth:`MMTPSM.unlabeled_loss`)::

    L = L_sup + w(t) * (w_psm * L_psm + w_mgd * L_mgd)

- ``L_psm``: soft cross-entropy from the sharpened mean of K augmented teacher views' RoI class
  logits to the student's, on all positive RoIs and the negatives whose teacher probabilities vary
  most over the views (perturbation-sensitive mining, :mod:`kdseg.losses.psm`).
- ``L_mgd``: squared difference of adapted FPN features of student and each teacher view inside
  the teacher's pseudo-label foreground (mask-guided distillation, :mod:`kdseg.losses.mgd`).

Departures (each is the reason in one line):

- Pseudo-labels and shared RoIs come from the teacher's clean view (the public code: its first perturbed one), so they do not depend on random erasing.
- Flipped views' features are flipped back and their pooled RoI features mirrored: exactly the mirrored RoI (mirrored boxes are a cell off, RoIAlign being ``aligned=False``).
- torchvision's NMS and box head: kdseg builds on torchvision, which has no relation-NMS or box-head dropout; no ramp-down of ``w(t)`` either.
- ``mgd_weight`` is a budget setting: ``L_mgd`` follows the FPN's scale, which nothing fixes from scratch (the public code starts from a trained Mask R-CNN).

Defaults are the public training script's (``scripts/train_mt.sh``); measurements behind the
settings: ``experiments/results/notes/mmt_psm.md``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdseg.losses.mgd import foreground_masks_per_level, mask_guided_feature_distillation
from kdseg.losses.psm import perturbation_sensitivity, psm_distillation_loss, select_sensitive_negatives
from kdseg.methods.instance_base import InstanceTeacherStudentMethod
from kdseg.networks.mask_rcnn import NUM_FPN_LEVELS, TeacherTargets, roi_class_logits


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
    """MMT-PSM: ``L = L_sup + w(t) * (w_psm * L_psm + w_mgd * L_mgd)`` (see the module docstring).

    Per unlabeled batch the EMA teacher detects on the clean view (pseudo-labels with score >=
    ``pseudo_label_score``) and RoIs are sampled against them as Mask R-CNN samples training RoIs;
    these RoIs are shared by the K teacher views and the student's one perturbed, unflipped view.
    Teacher view ``k`` gets its own photometric jitter and random erasing; odd ``k`` are also
    flipped (K = 4: two perturbations, each plain and flipped, as the public code's ``AUG_K = 2``).

    Args:
        num_views: K teacher views (1 = the single-view ablation; sensitivities are then all 0
            and the mined negatives random).
        psm: mine the most sensitive negatives (False: random negatives with weight 1).
        negative_ratio: negatives kept per positive RoI.
        negative_weight: weight of the mined negatives in ``L_psm``.
        temperature: sharpening temperature of the teacher target.
        psm_weight, mgd_weight: ``w_psm`` and ``w_mgd`` (``mgd_weight: 0`` = without MGD; the
            adaptors are then not run).
        mgd_mask_gate: restrict ``L_mgd`` to the teacher's foreground (False: the whole image).
        adaptor_channels: output channels of the MGD adaptors (None: half the FPN width).
        consistency_weight: lambda, the final ``w(t)`` (5).
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

    @torch.no_grad()
    def teacher_views(self, images: Sequence[Tensor], targets: TeacherTargets) -> tuple[Tensor, list[list[Tensor]]]:
        """The K-times augmented self-ensemble: the teacher's class logits ``(K, R, C)`` at the
        shared RoIs and, when MGD is on, its adapted FPN levels per view (else empty lists).

        A flipped view's FPN features are flipped back to the clean frame; there its RoI features
        are pooled at the shared RoIs and mirrored before the box head (``mirror``), and MGD
        compares them in that frame (exact on the pooled levels, off by one cell on the max-pooled
        5th level when its input width is even)."""
        teacher = self.ema_teacher
        logits, features = [], []
        for k in range(self.num_views):
            view = self.view(teacher, images, targets)
            flipped = k % 2 == 1
            if flipped:
                fpn = {n: f.flip(-1) for n, f in teacher.backbone(view.tensors.flip(-1)).items()}
            else:
                fpn = teacher.backbone(view.tensors)
            logits.append(roi_class_logits(teacher, fpn, targets.rois, targets.image_sizes, mirror=flipped))
            features.append(adapt(teacher.mgd_adaptors, fpn) if self.mgd_weight > 0 else [])
        return torch.stack(logits), features

    def mgd_loss(self, student_features: dict[str, Tensor], teacher_features: list[list[Tensor]],
                 targets: TeacherTargets) -> Tensor:
        """``L_mgd`` of the student's adapted FPN levels against every teacher view's, inside the
        teacher's foreground average-pooled to each level (the whole image without the gate)."""
        student_adapted = adapt(self.student.mgd_adaptors, student_features)
        masks = (
            foreground_masks_per_level(targets.foreground, [f.shape[-2:] for f in student_adapted])
            if self.mgd_mask_gate else None
        )
        return mask_guided_feature_distillation(student_adapted, teacher_features, masks)

    def unlabeled_loss(self, images: Sequence[Tensor]) -> tuple[Tensor, dict[str, Any]]:
        targets = self.teacher_targets(images)
        teacher_logits, teacher_features = self.teacher_views(images, targets)
        student_features = self.student_features(self.view(self.student, images, targets))
        student_logits = roi_class_logits(self.student, student_features, targets.rois, targets.image_sizes)

        is_positive = torch.cat(targets.roi_labels) > 0
        sensitivity = perturbation_sensitivity(torch.softmax(teacher_logits, dim=-1))
        negatives = select_sensitive_negatives(sensitivity, is_positive, self.negative_ratio, random=not self.psm)
        L_psm = psm_distillation_loss(
            student_logits, teacher_logits, is_positive, negatives, self.temperature,
            self.negative_weight if self.psm else 1.0,
        )
        L_mgd = (self.mgd_loss(student_features, teacher_features, targets) if self.mgd_weight > 0
                 else student_logits.sum() * 0.0)
        L_unlabeled = self.psm_weight * L_psm + self.mgd_weight * L_mgd

        logs: dict[str, Any] = {
            "train/L_psm": L_psm.detach(),
            "train/L_mgd": L_mgd.detach(),
            "train/pseudo_labels": float(targets.num_pseudo_labels),
            "train/positive_rois": float(is_positive.sum()),
            "train/mined_negatives": float(negatives.numel()),
        }
        if negatives.numel():
            logs["train/sensitivity_mined"] = sensitivity[negatives].mean().detach()
        return L_unlabeled, logs
