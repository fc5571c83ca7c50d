"""Wiring of every teacher-student method: which output is compared with which.

The loss tests check each loss on hand-computed values; these tests check that the training steps
feed them the right tensors. The common device is an *identity teacher*: at construction the EMA
teacher is an exact copy of the student, so with the input noise off and the model in eval mode
(BatchNorm on running statistics, so an image's output does not depend on its batch) the teacher
and the student give the same output for the same image. A consistency term must then be exactly 0,
and a KD term must equal the value computed here by hand from the student's own outputs. Pairing
the outputs of different images (a batch permutation on one side), losing a temperature factor or
inverting a transform with the wrong sign moves the value away from it; each test also checks that
such a mistake would be visible (the mismatched value is clearly nonzero), so none passes vacuously.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdseg.data.cytology_phantom import make_cytology_phantom
from kdseg.losses.contrastive import prototype_infonce_loss
from kdseg.losses.dice import soft_dice_loss
from kdseg.losses.segmentation import ce_dice_loss, softmax_mse
from kdseg.methods import DMPLS, USTM, MeanTeacher, NetworkConfig, ScribSD, ScribSDPlus
from kdseg.methods import instance_mean_teacher, mmt_psm
from kdseg.methods.action import (
    HEAD_GLOBAL_PREDICTOR,
    HEAD_GLOBAL_PROJECTION,
    HEAD_LOCAL_PREDICTOR,
    HEAD_LOCAL_PROJECTION,
    ActionAnatomicalContrast,
    ActionGlobalDistillation,
    ActionLocalDistillation,
)
from kdseg.methods.instance_mean_teacher import InstanceMeanTeacher
from kdseg.methods.mmt_psm import MMTPSM
from kdseg.methods.ua_mt import UncertaintyAwareMeanTeacher
from kdseg.networks import mask_rcnn
from kdseg.networks.mask_rcnn import DetectorConfig

TINY4 = NetworkConfig(encoder_depth=4, decoder_channels=[32, 16, 8, 8])
ZERO = 1e-10  # "exactly 0" up to float rounding of identical computations in different batches
VISIBLE = 1e-5  # a mismatched pairing gives at least this much
TINY_DETECTOR = DetectorConfig(
    backbone="resnet18", fpn_channels=16, box_representation_size=32, mask_head_channels=8,
    min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128], rpn_post_nms_top_n_train=100,
    rpn_post_nms_top_n_test=50, box_detections_per_img=10, box_batch_size_per_image=32,
)


def images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """``(n, 1, size, size)`` clearly different images: random blobs of different brightness."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g)
    return F.avg_pool2d(x, 5, stride=1, padding=2) * torch.linspace(0.5, 2.0, n)[:, None, None, None]


def dense_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 100)
    return {
        "labeled": {"image": images(2, seed), "target": torch.randint(0, 4, (2, 32, 32), generator=g)},
        "unlabeled": {"image": images(3, seed + 1)},
    }


def scribble_batch(seed: int = 0) -> dict:
    scribble = torch.full((3, 32, 32), 4, dtype=torch.long)
    scribble[:, 4, 2:30] = 0
    scribble[:, 12:20, 16] = 1
    scribble[:, 22, 8:20] = 2
    scribble[1, 26, 4:12] = 3
    return {"labeled": {"image": images(3, seed), "target": scribble}}


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every network starts from the same weights: the pairing checks must not depend on the draw."""
    torch.manual_seed(0)


def capture_logs(model, monkeypatch) -> dict:
    logs: dict = {}
    monkeypatch.setattr(model, "log_dict", lambda values, **kwargs: logs.update(values))
    return logs


def identity_setup(model, monkeypatch) -> dict:
    """Eval mode (batch-independent outputs), logs captured; the teacher is still the student's copy."""
    for p, q in zip(model.student.parameters(), model.ema_teacher.parameters()):
        assert torch.equal(p, q)
    model.eval()
    return capture_logs(model, monkeypatch)


def value(x) -> float:
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def assert_teacher_gets_no_gradient(model, loss: torch.Tensor) -> None:
    """Even with its parameters switched to ``requires_grad``, the teacher's outputs must enter the
    loss without a graph (computed under ``no_grad`` or detached)."""
    loss.backward()
    assert all(p.grad is None for p in model.ema_teacher.parameters())
    assert any(p.grad is not None for p in model.student.parameters())


