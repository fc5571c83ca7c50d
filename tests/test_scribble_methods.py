"""ScribSD+, ScribSD and the scribble baselines: their training steps, heads and invariants."""

from __future__ import annotations

import pytest
import torch

from kdseg.methods import DMPLS, USTM, NetworkConfig, PartialCEEntropyMinimization, ScribSD, ScribSDPlus
from kdseg.methods.scribsd_plus import deep_supervision_logits

TINY4 = NetworkConfig(encoder_depth=4, decoder_channels=[32, 16, 8, 8])


def scribble_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    scribble = torch.full((2, 32, 32), 4, dtype=torch.long)
    scribble[:, 4, 2:30] = 0
    scribble[:, 12:20, 16] = 1
    scribble[:, 22, 8:20] = 2
    scribble[1, 26, 4:12] = 3
    return {"labeled": {"image": torch.rand(2, 1, 32, 32, generator=g), "target": scribble}}


def grads_after_step(model, batch) -> tuple[list, list]:
    model.train()
    loss = model.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    teacher = [p.grad for p in getattr(model, "ema_teacher", torch.nn.Module()).parameters()]
    student = [p.grad for p in model.student.parameters()]
    return teacher, student


def test_scribsd_plus_teacher_gets_no_gradient_and_every_head_learns() -> None:
    torch.manual_seed(0)
    model = ScribSDPlus(network=TINY4, consistency_rampup_steps=0, confidence_threshold=0.0)
    teacher_grads, _ = grads_after_step(model, scribble_batch())
    assert all(g is None for g in teacher_grads)
    assert all(not p.requires_grad for p in model.ema_teacher.parameters())
    for name in ("ds_2", "ds_4", "ds_8", "projection"):
        head = model.student.heads[name]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters() if p.ndim > 1), name
    assert set(model.ema_teacher.heads) == set(model.student.heads)  # the teacher has every head


def test_deep_supervision_scales_have_the_right_sizes() -> None:
    model = ScribSDPlus(network=TINY4)
    out = model.student(torch.rand(1, 1, 32, 32))
    logits = deep_supervision_logits(model.student, out, [1, 2, 4, 8])
    assert [tuple(z.shape[-2:]) for z in logits] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert all(z.shape[1] == 4 for z in logits)


def test_contrast_class_map_prefers_scribbles_then_confident_teacher() -> None:
    model = ScribSDPlus(network=TINY4, confidence_threshold=0.8)
    scribble = torch.tensor([[[1, 4, 4]]])
    teacher_logits = torch.tensor([[[[0.0, 0.0, 0.0]], [[0.0, 9.0, 0.0]], [[0.0, 0.0, 0.5]], [[0.0, 0.0, 0.0]]]])
    # pixel 0: scribble 1; pixel 1: teacher class 1 with p ~ 1; pixel 2: teacher unsure -> ignore.
    assert model.contrast_class_map(scribble, teacher_logits).tolist() == [[[1, 1, 4]]]


@pytest.mark.parametrize("noise_on", ["teacher", "student", "none"])
def test_input_noise_goes_only_to_the_named_network(monkeypatch, noise_on) -> None:
    """The student is evaluated on clean slices, so by default only the teacher's view is noisy
    (as SSL4MIS's mean teacher); ``noise_on`` moves or removes the noise."""
    torch.manual_seed(0)
    model = ScribSDPlus(network=TINY4, consistency_rampup_steps=0, noise_on=noise_on, noise_std=0.1)
    batch = scribble_batch()
    seen = {}
    student_forward, teacher_forward = model.student.forward, model.teacher_forward
    monkeypatch.setattr(model.student, "forward", lambda x: (seen.__setitem__("student", x), student_forward(x))[1])
    monkeypatch.setattr(model, "teacher_forward", lambda x: (seen.__setitem__("teacher", x), teacher_forward(x))[1])
    monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
    model.training_step(batch, 0)
    clean = batch["labeled"]["image"]
    for side in ("student", "teacher"):
        difference = (seen[side] - clean).abs().max().item()
        if side == noise_on:
            assert 0 < difference <= 0.2 + 1e-6, side  # clipped at 2 std
        else:
            assert difference == 0, side
    with pytest.raises(ValueError, match="noise_on"):
        ScribSDPlus(network=TINY4, noise_on="both")


def test_sharpened_teacher_target_is_used(monkeypatch) -> None:
    import kdseg.methods.scribsd_plus as module

    calls = {}
    real = module.multiscale_kd_loss
    monkeypatch.setattr(module, "multiscale_kd_loss",
                        lambda s, t, w, T, Tt=None: (calls.update(T=T, Tt=Tt), real(s, t, w, T, Tt))[1])
    model = ScribSDPlus(network=TINY4, consistency_rampup_steps=0, kd_temperature=1.0, kd_teacher_temperature=0.5)
    monkeypatch.setattr(model, "log_dict", lambda *a, **k: None)
    model.training_step(scribble_batch(), 0)
    assert calls == {"T": 1.0, "Tt": 0.5}
    assert ScribSDPlus(network=TINY4, kd_temperature=2.0).kd_teacher_temperature == 2.0  # None -> T


def test_ablation_switches_remove_their_terms(monkeypatch) -> None:
    logged = {}
    for name, kwargs in {"no_kd": dict(kd_weight=0.0), "no_contrast": dict(contrast_weight=0.0)}.items():
        model = ScribSDPlus(network=TINY4, consistency_rampup_steps=0, **kwargs)
        monkeypatch.setattr(model, "log_dict", lambda d, **k: logged.__setitem__(name, set(d)))
        model.training_step(scribble_batch(), 0)
    assert "train/L_kd" not in logged["no_kd"] and "train/L_contrast" in logged["no_kd"]
    assert "train/L_contrast" not in logged["no_contrast"] and "train/L_kd" in logged["no_contrast"]


def test_scribsd_is_the_workshop_configuration() -> None:
    model = ScribSD(network=TINY4)
    assert (model.kd_weight, model.feature_kd_weight, model.kd_temperature) == (1.0, 1.0, 2.0)
    assert len(model.student.heads) == 0  # no deep-supervision or projection heads: those are ScribSD+'s
    teacher_grads, _ = grads_after_step(model, scribble_batch())
    assert all(g is None for g in teacher_grads)


@pytest.mark.parametrize("scales", [[2, 4], [1, 3], [1, 2, 4, 8, 16]])
def test_bad_kd_scales_are_rejected(scales) -> None:
    with pytest.raises(ValueError, match="kd_scales"):
        ScribSDPlus(network=TINY4, kd_scales=scales)


def test_dmpls_has_two_branches_with_own_weights() -> None:
    torch.manual_seed(0)
    model = DMPLS(network=TINY4)
    aux = model.student.heads["aux_decoder"]
    main_w = next(model.student.unet.decoder.parameters())
    aux_w = next(aux.decoder.parameters())
    assert main_w.shape == aux_w.shape and not torch.equal(main_w, aux_w)
    _, student_grads = grads_after_step(model, scribble_batch())
    assert all(p.grad is not None for p in aux.parameters() if p.ndim > 1)


def test_ustm_and_pce_em_train_steps() -> None:
    torch.manual_seed(0)
    ustm = USTM(network=TINY4, mc_passes=2, consistency_rampup_steps=0)
    teacher_grads, _ = grads_after_step(ustm, scribble_batch())
    assert all(g is None for g in teacher_grads)
    em = PartialCEEntropyMinimization(network=TINY4)
    grads_after_step(em, scribble_batch())
