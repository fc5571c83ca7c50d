"""Wiring of ScribSD+ and ScribSD: which output is compared with which (the device is described in
``identity_teacher``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from identity_teacher import (  # noqa: F401  (seeded: autouse fixture)
    TINY4, VISIBLE, ZERO, assert_teacher_gets_no_gradient, capture_logs, identity_setup, images, perturb_teacher,
    scribble_batch, seeded, value,
)
from kdseg.losses.contrastive import prototype_infonce_loss
from kdseg.methods import ScribSD, ScribSDPlus


def kl_by_hand(target_probs: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * mean_pixels sum_c q (log q - log softmax(z / T))``."""
    log_q = target_probs.clamp_min(1e-30).log()
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * (target_probs * (log_q - log_p)).sum(dim=1).mean()



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
