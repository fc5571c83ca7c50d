"""Hand-computed checks of the scribble-supervision losses (KD, contrast, entropy, DMPLS, Dice)."""

from __future__ import annotations

import math

import pytest
import torch

from kdseg.losses.contrastive import (
    class_prototypes,
    prototype_infonce_loss,
    sample_pixels_per_class,
)
from kdseg.losses.dice import soft_dice_loss
from kdseg.losses.distillation import feature_kd_loss, kd_kl_divergence, multiscale_kd_loss
from kdseg.losses.entropy import entropy_minimization
from kdseg.losses.pseudo_label import dmpls_loss, dynamically_mixed_pseudo_label

LOG3 = math.log(3.0)


def _logits(*pixels: tuple[float, ...]) -> torch.Tensor:
    """(1, C, 1, W) logits from per-pixel class-logit tuples."""
    return torch.tensor(pixels, dtype=torch.float64).t().reshape(1, len(pixels[0]), 1, len(pixels))


# --------------------------------------------------------------------------- distillation


def test_kd_kl_hand_value_t1():
    # teacher (0, 0) -> q = (1/2, 1/2); student (log 3, 0) -> p = (3/4, 1/4)
    # KL(q||p) = 1/2 log((1/2)/(3/4)) + 1/2 log((1/2)/(1/4)) = 1/2 (log 2/3 + log 2) = 1/2 log 4/3
    student, teacher = _logits((LOG3, 0.0)), _logits((0.0, 0.0))
    expected = 0.5 * math.log(4.0 / 3.0)  # 0.143841
    assert kd_kl_divergence(student, teacher).item() == pytest.approx(expected, abs=1e-12)


def test_kd_kl_hand_value_t2_and_t_squared_scaling():
    # T = 2: teacher/T = (0, 0) -> q = (1/2, 1/2); student/T = (log sqrt3, 0)
    #   -> p = (sqrt3, 1) / (1 + sqrt3)
    # KL = 1/2 log(q0/p0) + 1/2 log(q1/p1) = 1/2 log(1/4 * (1 + sqrt3)^2 / sqrt3) = 0.0372852
    # loss = T^2 * KL = 4 * 0.0372852 = 0.149141
    student, teacher = _logits((LOG3, 0.0)), _logits((0.0, 0.0))
    r3 = math.sqrt(3.0)
    expected = 4.0 * 0.5 * math.log(0.25 * (1.0 + r3) ** 2 / r3)
    assert kd_kl_divergence(student, teacher, temperature=2.0).item() == pytest.approx(
        expected, abs=1e-12
    )
    # In general loss(s, t, T) = T^2 * loss(s/T, t/T, 1).
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    assert kd_kl_divergence(s, t, temperature=3.0).item() == pytest.approx(
        9.0 * kd_kl_divergence(s / 3.0, t / 3.0).item(), rel=1e-12
    )


def test_kd_kl_sharpened_teacher_hand_value():
    # T = 1 (student), T_t = 1/2 (teacher): teacher (log 3, 0) / (1/2) = (log 9, 0) -> q = (9/10, 1/10);
    # student (0, 0) -> p = (1/2, 1/2). KL = 0.9 log(0.9 / 0.5) + 0.1 log(0.1 / 0.5) = 0.368064
    student, teacher = _logits((0.0, 0.0)), _logits((LOG3, 0.0))
    expected = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    got = kd_kl_divergence(student, teacher, temperature=1.0, teacher_temperature=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # Equal to Hinton KD of a teacher whose logits were doubled; None means T_t = T.
    assert got.item() == pytest.approx(kd_kl_divergence(student, 2 * teacher).item(), abs=1e-12)
    assert kd_kl_divergence(student, teacher, 2.0, teacher_temperature=None).item() == pytest.approx(
        kd_kl_divergence(student, teacher, 2.0).item(), abs=1e-12)
    # A student that already matches the sharpened target has zero loss.
    assert kd_kl_divergence(2 * teacher, teacher, 1.0, teacher_temperature=0.5).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="teacher_temperature"):
        kd_kl_divergence(student, teacher, teacher_temperature=0.0)