def kl_by_hand(target_probs: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_pixels sum_c q (log q - log softmax(z / T))``."""
    log_q = target_probs.clamp_min(1e-30).log()
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * (target_probs * (log_q - log_p)).sum(dim=1).mean()


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


# --------------------------------------------------------------------------- ScribSD+, ScribSD


def student_scales(model, image: torch.Tensor, scales: list[int]) -> list[torch.Tensor]:
    """The student's prediction at each scale, read off the decoder by hand: head ``ds_s`` on the
    decoder output at ``1/s`` (the decoder features are coarsest first, finest last)."""
    out = model.student(image)
    z = [out.logits]
    for s in scales[1:]:
        z.append(model.student.heads[f"ds_{s}"](out.decoder_features[-1 - int(math.log2(s))]))
    for s, zs in zip(scales, z):
        assert zs.shape[-1] == image.shape[-1] // s
    return z


@pytest.mark.parametrize("temperature, teacher_temperature", [(2.0, None), (2.0, 0.5), (1.0, 3.0)])
def test_scribsd_plus_kd_equals_the_hand_computed_multiscale_kl(monkeypatch, temperature, teacher_temperature) -> None:
    """Full-resolution target: ``q_s = avgpool_s(softmax(t / T_t))`` supervises ``softmax(z_s / T)``
    with ``T^2 * KL``, weights ``1 / s``. With the identity teacher the scale-1 term is 0 but the
    coarse ones are not, so a lost ``T_t *`` on the coarse targets, swapped temperatures or a
    batch permutation of the teacher change the value."""
    scales = [1, 2, 4, 8]
    model = ScribSDPlus(network=TINY4, consistency_rampup_steps=0, noise_on="none", contrast_weight=0.0,
                        kd_temperature=temperature, kd_teacher_temperature=teacher_temperature,
                        ds_pce_weight=0.0)  # main-head pCE only: the heads' pCE is checked in the next test
    logs = identity_setup(model, monkeypatch)
    batch = scribble_batch()
    loss = model.training_step(batch, 0)
    image, scribble = batch["labeled"]["image"], batch["labeled"]["target"]
    t_t = temperature if teacher_temperature is None else teacher_temperature
    with torch.no_grad():
        z = student_scales(model, image, scales)
        teacher_probs = torch.softmax(model.ema_teacher(image).logits / t_t, dim=1)
    weights = [1.0 / s for s in scales]

    def kd(target: torch.Tensor) -> torch.Tensor:
        terms = [kl_by_hand(F.avg_pool2d(target, s), zs, temperature) for s, zs in zip(scales, z)]
        return sum(w * t for w, t in zip(weights, terms)) / sum(weights)

    expected = kd(teacher_probs)
    torch.testing.assert_close(logs["train/L_kd"].detach(), expected, rtol=1e-5, atol=1e-7)
    pce = F.cross_entropy(z[0], scribble, ignore_index=4)
    torch.testing.assert_close(loss.detach(), pce + expected, rtol=1e-5, atol=1e-7)
    assert abs(value(kd(teacher_probs.roll(1, 0))) - value(expected)) > VISIBLE  # a permutation would show


def test_scribsd_plus_deep_supervision_pce_contrast_and_ramped_total_by_hand(monkeypatch) -> None:
    """``L_pce = pCE(z_1) + w_ds * mean_s pCE(up(z_s))``, the prototype InfoNCE on the student's
    projection with the configured temperature and pixel cap, and ``L = L_pce + r (w_kd L_kd +
    w_c L_c)`` with the ramp ``r = exp(-5)`` at step 0; the logged pixel fraction is the scribble's
    (the untrained teacher is never 0.9-confident)."""
    model = ScribSDPlus(network=TINY4, kd_scales=[1, 2], consistency_rampup_steps=100, noise_on="none", ds_pce_weight=0.4,
                        kd_weight=0.7, contrast_weight=0.3, contrast_temperature=0.05, max_pixels_per_class=8)
    logs = identity_setup(model, monkeypatch)
    batch = scribble_batch()
    image, scribble = batch["labeled"]["image"], batch["labeled"]["target"]
    torch.manual_seed(5)
    loss = model.training_step(batch, 0)
    with torch.no_grad():
        z = student_scales(model, image, [1, 2])
        embeddings = model.student.heads["projection"](model.student(image).decoder_features[-1])
        up = F.interpolate(z[1], size=(32, 32), mode="bilinear", align_corners=False)
        pce = F.cross_entropy(z[0], scribble, ignore_index=4) + 0.4 * F.cross_entropy(up, scribble, ignore_index=4)
        torch.manual_seed(5)
        contrast = prototype_infonce_loss(embeddings, scribble, 4, 4, temperature=0.05, max_pixels_per_class=8)
    torch.testing.assert_close(logs["train/L_pce"].detach(), pce, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logs["train/L_contrast"].detach(), contrast, rtol=1e-6, atol=1e-7)
    assert value(logs["train/contrast_pixels"]) == pytest.approx(value((scribble != 4).float().mean()))
    assert "train/L_feature_kd" not in logs
    ramp = math.exp(-5.0)
    assert value(logs["train/ramp"]) == pytest.approx(ramp)
    expected = pce + ramp * (0.7 * logs["train/L_kd"].detach() + 0.3 * contrast)
    assert value(ramp * (0.7 * logs["train/L_kd"] + 0.3 * contrast)) > 1e-4
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-7)
    assert logs["train/loss"] is loss
    with torch.no_grad():
        uncapped = prototype_infonce_loss(embeddings, scribble, 4, 4, temperature=0.05, max_pixels_per_class=None)
        default_temperature = prototype_infonce_loss(embeddings, scribble, 4, 4, max_pixels_per_class=None)
    # the untrained embeddings are nearly equal: a low temperature makes the cap and the temperature show
    assert abs(value(uncapped) - value(contrast)) > VISIBLE and abs(value(default_temperature) - value(uncapped)) > VISIBLE


def test_scribsd_kd_and_feature_kd_enter_with_their_ramped_weights(monkeypatch) -> None:
    """ScribSD: ``L = L_pce + r (L_kd + w_f L_fkd)`` with the teacher moved off the student
    (``L_fkd > 0``); ``L_kd`` is the full-resolution ``T^2 KL`` with ``T = 2``."""
    model = ScribSD(network=TINY4, consistency_rampup_steps=100, noise_on="none", feature_kd_weight=0.5)
    logs = identity_setup(model, monkeypatch)
    perturb_teacher(model)
    batch = scribble_batch()
    loss = model.training_step(batch, 0)
    with torch.no_grad():
        image = batch["labeled"]["image"]
        expected_kd = kl_by_hand(torch.softmax(model.ema_teacher(image).logits / 2, dim=1), model.student(image).logits, 2.0)
    torch.testing.assert_close(logs["train/L_kd"].detach(), expected_kd, rtol=1e-5, atol=1e-7)
    assert value(expected_kd) > VISIBLE
    ramp = math.exp(-5.0)
    assert value(logs["train/L_feature_kd"]) > VISIBLE
    ramped = ramp * (logs["train/L_kd"] + 0.5 * logs["train/L_feature_kd"])
    assert value(ramped) > 1e-4
    torch.testing.assert_close(loss.detach(), (logs["train/L_pce"] + ramped).detach(), rtol=1e-6, atol=1e-7)


def test_scribsd_plus_same_scale_target_and_contrast_map_come_from_the_same_images(monkeypatch) -> None:
    model = ScribSDPlus(network=TINY4, consistency_rampup_steps=0, noise_on="none", kd_target="same_scale",
                        confidence_threshold=0.0)
    logs = identity_setup(model, monkeypatch)
    seen = {}
    real = model.contrast_class_map
    monkeypatch.setattr(model, "contrast_class_map",
                        lambda scribble, teacher_logits: (seen.update(t=teacher_logits), real(scribble, teacher_logits))[1])
    batch = scribble_batch()
    model.training_step(batch, 0)
    assert value(logs["train/L_kd"]) < ZERO  # every scale's head against the same head of the teacher
    with torch.no_grad():
        z = student_scales(model, batch["labeled"]["image"], [1, 2, 4, 8])
    torch.testing.assert_close(seen["t"], z[0])  # the contrast's pseudo-classes: the same images
    assert value(kl_by_hand(torch.softmax(z[1].roll(1, 0) / 2, 1), z[1], 2.0)) > VISIBLE


def test_scribsd_feature_kd_pairs_each_image_with_itself(monkeypatch) -> None:
    model = ScribSD(network=TINY4, consistency_rampup_steps=0, noise_on="none")
    logs = identity_setup(model, monkeypatch)
    batch = scribble_batch()
    loss = model.training_step(batch, 0)
    assert value(logs["train/L_feature_kd"]) < ZERO and value(logs["train/L_kd"]) < ZERO
    image, scribble = batch["labeled"]["image"], batch["labeled"]["target"]
    with torch.no_grad():
        out = model.student(image)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(out.logits, scribble, ignore_index=4))
    f = F.normalize(out.decoder_features[-1], dim=1)
    assert value(F.mse_loss(f, f.roll(1, 0))) > VISIBLE


@pytest.mark.parametrize("cls, kwargs", [(ScribSDPlus, {"confidence_threshold": 0.0}), (ScribSD, {})])
def test_scribsd_teacher_gets_no_gradient(monkeypatch, cls, kwargs) -> None:
    model = cls(network=TINY4, consistency_rampup_steps=0, **kwargs)
    capture_logs(model, monkeypatch)
    model.ema_teacher.requires_grad_(True)
    assert_teacher_gets_no_gradient(model, model.training_step(scribble_batch(), 0))


# --------------------------------------------------------------------------- ACTION


def distillation_kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, anchors: torch.Tensor,
                            tau_s: float, tau_t: float) -> torch.Tensor:
    """``mean_i sum_k p_t log(p_t / p_s)`` with ``p = softmax(cos(x_i, a_k) / tau)``, rows ``(N, D)``."""
    a = F.normalize(anchors, dim=1)
    log_p_s = F.log_softmax(F.normalize(student, dim=1) @ a.T / tau_s, dim=1)
    log_p_t = F.log_softmax(F.normalize(teacher, dim=1) @ a.T / tau_t, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def fill_bank(bank, seed: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Random unit vectors, then ``rows`` (newest last); returns the bank's content."""
    bank.enqueue(torch.randn(bank.size, bank.dim, generator=torch.Generator().manual_seed(seed)))
    if rows is not None:
        bank.enqueue(rows)
    return bank.get().clone()


def strong_by_offset(x: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the student's strong view, so the two views stay told apart."""
    return x + 0.25


def test_action_stage1_student_strong_teacher_clean_same_image(monkeypatch) -> None:
    model = ActionGlobalDistillation(network=TINY4, global_embedding_dim=16, bank_size=8)
    logs = identity_setup(model, monkeypatch)
    monkeypatch.setattr(model, "strong_view", strong_by_offset)
    x = images(3, 0)
    # The teacher embeddings of these very images among the anchors (as after a step on them): with
    # tau_t = 0.01 each image's target then peaks on its own anchor, so a permutation shows.
    with torch.no_grad():
        own = model.ema_teacher.heads[HEAD_GLOBAL_PROJECTION](model.ema_teacher.unet.encoder(x)[-1])
    anchors = fill_bank(model.global_bank, 0, own)
    loss = model.training_step({"unlabeled": {"image": x}}, 0)
    heads = model.student.heads
    with torch.no_grad():
        s = heads[HEAD_GLOBAL_PREDICTOR](heads[HEAD_GLOBAL_PROJECTION](model.student.unet.encoder(x + 0.25)[-1]))
        t = model.ema_teacher.heads[HEAD_GLOBAL_PROJECTION](model.ema_teacher.unet.encoder(x)[-1])
    expected = distillation_kl_by_hand(s, t, anchors, 0.1, 0.01)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert logs["train/bank_filled"] == float(len(model.global_bank)) == 8.0
    torch.testing.assert_close(model.global_bank.get()[-3:], F.normalize(t, dim=1))  # the teacher's, enqueued after
    assert abs(value(distillation_kl_by_hand(s, t.roll(1, 0), anchors, 0.1, 0.01) - expected)) > VISIBLE


def test_action_stage2_local_distillation_pairs_pixels_of_the_same_image(monkeypatch) -> None:
    # Softer temperatures than the paper's 0.1 / 0.01: an untrained network's pixel embeddings differ
    # little, and at tau_t = 0.01 nearly every pixel's target is the same one-hot anchor.
    model = ActionLocalDistillation(network=TINY4, global_embedding_dim=16, bank_size=8, local_embedding_dim=8,
                                    local_num_pixels=None, student_temperature=0.05, teacher_temperature=0.02)
    logs = identity_setup(model, monkeypatch)
    monkeypatch.setattr(model, "strong_view", strong_by_offset)
    batch = dense_batch()
    noise = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(5))
    batch["unlabeled"]["image"] = torch.stack([4 * noise, -4 * noise.flip(-1), torch.full_like(noise, 2.0)])
    x_l, x_u = batch["labeled"]["image"], batch["unlabeled"]["image"]
    heads = model.student.heads
    with torch.no_grad():  # two teacher pixels of each image among the anchors, as in stage 1's test
        own = model.ema_teacher.heads[HEAD_LOCAL_PROJECTION](model.ema_teacher(x_u).decoder_features[-1])
    anchors = fill_bank(model.local_bank, 1, torch.cat([own[:, :, 8, 8], own[:, :, 24, 20]]))
    loss = model.training_step(batch, 0)
    with torch.no_grad():
        s = heads[HEAD_LOCAL_PREDICTOR](heads[HEAD_LOCAL_PROJECTION](model.student(x_u + 0.25).decoder_features[-1]))
        t = model.ema_teacher.heads[HEAD_LOCAL_PROJECTION](model.ema_teacher(x_u).decoder_features[-1])
        supervised = ce_dice_loss(model.student(x_l).logits, batch["labeled"]["target"])
    pixels = lambda m: m.permute(0, 2, 3, 1).reshape(-1, m.shape[1])  # noqa: E731
    local = distillation_kl_by_hand(pixels(s), pixels(t), anchors, 0.05, 0.02)
    torch.testing.assert_close(logs["train/L_local"].detach(), local, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.detach(), supervised + local, rtol=1e-5, atol=1e-7)
    shuffled = distillation_kl_by_hand(pixels(s), pixels(t.roll(1, 0)), anchors, 0.05, 0.02)
    assert abs(value(shuffled - local)) > 1e-3 * value(local)  # well above the tolerance of the checks above


@pytest.mark.parametrize("global_weight", [0.0, 1.0])
def test_action_stage2_global_term_enters_with_its_weight(monkeypatch, global_weight) -> None:
    """``L = L_sup + L_local + w_g L_global``; at ``w_g = 0`` the global term is neither computed nor logged."""
    model = ActionLocalDistillation(network=TINY4, global_embedding_dim=16, bank_size=8, local_embedding_dim=8,
                                    local_num_pixels=None, global_weight=global_weight)
    logs = identity_setup(model, monkeypatch)
    monkeypatch.setattr(model, "strong_view", strong_by_offset)
    fill_bank(model.global_bank, 2)  # an empty bank gives L_global = 0
    loss = model.training_step(dense_batch(), 0)
    local_part = logs["train/L_sup"] + logs["train/L_local"]
    if global_weight == 0:
        assert "train/L_global" not in logs
        torch.testing.assert_close(loss.detach(), local_part.detach())
    else:
        assert value(logs["train/L_global"]) > VISIBLE
        torch.testing.assert_close(loss.detach(), (local_part + logs["train/L_global"]).detach())


def test_action_stage3_pseudo_labels_come_from_the_teacher_on_the_same_clean_images(monkeypatch) -> None:
    model = ActionAnatomicalContrast(network=TINY4, anco_weight=0.0, unsup_weighting="threshold",
                                     unsup_confidence_threshold=0.0, representation_dim=8)
    logs = identity_setup(model, monkeypatch)
    monkeypatch.setattr(model, "strong_view", lambda image, label, confidence: (image + 0.25, label, confidence))
    batch = dense_batch()
    loss = model.training_step(batch, 0)
    x_l, x_u = batch["labeled"]["image"], batch["unlabeled"]["image"]
    with torch.no_grad():
        pseudo = model.ema_teacher(x_u).logits.argmax(dim=1)
        student_u = model.student(x_u + 0.25).logits
        supervised = ce_dice_loss(model.student(x_l).logits, batch["labeled"]["target"])
    unsup = F.cross_entropy(student_u, pseudo)
    torch.testing.assert_close(logs["train/L_unsup"].detach(), unsup, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.detach(), supervised + unsup, rtol=1e-5, atol=1e-7)
    assert abs(value(F.cross_entropy(student_u, pseudo.roll(1, 0)) - unsup)) > VISIBLE


def test_action_stage3_total_loss_and_confident_fraction(monkeypatch) -> None:
    """``L = L_sup + w_u L_unsup + w_a L_anco`` from the logged terms, and the logged confident
    fraction is the hand-counted ``confidence >= threshold`` with the threshold at the median
    teacher confidence (so ``>`` would drop the median pixel)."""
    model = ActionAnatomicalContrast(network=TINY4, unsup_weight=0.7, anco_weight=0.5, representation_dim=8)
    logs = identity_setup(model, monkeypatch)
    monkeypatch.setattr(model, "strong_view", lambda image, label, confidence: (image + 0.25, label, confidence))
    batch = dense_batch()
    with torch.no_grad():
        confidence = torch.softmax(model.ema_teacher(batch["unlabeled"]["image"]).logits, dim=1).max(dim=1).values
    model.unsup_confidence_threshold = float(confidence.median())
    loss = model.training_step(batch, 0)
    expected_fraction = (confidence >= model.unsup_confidence_threshold).float().mean()
    assert value(logs["train/confident_fraction"]) == pytest.approx(value(expected_fraction))
    assert value(logs["train/L_anco"]) > VISIBLE and value(logs["train/L_unsup"]) > VISIBLE
    expected = logs["train/L_sup"] + 0.7 * logs["train/L_unsup"] + 0.5 * logs["train/L_anco"]
    torch.testing.assert_close(loss.detach(), expected.detach())


def test_action_stage3_cutmix_mixes_pseudo_labels_like_the_images(monkeypatch) -> None:
    """Image ``b`` is the constant ``b + 1``, its pseudo-label ``b`` and confidence ``b / 10``: after
    the strong view, every pixel's label and confidence must name the image its value came from."""
    model = ActionAnatomicalContrast(network=TINY4, representation_dim=8)
    monkeypatch.setattr(model, "perturbation", lambda x: x)
    n = 4
    image = (torch.arange(n, dtype=torch.float32) + 1)[:, None, None, None].expand(n, 1, 16, 16).clone()
    label = torch.arange(n)[:, None, None].expand(n, 16, 16).clone()
    confidence = label.float() / 10
    mixed_somewhere = False
    for seed in range(5):
        torch.manual_seed(seed)
        view, mixed_label, mixed_confidence = model.strong_view(image, label, confidence)
        source = view[:, 0].round().long() - 1
        assert torch.equal(mixed_label, source)
        torch.testing.assert_close(mixed_confidence, source.float() / 10)
        mixed_somewhere |= bool((source != label).any())
    assert mixed_somewhere


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_action_teacher_gets_no_gradient(monkeypatch, stage) -> None:
    kwargs = dict(network=TINY4, global_embedding_dim=16, bank_size=8)
    model = {
        "stage1": lambda: ActionGlobalDistillation(**kwargs),
        "stage2": lambda: ActionLocalDistillation(**kwargs, local_embedding_dim=8, global_weight=1.0),
        "stage3": lambda: ActionAnatomicalContrast(network=TINY4, representation_dim=8, anco_num_queries=16,
                                                   anco_num_negatives=16, anco_confidence_threshold=0.0),
    }[stage]()
    capture_logs(model, monkeypatch)
    if stage != "stage3":
        fill_bank(model.global_bank, 2)
    model.ema_teacher.requires_grad_(True)
    model.train()
    batch = dense_batch() if stage != "stage1" else {"unlabeled": {"image": images(3, 0)}}
    assert_teacher_gets_no_gradient(model, model.training_step(batch, 0))


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


def perturb_teacher(model, seed: int = 0) -> None:
    """Moves the teacher off the student, so the consistency term is clearly nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.ema_teacher.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


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
