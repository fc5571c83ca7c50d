"""Wiring of the dense semi-supervised methods (Mean Teacher, UA-MT, USTM) and of DMPLS: which
output is compared with which (the device is described in ``identity_teacher``)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from identity_teacher import (  # noqa: F401  (seeded: autouse fixture)
    TINY4, VISIBLE, ZERO, assert_teacher_gets_no_gradient, capture_logs, dense_batch, identity_setup, images,
    perturb_teacher, scribble_batch, seeded, value,
)
from kdseg.losses.dice import soft_dice_loss
from kdseg.losses.segmentation import ce_dice_loss, softmax_mse
from kdseg.methods import DMPLS, USTM, MeanTeacher
from kdseg.methods.ua_mt import UncertaintyAwareMeanTeacher


# --------------------------------------------------------------------------- Mean Teacher, UA-MT


def test_mean_teacher_pairs_each_unlabeled_image_with_its_own_teacher_output(monkeypatch) -> None:
    model = MeanTeacher(network=TINY4, noise_std=0.0, consistency_rampup_steps=0)
    logs = identity_setup(model, monkeypatch)
    batch = dense_batch()
    loss = model.training_step(batch, 0)
    assert value(logs["train/L_cons"]) < ZERO
    torch.testing.assert_close(loss, ce_dice_loss(model.student(batch["labeled"]["image"]).logits,
                                                  batch["labeled"]["target"]) + 0.1 * logs["train/L_cons"])
    with torch.no_grad():
        unlabeled = model.student(batch["unlabeled"]["image"]).logits
    assert value(softmax_mse(unlabeled, unlabeled.roll(1, 0))) > VISIBLE  # a permutation would show


def test_mean_teacher_teacher_gets_no_gradient(monkeypatch) -> None:
    model = MeanTeacher(network=TINY4, consistency_rampup_steps=0)
    capture_logs(model, monkeypatch)
    model.ema_teacher.requires_grad_(True)
    assert_teacher_gets_no_gradient(model, model.training_step(dense_batch(), 0))


def test_ua_mt_pairs_images_and_keeps_certain_pixels(monkeypatch) -> None:
    # teacher_dropout off: the teacher is then the student's exact copy (dropout: test_fidelity.py).
    model = UncertaintyAwareMeanTeacher(network=TINY4, noise_std=0.0, consistency_rampup_steps=0,
                                        mc_passes=2, max_entropy=10.0, teacher_dropout=False)
    logs = identity_setup(model, monkeypatch)
    model.training_step(dense_batch(), 0)
    assert value(logs["train/certain_fraction"]) == 1.0  # every pixel is below 0.75 * 10 nats
    assert value(logs["train/L_cons"]) < ZERO
    model.ema_teacher.requires_grad_(True)
    model.train()
    assert_teacher_gets_no_gradient(model, model.training_step(dense_batch(1), 0))


def test_ua_mt_loss_threshold_and_mask_by_hand(monkeypatch) -> None:
    """Teacher moved off the student, no threshold ramp and ``max_entropy`` at the median teacher
    entropy (about half the pixels certain): the mask, the masked consistency, the ramped weight
    ``0.1 exp(-5)`` and ``L = L_sup + w L_cons`` are checked by hand, and the teacher's input noise
    is clipped at the configured ``noise_clip``."""
    model = UncertaintyAwareMeanTeacher(network=TINY4, noise_std=0.0, consistency_rampup_steps=100, mc_passes=2,
                                        threshold_rampup_steps=0, teacher_dropout=False)
    logs = identity_setup(model, monkeypatch)
    with torch.no_grad():  # a small move keeps the teacher's entropies spread (a large one saturates them)
        for q in model.ema_teacher.parameters():
            q.add_(0.02 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())))
    batch = dense_batch()
    unlabeled = batch["unlabeled"]["image"]
    with torch.no_grad():
        t = model.ema_teacher(unlabeled).logits
        s = model.student(unlabeled).logits
    p = torch.softmax(t, dim=1)
    entropy = -(p * torch.log(p + 1e-6)).sum(dim=1, keepdim=True)
    model.max_entropy = float(entropy.median())
    loss = model.training_step(batch, 0)
    mask = (entropy < model.max_entropy).float()
    assert 0.2 < value(mask.mean()) < 0.8
    assert value(logs["train/certain_fraction"]) == pytest.approx(value(mask.mean()))
    assert value(logs["train/uncertainty_threshold"]) == pytest.approx(model.max_entropy)
    consistency = (mask * (torch.softmax(s, 1) - p) ** 2).sum() / (2 * mask.sum())
    assert value(consistency) > VISIBLE
    torch.testing.assert_close(logs["train/L_cons"].detach(), consistency, rtol=1e-4, atol=1e-7)
    weight = 0.1 * math.exp(-5.0)
    assert value(logs["train/consistency_weight"]) == pytest.approx(weight)
    assert value(loss - logs["train/L_sup"]) == pytest.approx(weight * value(consistency), rel=0.05)  # float32 loss ~ 1.4
    seen = []
    model.noise_std, model.noise_clip = 10.0, 0.05
    real = model.teacher_forward
    monkeypatch.setattr(model, "teacher_forward", lambda x: (seen.append(x), real(x))[1])
    model.training_step(batch, 0)
    deviation = (seen[0] - unlabeled.repeat(3, 1, 1, 1)).abs()
    assert value(deviation.max()) == pytest.approx(0.05) and value(deviation.min()) > 0


def test_ua_mt_defaults_and_argument_checks() -> None:
    """SSL4MIS's UA-MT settings by default (8 passes, a 30000-step threshold ramp, teacher dropout);
    ``max_entropy=None`` is ``ln C``; one pass is allowed, none is not."""
    model = UncertaintyAwareMeanTeacher(network=TINY4)
    assert (model.mc_passes, model.threshold_rampup_steps, model.teacher_dropout) == (8, 30000, True)
    assert model.max_entropy == pytest.approx(math.log(2))
    assert UncertaintyAwareMeanTeacher(network=TINY4, max_entropy=None).max_entropy == pytest.approx(math.log(4))
    assert UncertaintyAwareMeanTeacher(network=TINY4, max_entropy=1.5).max_entropy == 1.5
    assert UncertaintyAwareMeanTeacher(network=TINY4, mc_passes=1, teacher_dropout=False).teacher_dropout is False
    with pytest.raises(ValueError, match="mc_passes must be >= 1, got 0"):
        UncertaintyAwareMeanTeacher(network=TINY4, mc_passes=0)


# --------------------------------------------------------------------------- USTM


@pytest.mark.parametrize("k", [1, 3])
def test_ustm_rotates_the_student_output_like_the_teacher_input(monkeypatch, k) -> None:
    """An oracle teacher that is exactly rotation-equivariant, ``T(x) = rot_k(S(rot_-k(x)))``:
    the student's output rotated by ``k`` must then match the teacher's output on the image
    rotated by ``k`` exactly (rotating by ``-k``, or not at all, does not for k = 1, 3)."""
    model = USTM(network=TINY4, mc_passes=2, noise_std=0.0, consistency_rampup_steps=0, max_entropy=10.0,
                 teacher_dropout=False)
    logs = identity_setup(model, monkeypatch)
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: torch.tensor(k))
    seen = []

    def equivariant_teacher(x: torch.Tensor) -> SimpleNamespace:
        seen.append(x)
        with torch.no_grad():
            out = model.ema_teacher(torch.rot90(x, -k, dims=(2, 3))).logits
        return SimpleNamespace(logits=torch.rot90(out, k, dims=(2, 3)))

    monkeypatch.setattr(model, "teacher_forward", equivariant_teacher)
    batch = scribble_batch()
    model.training_step(batch, 0)
    image = batch["labeled"]["image"]
    assert torch.equal(seen[0][: image.shape[0]], torch.rot90(image, k, dims=(2, 3)))  # the teacher sees rot_k
    assert value(logs["train/certain_fraction"]) == 1.0
    assert value(logs["train/L_tc"]) < ZERO
    with torch.no_grad():
        s = model.student(image).logits
    wrong = torch.softmax(torch.rot90(s, -k, dims=(2, 3)), 1) - torch.softmax(torch.rot90(s, k, dims=(2, 3)), 1)
    assert value((wrong**2).sum() / (2 * s[:, :1].numel())) > VISIBLE


def test_ustm_teacher_gets_no_gradient(monkeypatch) -> None:
    model = USTM(network=TINY4, mc_passes=2, consistency_rampup_steps=0)
    capture_logs(model, monkeypatch)
    model.ema_teacher.requires_grad_(True)
    assert_teacher_gets_no_gradient(model, model.training_step(scribble_batch(), 0))


# --------------------------------------------------------------------------- DMPLS (the auxiliary branch as the second opinion)


def test_dmpls_mixes_the_two_branches_of_the_same_images(monkeypatch) -> None:
    """With the auxiliary decoder made a copy of the main one (and dropout off), both branches agree,
    so the mixed pseudo-label is the main branch's argmax whatever ``beta``; mixing branch outputs of
    different images changes it."""
    torch.manual_seed(0)
    model = DMPLS(network=TINY4)
    aux = model.student.heads["aux_decoder"]
    aux.decoder.load_state_dict(model.student.unet.decoder.state_dict())
    aux.head.load_state_dict(model.student.unet.segmentation_head.state_dict())
    model.eval()
    logs = capture_logs(model, monkeypatch)
    batch = scribble_batch()
    loss = model.training_step(batch, 0)
    with torch.no_grad():
        main = model.student(batch["labeled"]["image"]).logits
    probs = torch.softmax(main, dim=1)
    pls = soft_dice_loss(probs, probs.argmax(dim=1), squared_pred=True)
    torch.testing.assert_close(logs["train/L_pls"].detach(), pls)
    pce = F.cross_entropy(main, batch["labeled"]["target"], ignore_index=4)
    torch.testing.assert_close(loss.detach(), pce + 0.5 * pls)
    mixed = (0.5 * probs + 0.5 * probs.roll(1, 0)).argmax(dim=1)
    assert abs(value(soft_dice_loss(probs, mixed, squared_pred=True) - pls)) > VISIBLE


# --------------------------------------------------------------------------- loss composition (survivors of the mutation run)


@pytest.mark.parametrize("method", ["mean_teacher", "ustm"])
def test_consistency_enters_the_loss_with_its_ramped_weight(monkeypatch, method) -> None:
    """``L = L_sup + w(0) * L_cons`` with ``w(0) = w_max * exp(-5)`` (sigmoid ramp over 100 steps;
    w_max 0.1 for Mean Teacher as SSL4MIS, 1.0 for USTM as WSL4MIS)."""
    if method == "mean_teacher":
        model, batch = MeanTeacher(network=TINY4, noise_std=0.0, consistency_rampup_steps=100), dense_batch()
        keys = ("train/L_sup", "train/L_cons")
    else:
        model = USTM(network=TINY4, mc_passes=2, noise_std=0.0, consistency_rampup_steps=100, max_entropy=10.0,
                     teacher_dropout=False)
        batch, keys = scribble_batch(), ("train/L_pce", "train/L_tc")
    logs = identity_setup(model, monkeypatch)
    perturb_teacher(model)
    loss = model.training_step(batch, 0)
    weight = {"mean_teacher": 0.1, "ustm": 1.0}[method] * math.exp(-5.0)
    assert value(logs["train/consistency_weight"]) == pytest.approx(weight)
    assert value(logs[keys[1]]) > VISIBLE
    torch.testing.assert_close(loss.detach(), (logs[keys[0]] + weight * logs[keys[1]]).detach())


def test_ustm_certain_pixels_follow_the_ramped_threshold_and_the_noise_is_clipped(monkeypatch) -> None:
    """Without a ramp the threshold is ``max_entropy``, set here to the median teacher entropy (the
    untrained network's entropies lie within a few thousandths of ln 4, so a ramp's 0.75 factor would
    admit all or none): the logged fraction must be the hand-counted one, about half."""
    model = USTM(network=TINY4, mc_passes=2, noise_std=0.0, threshold_rampup_steps=0, teacher_dropout=False)
    logs = identity_setup(model, monkeypatch)
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: torch.tensor(0))
    image = scribble_batch()["labeled"]["image"]
    with torch.no_grad():
        p = torch.softmax(model.ema_teacher(image).logits, dim=1)
    entropy = -(p * torch.log(p + 1e-6)).sum(dim=1)
    model.max_entropy = float(entropy.median())
    model.training_step(scribble_batch(), 0)
    expected = (entropy < model.max_entropy).float().mean()
    assert 0.2 < value(expected) < 0.8
    assert value(logs["train/certain_fraction"]) == pytest.approx(value(expected))
    seen = []
    model.noise_std, model.noise_clip = 10.0, 0.05
    real = model.teacher_forward
    monkeypatch.setattr(model, "teacher_forward", lambda x: (seen.append(x), real(x))[1])
    model.training_step(scribble_batch(), 0)
    deviation = (seen[0] - image.repeat(3, 1, 1, 1)).abs()
    assert value(deviation.max()) == pytest.approx(0.05) and value(deviation.min()) > 0