def test_kd_kl_zero_when_equal():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 3, generator=g)
    assert kd_kl_divergence(x, x.clone(), temperature=2.5).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_kl_mask():
    # pixel 0 differs (KL = 1/2 log 4/3), pixel 1 identical (KL = 0)
    student = _logits((LOG3, 0.0), (1.0, 2.0))
    teacher = _logits((0.0, 0.0), (1.0, 2.0))
    k = 0.5 * math.log(4.0 / 3.0)
    only_first = torch.tensor([[[True, False]]])
    assert kd_kl_divergence(student, teacher, mask=only_first).item() == pytest.approx(k)
    assert kd_kl_divergence(student, teacher).item() == pytest.approx(k / 2)  # mean of (k, 0)
    everything = torch.ones(1, 1, 2, dtype=torch.bool)
    assert kd_kl_divergence(student, teacher, mask=everything).item() == pytest.approx(k / 2)
    # empty mask -> exact 0, still differentiable (zero gradient)
    student.requires_grad_(True)
    empty = kd_kl_divergence(student, teacher, mask=torch.zeros(1, 1, 2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    empty.backward()
    assert torch.count_nonzero(student.grad) == 0
    with pytest.raises(TypeError):
        kd_kl_divergence(student, teacher, mask=torch.ones(1, 1, 2))
    with pytest.raises(ValueError):
        kd_kl_divergence(student, teacher, mask=torch.ones(1, 2, 1, dtype=torch.bool))


def test_kd_gradient_to_student_only():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(1, 3, 2, 2, generator=g, requires_grad=True)
    t = torch.randn(1, 3, 2, 2, generator=g, requires_grad=True)
    kd_kl_divergence(s, t, temperature=2.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    # same for the multi-scale and feature variants
    s2 = [torch.randn(1, 3, 2, 2, generator=g, requires_grad=True) for _ in range(2)]
    t2 = [torch.randn(1, 3, 2, 2, generator=g, requires_grad=True) for _ in range(2)]
    (multiscale_kd_loss(s2, t2, [1.0, 1.0], 2.0) + feature_kd_loss(s2, t2, [1.0, 1.0])).backward()
    assert all(t.grad is None for t in t2)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in s2)


def test_multiscale_kd_weights_three_resolutions():
    k = 0.5 * math.log(4.0 / 3.0)  # per-pixel KL of student (log3, 0) vs teacher (0, 0)

    def level(size: int, differ: bool) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.zeros(1, 2, size, size, dtype=torch.float64)
        t = torch.zeros(1, 2, size, size, dtype=torch.float64)
        if differ:
            s[:, 0] = LOG3  # every pixel has KL k
        return s, t

    # scale 0 (1x1): KL k; scale 1 (2x2): 0; scale 2 (4x4): half of the pixels k -> mean k/2
    s0, t0 = level(1, True)
    s1, t1 = level(2, False)
    s2, t2 = level(4, False)
    s2[:, 0, :2, :] = LOG3
    weights = [1.0, 2.0, 3.0]
    # (1 * k + 2 * 0 + 3 * k/2) / (1 + 2 + 3) = 2.5 k / 6
    expected = 2.5 * k / 6.0
    got = multiscale_kd_loss([s0, s1, s2], [t0, t1, t2], weights, temperature=1.0)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # temperature applied per scale: with T=2 every term is the T=2 value
    per_scale = [kd_kl_divergence(s, t, 2.0) for s, t in ((s0, t0), (s1, t1), (s2, t2))]
    expected_t2 = sum(w * x for w, x in zip(weights, per_scale)) / 6.0
    got_t2 = multiscale_kd_loss([s0, s1, s2], [t0, t1, t2], weights, 2.0)
    assert got_t2.item() == pytest.approx(expected_t2.item(), rel=1e-12)


def test_multiscale_kd_validation():
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match="scales"):
        multiscale_kd_loss([a, b], [a], [1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="weights"):
        multiscale_kd_loss([a, b], [a, b], [1.0], 1.0)
    with pytest.raises(ValueError, match="scale 1"):
        multiscale_kd_loss([a, b], [a, a], [1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="positive sum"):
        multiscale_kd_loss([a], [a], [0.0], 1.0)
    with pytest.raises(ValueError, match="empty"):
        multiscale_kd_loss([], [], [], 1.0)
    with pytest.raises(ValueError, match="temperature"):
        multiscale_kd_loss([a], [a], [1.0], 0.0)
    with pytest.raises(ValueError, match="level 0"):
        feature_kd_loss([torch.zeros(1, 3, 2, 2)], [torch.zeros(1, 4, 2, 2)], [1.0])


def test_feature_kd_hand_value():
    # level 0: student (3, 4) -> (0.6, 0.8), teacher (2, 0) -> (1, 0)
    #   MSE over D=2 elements = ((0.6 - 1)^2 + 0.8^2) / 2 = (0.16 + 0.64) / 2 = 0.4
    # level 1 (2x2, D=2): student == teacher up to scale -> 0
    s0 = torch.tensor([3.0, 4.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    t0 = torch.tensor([2.0, 0.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    t1 = torch.rand(1, 2, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    s1 = 5.0 * t1
    assert feature_kd_loss([s0], [t0], [1.0]).item() == pytest.approx(0.4, abs=1e-12)
    # weighted mean: (1 * 0.4 + 3 * 0) / 4 = 0.1
    assert feature_kd_loss([s0, s1], [t0, t1], [1.0, 3.0]).item() == pytest.approx(0.1, abs=1e-12)


# --------------------------------------------------------------------------- contrastive


def _toy_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    # 5 pixels in a (1, D=2, 1, 5) map (not unit length: normalisation happens inside)
    #   class 0: (3, 0), (0, 2)   -> unit (1, 0), (0, 1)   -> prototype (1, 1)/sqrt2
    #   class 1: (-1, 0), (-4, 0) -> unit (-1, 0), (-1, 0) -> prototype (-1, 0)
    #   ignored: (7, 7)
    feats = torch.tensor(
        [[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [-4.0, 0.0], [7.0, 7.0]], dtype=torch.float64
    )
    features = feats.t().reshape(1, 2, 1, 5)
    class_map = torch.tensor([[[0, 0, 1, 1, 255]]])
    return features, class_map


def test_class_prototypes_hand_value():
    features, class_map = _toy_embeddings()
    protos, present = class_prototypes(features, class_map, num_classes=3, ignore_index=255)
    r = 1.0 / math.sqrt(2.0)
    expected = torch.tensor([[r, r], [-1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(protos, expected)
    assert present.tolist() == [True, True, False]


def test_prototype_infonce_hand_value():
    # prototypes p0 = (1, 1)/sqrt2, p1 = (-1, 0); tau = 0.5; per-anchor loss with 2 present
    # classes: -log(e^{a/tau} / (e^{a/tau} + e^{b/tau})) = log(1 + e^{(b - a)/tau}),
    # a = z.p_own, b = z.p_other (the absent class 2 is not in the denominator):
    #   (1, 0), class 0:  a = 1/sqrt2, b = -1      -> log(1 + e^{-3.41421}) = 0.032371
    #   (0, 1), class 0:  a = 1/sqrt2, b = 0       -> log(1 + e^{-1.41421}) = 0.217623
    #   (-1, 0), class 1: a = 1,       b = -1/sqrt2 -> log(1 + e^{-3.41421}) = 0.032371  (x2)
    # mean = (3 * 0.032371 + 0.217623) / 4 = 0.078684
    features, class_map = _toy_embeddings()
    r = 1.0 / math.sqrt(2.0)

    def sp(x: float) -> float:
        return math.log1p(math.exp(x))

    tau = 0.5
    expected = (3 * sp((-1.0 - r) / tau) + sp((0.0 - r) / tau)) / 4.0
    loss = prototype_infonce_loss(
        features, class_map, 3, 255, temperature=tau, max_pixels_per_class=None
    )
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    assert expected == pytest.approx(0.078684, abs=1e-6)
    # detaching the prototypes changes gradients, not the value
    f1 = features.clone().requires_grad_(True)
    f2 = features.clone().requires_grad_(True)
    prototype_infonce_loss(f1, class_map, 3, 255, tau, None).backward()
    detached = prototype_infonce_loss(f2, class_map, 3, 255, tau, None, detach_prototypes=True)
    detached.backward()
    assert detached.item() == pytest.approx(expected, abs=1e-10)
    assert not torch.allclose(f1.grad, f2.grad)
    assert torch.count_nonzero(f1.grad[..., 4]) == 0  # ignored pixel gets no gradient


def test_infonce_fewer_than_two_classes_is_zero():
    features = torch.randn(1, 4, 2, 2, requires_grad=True)
    one_class = torch.tensor([[[1, 1], [255, 1]]])
    loss = prototype_infonce_loss(features, one_class, 3, 255)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(features.grad) == 0
    nothing = torch.full((1, 2, 2), 255)
    assert prototype_infonce_loss(features, nothing, 3, 255).item() == 0.0


def test_sampling_bound_respected():
    labels = torch.tensor([0] * 10 + [1] * 3 + [9] * 5 + [2] * 6)
    g = torch.Generator().manual_seed(0)
    idx = sample_pixels_per_class(labels, 3, 4, generator=g)
    counts = torch.bincount(labels[idx], minlength=10)
    assert counts[:3].tolist() == [4, 3, 4] and counts[3:].sum() == 0
    assert idx.unique().numel() == idx.numel()  # without replacement
    full = sample_pixels_per_class(labels, 3, None)
    assert sorted(full.tolist()) == [i for i, v in enumerate(labels.tolist()) if v != 9]
    # reproducible with a seeded generator, and the loss uses the capped anchors
    features = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    class_map = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(2))
    a, b = (
        prototype_infonce_loss(
            features, class_map, 3, 255, max_pixels_per_class=2,
            generator=torch.Generator().manual_seed(5),
        )
        for _ in range(2)
    )
    assert a.item() == b.item()
    with pytest.raises(ValueError):
        sample_pixels_per_class(labels, 3, 0)


def test_contrastive_validation():
    with pytest.raises(ValueError, match="class_map"):
        class_prototypes(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 3, dtype=torch.long), 2, 255)
    with pytest.raises(ValueError, match="values"):
        class_prototypes(torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 5]]]), 2, 255)


# --------------------------------------------------------------------------- entropy


def test_entropy_uniform_and_one_hot():
    uniform = torch.zeros(2, 4, 3, 3)
    assert entropy_minimization(uniform).item() == pytest.approx(math.log(4.0), abs=1e-6)
    confident = torch.zeros(1, 3, 2, 2)
    confident[:, 1] = 100.0
    assert entropy_minimization(confident).item() == pytest.approx(0.0, abs=1e-6)
    # saturated logits stay finite (no 0 * log 0 = NaN)
    saturated = torch.tensor([1e4, -1e4]).reshape(1, 2, 1, 1)
    assert torch.isfinite(entropy_minimization(saturated))


def test_entropy_mask():
    # pixel 0 uniform over 2 classes (log 2), pixel 1 confident (~0)
    logits = _logits((0.0, 0.0), (50.0, 0.0))
    assert entropy_minimization(logits, torch.tensor([[[True, False]]])).item() == pytest.approx(
        math.log(2.0)
    )
    assert entropy_minimization(logits).item() == pytest.approx(math.log(2.0) / 2)


# --------------------------------------------------------------------------- DMPLS / dice


def test_mixed_pseudo_label():
    # pixel 0: softmax a = (3/4, 1/4), softmax b ~ (0, 1)
    # pixel 1: softmax a = (1/4, 3/4), softmax b = (1/2, 1/2)
    a = _logits((LOG3, 0.0), (0.0, LOG3)).requires_grad_(True)
    b = _logits((-50.0, 0.0), (0.0, 0.0))
    assert dynamically_mixed_pseudo_label(a, b, 1.0).tolist() == a.argmax(1).tolist()
    assert dynamically_mixed_pseudo_label(a, b, 0.0).tolist() == [[[1, 0]]]  # argmax(b), tie->0
    # beta = 0.8, pixel 0: class 0 = 0.8 * 0.75 = 0.6, class 1 = 0.8 * 0.25 + 0.2 * 1 = 0.4 -> 0
    # beta = 0.5, pixel 0: class 0 = 0.375, class 1 = 0.625 -> 1; pixel 1 -> 1 for both
    assert dynamically_mixed_pseudo_label(a, b, 0.8).tolist() == [[[0, 1]]]
    pl = dynamically_mixed_pseudo_label(a, b, 0.5)
    assert pl.tolist() == [[[1, 1]]]
    assert pl.dtype == torch.long and not pl.requires_grad
    with pytest.raises(ValueError):
        dynamically_mixed_pseudo_label(a, b, 1.5)


def test_soft_dice_hand_value_and_ignore():
    # pixel 0: p = (0.8, 0.2), g = 0; pixel 1: p = (0.4, 0.6), g = 1
    # class 0: 2 * 0.8 / (1.2 + 1) = 0.727273 ; class 1: 2 * 0.6 / (0.8 + 1) = 0.666667
    # loss = mean(1 - 0.727273, 1 - 0.666667) = mean(0.272727, 0.333333) = 0.303030
    probs = torch.tensor([[0.8, 0.4], [0.2, 0.6]], dtype=torch.float64).reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 1]]])
    s = 1e-5
    expected = 0.5 * ((1 - (1.6 + s) / (2.2 + s)) + (1 - (1.2 + s) / (1.8 + s)))
    assert soft_dice_loss(probs, target).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.303030, abs=1e-5)
    # squared_pred (WSL4MIS DiceLoss): class 0 denominator 0.64 + 0.16 + 1 = 1.8,
    # class 1: 0.04 + 0.36 + 1 = 1.4 -> mean(1 - 1.6/1.8, 1 - 1.2/1.4) = 0.126984
    expected_sq = 0.5 * ((1 - (1.6 + s) / (1.8 + s)) + (1 - (1.2 + s) / (1.4 + s)))
    assert soft_dice_loss(probs, target, squared_pred=True).item() == pytest.approx(expected_sq)
    # an extra ignored pixel (any probabilities) changes nothing
    probs3 = torch.tensor([[0.8, 0.4, 0.1], [0.2, 0.6, 0.9]], dtype=torch.float64)
    probs3 = probs3.reshape(1, 2, 1, 3)
    target3 = torch.tensor([[[0, 1, 4]]])
    got = soft_dice_loss(probs3, target3, ignore_index=4)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        soft_dice_loss(probs3, target3)  # 4 is not a class without ignore_index
    # perfect one-hot prediction -> 0
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    assert soft_dice_loss(onehot, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dmpls_loss():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    loss = dmpls_loss(a, b, generator=torch.Generator().manual_seed(7))
    beta = float(torch.rand((), generator=torch.Generator().manual_seed(7)))
    pl = dynamically_mixed_pseudo_label(a, b, beta)
    expected = 0.5 * (
        soft_dice_loss(torch.softmax(a, 1), pl, squared_pred=True)
        + soft_dice_loss(torch.softmax(b, 1), pl, squared_pred=True)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # beta = 1: the pseudo label is argmax(a)
    fixed = dmpls_loss(a, b, beta=1.0, squared_pred=False)
    pl_a = a.argmax(1)
    manual = 0.5 * (
        soft_dice_loss(torch.softmax(a, 1), pl_a) + soft_dice_loss(torch.softmax(b, 1), pl_a)
    )
    assert fixed.item() == pytest.approx(manual.item(), rel=1e-6)


def test_error_messages_name_the_loss_and_the_bad_values() -> None:
    """The errors name the loss and the offending shapes / values."""
    x = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"^feature_kd_loss: got 1 student levels but 2 teacher levels$"):
        feature_kd_loss([x], [x, x], [1.0])
    a, b = torch.zeros(1, 2, 1, 2), torch.zeros(1, 3, 1, 2)
    with pytest.raises(ValueError, match=r"^beta must be in \[0, 1\], got 1.5$"):
        dynamically_mixed_pseudo_label(a, a, 1.5)
    with pytest.raises(ValueError, match=r"same shape, got \(1, 2, 1, 2\) and \(1, 3, 1, 2\)$"):
        dynamically_mixed_pseudo_label(a, b, 0.5)


def test_kd_kl_divergence_on_1d_spatial_logits_and_its_argument_checks() -> None:
    """``(B, C, L)`` logits: the softmax is over the class axis (dim 1) for any number of spatial
    axes (or none); ``T = 0``, 1-D logits and mismatched shapes are rejected with messages that say why."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    q = torch.softmax(t / 3.0, dim=1)
    expected = 4.0 * (q * (q.log() - torch.log_softmax(s / 2.0, dim=1))).sum(dim=1).mean()
    torch.testing.assert_close(kd_kl_divergence(s, t, 2.0, teacher_temperature=3.0), expected)
    with pytest.raises(ValueError, match=r"^temperature must be > 0, got 0.0"):
        kd_kl_divergence(s, t, 0.0, teacher_temperature=1.0)
    flat = kd_kl_divergence(s[:, :, 0], t[:, :, 0], 2.0, teacher_temperature=3.0)  # (B, C): no spatial axis
    torch.testing.assert_close(flat, 4.0 * (q * (q.log() - torch.log_softmax(s / 2.0, dim=1))).sum(dim=1)[:, 0].mean())
    with pytest.raises(ValueError, match=r"logits must be \(B, C, \*spatial\), got \(3,\)"):
        kd_kl_divergence(s[0, :, 0], t[0, :, 0])
    with pytest.raises(ValueError, match=r"student and teacher logits must have the same shape, got \(2, 3, 5\) and \(2, 3, 4\)"):
        kd_kl_divergence(s, t[..., :4])
