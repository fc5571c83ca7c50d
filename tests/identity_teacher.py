"""The identity teacher: helpers shared by the ``test_wiring_*`` files (which output is compared
with which, in every teacher-student method).

The loss tests check each loss on hand-computed values; the wiring tests check that the training
steps feed them the right tensors. The common device is an *identity teacher*: at construction the EMA
teacher is an exact copy of the student, so with the input noise off and the model in eval mode
(BatchNorm on running statistics, so an image's output does not depend on its batch) the teacher
and the student give the same output for the same image. A consistency term must then be exactly 0,
and a KD term must equal the value a test computes by hand from the student's own outputs. Pairing
the outputs of different images (a batch permutation on one side), losing a temperature factor or
inverting a transform with the wrong sign moves the value away from it; each test also checks that
such a mistake would be visible (the mismatched value is clearly nonzero), so none passes vacuously.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdseg.methods import NetworkConfig
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


def perturb_teacher(model, seed: int = 0) -> None:
    """Moves the teacher off the student, so the consistency term is clearly nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.ema_teacher.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
