"""Wiring of the instance methods (instance Mean Teacher, MMT-PSM): which output is compared with
which (the device is described in ``identity_teacher``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from identity_teacher import (  # noqa: F401  (seeded: autouse fixture)
    TINY_DETECTOR, VISIBLE, ZERO, assert_teacher_gets_no_gradient, identity_setup, seeded, value,
)
from kdseg.data.cytology_phantom import make_cytology_phantom
from kdseg.losses.segmentation import softmax_mse
from kdseg.methods import instance_mean_teacher, mmt_psm
from kdseg.methods.instance_mean_teacher import InstanceMeanTeacher
from kdseg.methods.mmt_psm import MMTPSM
from kdseg.networks import mask_rcnn


# --------------------------------------------------------------------------- instance Mean Teacher, MMT-PSM


@pytest.fixture(scope="module")
def unlabeled_cells() -> list[torch.Tensor]:
    return [torch.from_numpy(s.image)[None] for s in make_cytology_phantom(2, seed=3, size=64)]


def instance_identity(model, monkeypatch) -> dict:
    """The identity teacher for Mask R-CNN: eval mode and perturbed views equal to the clean one."""
    monkeypatch.setattr(model, "perturbation", lambda x: x)
    return identity_setup(model, monkeypatch)


def spy(monkeypatch, module, name: str, calls: list) -> None:
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: (calls.append(args), real(*args, **kwargs))[1])


def test_instance_mean_teacher_pairs_each_roi_with_itself(monkeypatch, unlabeled_cells) -> None:
    model = InstanceMeanTeacher(detector=TINY_DETECTOR, warmup_steps=0, pseudo_label_score=0.0, erase_prob=0.0)
    instance_identity(model, monkeypatch)
    calls: list = []
    spy(monkeypatch, instance_mean_teacher, "roi_class_logits", calls)
    term, logs = model.unlabeled_loss(unlabeled_cells)
    assert value(term) < ZERO and value(logs["train/L_cons"]) < ZERO
    assert calls[0][0] is model.ema_teacher and calls[1][0] is model.student
    with torch.no_grad():
        student = mask_rcnn.roi_class_logits(*calls[1])
    assert student.shape[0] >= 2
    assert value(softmax_mse(student, student.roll(1, 0))) > VISIBLE


@pytest.mark.parametrize("n_rois", [None, 1, 0])
def test_instance_mean_teacher_consistency_and_counts_by_hand(monkeypatch, unlabeled_cells, n_rois) -> None:
    """With the teacher's class head moved off the student's, the consistency is the MSE of the RoI
    softmaxes computed here (over all sampled RoIs, over a single one, or none: then an exact,
    differentiable 0); the logged counts are the teacher's pseudo-labels and positive RoIs."""
    model = InstanceMeanTeacher(detector=TINY_DETECTOR, warmup_steps=0, pseudo_label_score=0.0, erase_prob=0.0)
    logs = instance_identity(model, monkeypatch)
    with torch.no_grad():
        cls_score = model.ema_teacher.roi_heads.box_predictor.cls_score
        cls_score.weight.add_(torch.randn(cls_score.weight.shape, generator=torch.Generator().manual_seed(1)))
    real_targets, seen = model.teacher_targets, []

    def targets(images):
        t = real_targets(images)
        if n_rois is not None:  # keep n_rois RoIs of the first image, none of the others
            t = dataclasses.replace(t, rois=[r[: n_rois if i == 0 else 0] for i, r in enumerate(t.rois)],
                                    roi_labels=[r[: n_rois if i == 0 else 0] for i, r in enumerate(t.roi_labels)])
        seen.append(t)
        return t

    monkeypatch.setattr(model, "teacher_targets", targets)
    calls: list = []
    spy(monkeypatch, instance_mean_teacher, "roi_class_logits", calls)
    term, logs = model.unlabeled_loss(unlabeled_cells)
    with torch.no_grad():
        teacher, student = mask_rcnn.roi_class_logits(*calls[0]), mask_rcnn.roi_class_logits(*calls[1])
    assert student.shape[0] == (n_rois if n_rois is not None else sum(r.shape[0] for r in seen[0].rois))
    assert term.requires_grad and torch.isfinite(term)
    if n_rois == 0:
        assert value(term) == 0.0
    else:
        expected = ((torch.softmax(student, -1) - torch.softmax(teacher, -1)) ** 2).mean()
        assert value(expected) > VISIBLE
        torch.testing.assert_close(term.detach(), expected)
    torch.testing.assert_close(logs["train/L_cons"], term.detach())
    labels = torch.cat(seen[0].roi_labels)
    assert logs["train/pseudo_labels"] == seen[0].num_pseudo_labels > 0
    assert logs["train/positive_rois"] == int((labels > 0).sum())
    if n_rois is None:
        assert 0 < logs["train/positive_rois"] < labels.numel()


