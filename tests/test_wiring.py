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

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kdseg.losses.segmentation import ce_dice_loss, softmax_mse
from kdseg.methods import USTM, MeanTeacher, NetworkConfig, ScribSD, ScribSDPlus
from kdseg.methods.action import (
    HEAD_GLOBAL_PREDICTOR,
    HEAD_GLOBAL_PROJECTION,
    HEAD_LOCAL_PREDICTOR,
    HEAD_LOCAL_PROJECTION,
    ActionAnatomicalContrast,
    ActionGlobalDistillation,
    ActionLocalDistillation,
)
from kdseg.methods.ua_mt import UncertaintyAwareMeanTeacher

TINY4 = NetworkConfig(encoder_depth=4, decoder_channels=[32, 16, 8, 8])
ZERO = 1e-10  # "exactly 0" up to float rounding of identical computations in different batches
VISIBLE = 1e-5  # a mismatched pairing gives at least this much


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
    assert value(logs["train/consistency"]) < ZERO
    torch.testing.assert_close(loss, ce_dice_loss(model.student(batch["labeled"]["image"]).logits,
                                                  batch["labeled"]["target"]) + 0.1 * logs["train/consistency"])
    with torch.no_grad():
        unlabeled = model.student(batch["unlabeled"]["image"]).logits
    assert value(softmax_mse(unlabeled, unlabeled.roll(1, 0))) > VISIBLE  # a permutation would show


def test_mean_teacher_teacher_gets_no_gradient(monkeypatch) -> None:
    model = MeanTeacher(network=TINY4, consistency_rampup_steps=0)
    capture_logs(model, monkeypatch)
    model.ema_teacher.requires_grad_(True)
    assert_teacher_gets_no_gradient(model, model.training_step(dense_batch(), 0))


def test_ua_mt_pairs_images_and_keeps_certain_pixels(monkeypatch) -> None:
    model = UncertaintyAwareMeanTeacher(network=TINY4, noise_std=0.0, consistency_rampup_steps=0,
                                        mc_samples=2, max_entropy=10.0)
    logs = identity_setup(model, monkeypatch)
    model.training_step(dense_batch(), 0)
    assert value(logs["train/certain_fraction"]) == 1.0  # every pixel is below 0.75 * 10 nats
    assert value(logs["train/consistency"]) < ZERO
    model.ema_teacher.requires_grad_(True)
    model.train()
    assert_teacher_gets_no_gradient(model, model.training_step(dense_batch(1), 0))


# --------------------------------------------------------------------------- USTM


@pytest.mark.parametrize("k", [1, 3])
def test_ustm_rotates_the_student_output_like_the_teacher_input(monkeypatch, k) -> None:
    """An oracle teacher that is exactly rotation-equivariant, ``T(x) = rot_k(S(rot_-k(x)))``:
    the student's output rotated by ``k`` must then match the teacher's output on the image
    rotated by ``k`` exactly (rotating by ``-k``, or not at all, does not for k = 1, 3)."""
    model = USTM(network=TINY4, mc_passes=2, noise_std=0.0, consistency_rampup_steps=0, max_entropy=10.0)
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
    assert value(logs["train/consistency"]) < ZERO
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
    model = ScribSDPlus(network=TINY4, rampup_steps=0, noise_on="none", contrast_weight=0.0,
                        kd_temperature=temperature, kd_teacher_temperature=teacher_temperature)
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
    torch.testing.assert_close(logs["train/kd"].detach(), expected, rtol=1e-5, atol=1e-7)
    pce = F.cross_entropy(z[0], scribble, ignore_index=4)
    torch.testing.assert_close(loss.detach(), pce + expected, rtol=1e-5, atol=1e-7)
    assert abs(value(kd(teacher_probs.roll(1, 0))) - value(expected)) > VISIBLE  # a permutation would show


def test_scribsd_plus_same_scale_target_and_contrast_map_come_from_the_same_images(monkeypatch) -> None:
    model = ScribSDPlus(network=TINY4, rampup_steps=0, noise_on="none", kd_target="same_scale",
                        confidence_threshold=0.0)
    logs = identity_setup(model, monkeypatch)
    seen = {}
    real = model.contrast_class_map
    monkeypatch.setattr(model, "contrast_class_map",
                        lambda scribble, teacher_logits: (seen.update(t=teacher_logits), real(scribble, teacher_logits))[1])
    batch = scribble_batch()
    model.training_step(batch, 0)
    assert value(logs["train/kd"]) < ZERO  # every scale's head against the same head of the teacher
    with torch.no_grad():
        z = student_scales(model, batch["labeled"]["image"], [1, 2, 4, 8])
    torch.testing.assert_close(seen["t"], z[0])  # the contrast's pseudo-classes: the same images
    assert value(kl_by_hand(torch.softmax(z[1].roll(1, 0) / 2, 1), z[1], 2.0)) > VISIBLE


def test_scribsd_feature_kd_pairs_each_image_with_itself(monkeypatch) -> None:
    model = ScribSD(network=TINY4, rampup_steps=0, noise_on="none")
    logs = identity_setup(model, monkeypatch)
    batch = scribble_batch()
    loss = model.training_step(batch, 0)
    assert value(logs["train/feature_kd"]) < ZERO and value(logs["train/kd"]) < ZERO
    image, scribble = batch["labeled"]["image"], batch["labeled"]["target"]
    with torch.no_grad():
        out = model.student(image)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(out.logits, scribble, ignore_index=4))
    f = F.normalize(out.decoder_features[-1], dim=1)
    assert value(F.mse_loss(f, f.roll(1, 0))) > VISIBLE


@pytest.mark.parametrize("cls", [ScribSDPlus, ScribSD])
def test_scribsd_teacher_gets_no_gradient(monkeypatch, cls) -> None:
    model = cls(network=TINY4, rampup_steps=0, confidence_threshold=0.0)
    capture_logs(model, monkeypatch)
    model.ema_teacher.requires_grad_(True)
    assert_teacher_gets_no_gradient(model, model.training_step(scribble_batch(), 0))
