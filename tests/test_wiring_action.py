"""Wiring of ACTION's three stages: which output is compared with which (the device is described in
``identity_teacher``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from identity_teacher import (  # noqa: F401  (seeded: autouse fixture)
    TINY4, VISIBLE, assert_teacher_gets_no_gradient, capture_logs, dense_batch, identity_setup, images, seeded, value,
)
from kdseg.losses.segmentation import ce_dice_loss
from kdseg.methods.action import (
    HEAD_GLOBAL_PREDICTOR,
    HEAD_GLOBAL_PROJECTION,
    HEAD_LOCAL_PREDICTOR,
    HEAD_LOCAL_PROJECTION,
    ActionAnatomicalContrast,
    ActionGlobalDistillation,
    ActionLocalDistillation,
)


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
