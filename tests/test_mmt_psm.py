"""MMT-PSM's losses on toy cases (PSM sensitivity / selection / sharpening, MGD) and one manual
training step of the method on a tiny phantom batch (the teacher never gets a gradient)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torchvision.ops import roi_align

from kdseg.callbacks.ema import ema_update_
from kdseg.data.cytology_phantom import make_cytology_phantom
from kdseg.losses.mgd import foreground_masks_per_level, mask_guided_feature_distillation
from kdseg.losses.psm import (
    perturbation_sensitivity,
    psm_distillation_loss,
    select_sensitive_negatives,
    sharpen,
)
from kdseg.networks.mask_rcnn import DetectorConfig, hflip_boxes, sample_shared_rois
from kdseg.methods.mmt_psm import MMTPSM

TINY_DETECTOR = DetectorConfig(
    backbone="resnet18", fpn_channels=16, box_representation_size=32, mask_head_channels=8,
    min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128], rpn_post_nms_top_n_train=100,
    rpn_post_nms_top_n_test=50, box_detections_per_img=10, box_batch_size_per_image=32,
)


# --------------------------------------------------------------------------- PSM


def test_sensitivity_is_the_summed_std_over_views():
    probs = torch.tensor(
        [
            [[0.7, 0.3], [0.9, 0.1]],
            [[0.7, 0.3], [0.5, 0.5]],
            [[0.7, 0.3], [0.1, 0.9]],
        ]
    )  # (K=3, R=2, C=2): RoI 0 agrees on every view, RoI 1 does not
    s = perturbation_sensitivity(probs)
    # RoI 1: values 0.9, 0.5, 0.1 -> unbiased std 0.4 for each class, summed over 2 classes.
    torch.testing.assert_close(s, torch.tensor([0.0, 0.8]))
    assert perturbation_sensitivity(probs[:1]).tolist() == [0.0, 0.0]  # K = 1: no spread
    with pytest.raises(ValueError):
        perturbation_sensitivity(probs[0])


def test_select_sensitive_negatives_keeps_the_most_sensitive_half_as_many_as_positives():
    sensitivity = torch.tensor([0.9, 0.1, 0.5, 0.8, 0.0, 0.3, 0.7, 0.2, 0.05])
    is_positive = torch.tensor([True, False, False, True, False, True, False, False, True])
    # 4 positives -> 2 negatives: the negatives' sensitivities are 0.1, 0.5, 0.0, 0.7, 0.2, 0.05.
    chosen = select_sensitive_negatives(sensitivity, is_positive, ratio=0.5)
    assert chosen.tolist() == [6, 2]
    g = torch.Generator().manual_seed(0)
    rand = select_sensitive_negatives(sensitivity, is_positive, ratio=0.5, generator=g, random=True)
    assert rand.numel() == 2 and not is_positive[rand].any()
    # 3 positives -> floor(1.5) = 1 negative (RoI 0, now a negative, is the most sensitive);
    # no positive -> nothing; the count is capped by the negatives there are.
    is_positive[0] = False
    assert select_sensitive_negatives(sensitivity, is_positive).tolist() == [0]
    assert select_sensitive_negatives(sensitivity, torch.zeros(9, dtype=torch.bool)).numel() == 0
    assert select_sensitive_negatives(sensitivity, is_positive, ratio=10).numel() == 6  # all negatives
    # Ties (K = 1: all zero) are broken at random, so every negative can be picked.
    zeros, pos = torch.zeros(6), torch.tensor([True, True, False, False, False, False])
    picked = {
        int(select_sensitive_negatives(zeros, pos, generator=torch.Generator().manual_seed(i))[0]) for i in range(40)
    }
    assert picked == {2, 3, 4, 5}


def test_sharpen_is_the_renormalised_power_of_the_softmax():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(logits, dim=-1)
    expected = p**2 / (p**2).sum(dim=-1, keepdim=True)  # T = 0.5
    torch.testing.assert_close(sharpen(logits, 0.5), expected)
    torch.testing.assert_close(sharpen(logits, 1.0), p)
    assert sharpen(logits, 0.5)[0, 0] > p[0, 0]  # sharper
    with pytest.raises(ValueError):
        sharpen(logits, 0.0)


def test_psm_loss_equals_a_hand_computed_value():
    teacher = torch.tensor(  # (K=2, R=3, C=2)
        [[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 3.0], [1.0, 1.0]]]
    )
    student = torch.tensor([[0.5, 0.0], [0.0, 0.0], [3.0, -3.0]], requires_grad=True)
    is_positive = torch.tensor([True, False, False])
    negatives = torch.tensor([1])  # RoI 2 is not kept
    loss = psm_distillation_loss(student, teacher, is_positive, negatives, temperature=0.5, negative_weight=1.5)
    # targets: softmax(mean logits / 0.5): RoI 0 mean (1, 0) -> softmax(2, 0); RoI 1 mean (0, 2) -> softmax(0, 4)
    t0 = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    t1 = torch.softmax(torch.tensor([0.0, 4.0]), 0)
    ce0 = -(t0 * torch.log_softmax(torch.tensor([0.5, 0.0]), 0)).sum()
    ce1 = -(t1 * torch.log_softmax(torch.tensor([0.0, 0.0]), 0)).sum()
    expected = (ce0 * 1.0 + ce1 * 1.5) / 2 / 2  # mean over the 2 kept RoIs, / C
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.grad[2].abs().sum() == 0  # RoI 2 not kept: no gradient
    empty = psm_distillation_loss(student, teacher, torch.zeros(3, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


# --------------------------------------------------------------------------- MGD


def test_mgd_equals_a_hand_computed_value_and_ignores_the_outside_of_the_mask():
    student = torch.zeros(1, 2, 2, 2, requires_grad=True)
    teacher = torch.tensor([[[[1.0, 5.0], [2.0, 7.0]], [[3.0, 9.0], [0.0, 9.0]]]])  # (1, C=2, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # left column is foreground
    loss = mask_guided_feature_distillation([student], [teacher], [mask], eps=0.0)
    # inside: squared values 1, 2^2 (channel 0) and 3^2, 0 (channel 1) -> 14 / (C=2 * 2 cells)
    assert math.isclose(float(loss.detach()), 14.0 / 4.0)
    loss.backward()
    assert student.grad[..., 1].abs().sum() == 0  # zero gradient outside the mask
    changed = teacher.clone()
    changed[..., 1] = -100.0  # change the teacher only outside the mask
    assert math.isclose(float(mask_guided_feature_distillation([student], [changed], [mask], eps=0.0).detach()), 3.5)
    # No gate: plain mean squared difference; an empty mask gives exactly 0.
    no_gate = mask_guided_feature_distillation([student], [teacher], None)
    torch.testing.assert_close(no_gate, (teacher**2).mean())
    assert float(mask_guided_feature_distillation([student], [teacher], [torch.zeros_like(mask)]).detach()) == 0.0
    # Several views and levels are averaged.
    two = mask_guided_feature_distillation(
        [student, student], [[teacher, teacher], [changed, changed]], [mask, mask], eps=0.0
    )
    assert math.isclose(float(two.detach()), 3.5)


def test_foreground_masks_per_level_pool_and_binarise():
    fg = torch.zeros(1, 8, 8, dtype=torch.bool)
    fg[0, :4, :4] = True  # top-left quarter
    fg[0, 4:6, 4:5] = True  # a small speck: under half of its 4x4 cell
    levels = foreground_masks_per_level(fg, [(8, 8), (2, 2), (1, 1)])
    assert [tuple(m.shape) for m in levels] == [(1, 1, 8, 8), (1, 1, 2, 2), (1, 1, 1, 1)]
    assert levels[0].sum() == 18
    assert levels[1][0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert levels[2].item() == 0.0  # 18 / 64 < 0.5


# --------------------------------------------------------------------------- Mask R-CNN helpers


def test_flipped_views_pool_the_mirrored_roi_exactly():
    boxes = torch.tensor([[2.0, 1.0, 5.0, 4.0]])
    torch.testing.assert_close(hflip_boxes(boxes, 10), torch.tensor([[5.0, 1.0, 8.0, 4.0]]))
    torch.testing.assert_close(hflip_boxes(hflip_boxes(boxes, 10), 10), boxes)
    # With ideally flip-equivariant features (those of the flipped image = the mirror), the RoI
    # seen in the flipped view must be the mirrored RoI. Flipping the features back and mirroring
    # the pooled RoI gets it exactly; mirroring the boxes does not (RoIAlign aligned=False).
    torch.manual_seed(0)
    feats = torch.randn(1, 2, 16, 16)  # stride 4 of a 64 px input
    roi = torch.tensor([[0.0, 12.0, 8.0, 40.0, 36.0]])
    mirrored = roi_align(feats, roi, 7, 0.25, 2, aligned=False).flip(-1)
    flipped_view = feats.flip(-1)
    ours = roi_align(flipped_view.flip(-1), roi, 7, 0.25, 2, aligned=False).flip(-1)
    torch.testing.assert_close(ours, mirrored, rtol=0, atol=0)
    flipped_roi = torch.cat([roi[:, :1], hflip_boxes(roi[:, 1:], 64)], dim=1)
    by_boxes = roi_align(flipped_view, flipped_roi, 7, 0.25, 2, aligned=False)
    assert (by_boxes - mirrored).abs().max() > 0.1


def test_shared_roi_sampling():
    model = MMTPSM(detector=TINY_DETECTOR, adaptor_channels=8).ema_teacher
    proposals = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 40.0, 40.0], [1.0, 1.0, 10.0, 11.0]])]
    pseudo = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    rois, labels = sample_shared_rois(model.roi_heads, proposals, pseudo, [torch.tensor([2])])
    assert rois[0].shape[0] == 4  # 3 proposals + the pseudo box itself
    positives = rois[0][labels[0] > 0]
    assert len(positives) == 3 and set(labels[0].tolist()) == {0, 2}


# --------------------------------------------------------------------------- a training step


@pytest.fixture(scope="module")
def tiny_batch():
    samples = make_cytology_phantom(4, seed=3, size=64)
    labeled = [(torch.from_numpy(s.image)[None], s.to_target()) for s in samples[:2]]
    unlabeled = [torch.from_numpy(s.image)[None] for s in samples[2:]]
    return {"labeled": labeled, "unlabeled": unlabeled}


def test_teacher_gets_no_gradient_in_a_manual_training_step(tiny_batch):
    torch.manual_seed(0)
    model = MMTPSM(detector=TINY_DETECTOR, warmup_steps=0, pseudo_label_score=0.0, adaptor_channels=8, num_views=2)
    model.train()
    assert not model.ema_teacher.training and model.student.training
    assert all(not p.requires_grad for p in model.ema_teacher.parameters())
    teacher_before = {k: v.clone() for k, v in model.ema_teacher.state_dict().items()}
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.01)
    assert not any(p is q for p in model.trainable_parameters() for q in model.ema_teacher.parameters())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        targets = model.teacher_targets(tiny_batch["unlabeled"])
        assert targets.num_pseudo_labels > 0 and targets.foreground.any()
        term, logs = model.unlabeled_loss(tiny_batch["unlabeled"])
        assert float(logs["train/positive_rois"]) > 0 and float(logs["train/mined_negatives"]) > 0
        assert torch.isfinite(logs["train/L_psm"]) and torch.isfinite(logs["train/L_mgd"]) and float(logs["train/L_mgd"]) > 0
        loss = model.training_step(tiny_batch, 0)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in model.ema_teacher.parameters())
    assert model.student.mgd_adaptors[0].weight.grad is not None  # MGD reaches the student's adaptors
    assert model.student.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    optimizer.step()
    for key, value in model.ema_teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key], rtol=0, atol=0)  # only the EMA moves it
    ema_update_(model.ema_teacher, model.student, 0.5)
    moved = model.ema_teacher.roi_heads.box_predictor.cls_score.weight
    assert not torch.equal(moved, teacher_before["roi_heads.box_predictor.cls_score.weight"])


def test_warmup_and_no_pseudo_labels(tiny_batch):
    model = MMTPSM(detector=TINY_DETECTOR, warmup_steps=10, consistency_rampup_steps=5, pseudo_label_score=1.01,
                   adaptor_channels=8, num_views=1)
    assert model.unlabeled_weight(9) == 0.0
    assert 0 < model.unlabeled_weight(10) < model.unlabeled_weight(15) == pytest.approx(5.0)
    model.train()
    term, logs = model.unlabeled_loss(tiny_batch["unlabeled"])  # the teacher keeps nothing
    assert logs["train/pseudo_labels"] == 0 and float(term.detach()) == 0.0  # no positive, no foreground
    assert model.needs_foreground
    assert not MMTPSM(detector=TINY_DETECTOR, mgd_weight=0.0).needs_foreground
    assert not MMTPSM(detector=TINY_DETECTOR, mgd_mask_gate=False).needs_foreground


def _batchnorm_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buffer.clone()
        for name, buffer in module.named_buffers()
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
    }


@pytest.mark.parametrize("method", ["mmt_psm", "instance_mean_teacher"])
def test_perturbed_unlabeled_view_leaves_the_students_batchnorm_statistics(tiny_batch, method):
    from kdseg.methods.instance_mean_teacher import InstanceMeanTeacher

    def build(**kwargs):
        torch.manual_seed(0)
        if method == "mmt_psm":
            return MMTPSM(detector=TINY_DETECTOR, warmup_steps=0, pseudo_label_score=0.0, adaptor_channels=8,
                          num_views=2, **kwargs)
        return InstanceMeanTeacher(detector=TINY_DETECTOR, warmup_steps=0, pseudo_label_score=0.0, **kwargs)

    model = build()
    model.train()
    before = _batchnorm_buffers(model.student)
    assert before, "the from-scratch trunk has BatchNorm layers"
    term, _ = model.unlabeled_loss(tiny_batch["unlabeled"])
    term.backward()  # gradients still flow through the batch statistics
    assert model.student.backbone.body.layer1[0].conv1.weight.grad.abs().sum() > 0
    for name, value in _batchnorm_buffers(model.student).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=f"{name} moved")
    layers = [m for m in model.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.track_running_stats for m in layers)  # restored after the block
    with torch.no_grad():  # any other train-mode forward still updates them
        model.student.backbone(torch.rand(2, 3, 64, 64))
    assert not torch.equal(model.student.backbone.body.bn1.running_mean, before["backbone.body.bn1.running_mean"])

    # The opt-in reproduces the old behaviour: the perturbed view moves the running statistics.
    legacy = build(unlabeled_updates_bn_statistics=True)
    legacy.train()
    start = _batchnorm_buffers(legacy.student)
    legacy.unlabeled_loss(tiny_batch["unlabeled"])
    moved = _batchnorm_buffers(legacy.student)
    assert not torch.equal(moved["backbone.body.bn1.running_mean"], start["backbone.body.bn1.running_mean"])
