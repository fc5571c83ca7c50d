"""Baseline losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kdseg.losses.segmentation import ce_dice_loss, partial_cross_entropy, softmax_mse
from kdseg.schedules import sigmoid_rampup


def test_partial_ce_ignores_unannotated_pixels() -> None:
    # 1x2x1x3 logits; pixel 0 labelled 0, pixel 1 unannotated (4), pixel 2 labelled 1.
    logits = torch.tensor([[[[2.0, 5.0, 0.0]], [[0.0, -5.0, 1.0]]]])
    scribble = torch.tensor([[[0, 4, 1]]])
    expected = 0.5 * (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e)))
    assert partial_cross_entropy(logits, scribble, ignore_index=4).item() == pytest.approx(expected, rel=1e-6)
    # Changing the logits of the unannotated pixel changes nothing.
    logits2 = logits.clone()
    logits2[..., 1] = torch.tensor([-9.0, 9.0]).view(1, 2, 1)
    assert partial_cross_entropy(logits2, scribble, 4).item() == pytest.approx(expected, rel=1e-6)


def test_partial_ce_refuses_empty_scribbles() -> None:
    with pytest.raises(ValueError, match="no annotated pixel"):
        partial_cross_entropy(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 4), ignore_index=4)


def test_softmax_mse_hand_value() -> None:
    student = torch.tensor([[[[0.0]], [[0.0]]]])  # p = (0.5, 0.5)
    teacher = torch.tensor([[[[math.log(3.0)]], [[0.0]]]])  # p = (0.75, 0.25)
    assert softmax_mse(student, teacher).item() == pytest.approx(0.25**2)


def test_ce_dice_perfect_prediction_is_near_zero() -> None:
    target = torch.tensor([[[0, 1], [1, 0]]])
    logits = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    assert ce_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-4)


def test_sigmoid_rampup_values() -> None:
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0
    assert sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