def test_mmt_psm_pairs_each_roi_with_itself(monkeypatch, unlabeled_cells) -> None:
    """One unflipped teacher view: its RoI logits and MGD features are the student's exactly."""
    model = MMTPSM(detector=TINY_DETECTOR, warmup_steps=0, pseudo_label_score=0.0, erase_prob=0.0, num_views=1,
                   adaptor_channels=8)
    instance_identity(model, monkeypatch)
    calls: list = []
    spy(monkeypatch, mmt_psm, "psm_distillation_loss", calls)
    _, logs = model.unlabeled_loss(unlabeled_cells)
    student, stacked = calls[0][0], calls[0][1]
    assert stacked.shape[0] == 1 and student.shape[0] >= 2
    torch.testing.assert_close(stacked[0], student.detach())
    assert value(logs["train/L_mgd"]) < ZERO
    p = torch.softmax(student.detach(), -1)
    assert value(((p - p.roll(1, 0)) ** 2).sum()) > VISIBLE


class FlipEquivariant(torch.nn.Module):
    """``E(x) = (B(x) + flip(B(flip(x)))) / 2``: ``E(flip(x)) = flip(E(x))`` exactly, per FPN level."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.inner = backbone
        self.out_channels = backbone.out_channels

    def forward(self, x: torch.Tensor) -> dict:
        plain, mirrored = self.inner(x), self.inner(x.flip(-1))
        return {name: (plain[name] + mirrored[name].flip(-1)) / 2 for name in plain}


def test_mmt_psm_flipped_view_is_flipped_back_and_mirrored(monkeypatch, unlabeled_cells) -> None:
    """With a flip-equivariant teacher backbone, the flipped view's features flipped back are the
    clean view's, so view 1's logits must be the box head on the clean RoI features mirrored and view
    0's on the plain ones; not flipping back, or mirroring the wrong view, breaks either equality."""
    model = MMTPSM(detector=TINY_DETECTOR, warmup_steps=0, pseudo_label_score=0.0, erase_prob=0.0, num_views=2,
                   adaptor_channels=8)
    instance_identity(model, monkeypatch)
    teacher = model.ema_teacher
    monkeypatch.setattr(teacher, "backbone", FlipEquivariant(teacher.backbone))
    targets_seen: list = []
    real_targets = model.teacher_targets
    monkeypatch.setattr(model, "teacher_targets", lambda images: targets_seen.append(real_targets(images)) or targets_seen[-1])
    calls: list = []
    spy(monkeypatch, mmt_psm, "psm_distillation_loss", calls)
    model.unlabeled_loss(unlabeled_cells)
    stacked, targets = calls[0][1], targets_seen[0]
    with torch.no_grad():
        features = teacher.backbone(mask_rcnn.preprocess(teacher, unlabeled_cells)[0].tensors)
        plain = mask_rcnn.roi_class_logits(teacher, features, targets.rois, targets.image_sizes)
        mirrored = mask_rcnn.roi_class_logits(teacher, features, targets.rois, targets.image_sizes, mirror=True)
    torch.testing.assert_close(stacked[0], plain)
    torch.testing.assert_close(stacked[1], mirrored)
    assert value((plain - mirrored).abs().max()) > VISIBLE


@pytest.mark.parametrize("method", ["mmt_psm", "instance_mean_teacher"])
def test_instance_teacher_gets_no_gradient(monkeypatch, unlabeled_cells, method) -> None:
    kwargs = dict(detector=TINY_DETECTOR, warmup_steps=0, pseudo_label_score=0.0)
    model = MMTPSM(**kwargs, num_views=2, adaptor_channels=8) if method == "mmt_psm" else InstanceMeanTeacher(**kwargs)
    model.ema_teacher.requires_grad_(True)
    model.train()
    term, _ = model.unlabeled_loss(unlabeled_cells)
    assert_teacher_gets_no_gradient(model, term)
