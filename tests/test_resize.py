"""kdseg.networks.resize: the matrix form of bilinear upsampling against F.interpolate."""

import pytest
import torch
import torch.nn.functional as F

from kdseg.networks.resize import bilinear_upsample, interpolation_matrix


def test_interpolation_matrix_by_hand() -> None:
    # 2 -> 4, align_corners=False: source (o + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25.
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(interpolation_matrix(2, 4, torch.float64, torch.device("cpu")), expected)


@pytest.mark.parametrize("shape,size", [((2, 3, 4, 5), (16, 20)), ((1, 2, 7, 3), (7, 12)), ((2, 1, 16, 16), (128, 128)),
                                        ((1, 1, 5, 5), (5, 5))])
def test_bilinear_upsample_equals_interpolate_with_gradient(shape: tuple, size: tuple) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    y = torch.randn(*shape[:2], *size)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    (expected_grad,) = torch.autograd.grad((expected * y).sum(), x)
    out = bilinear_upsample(x, size)
    (grad,) = torch.autograd.grad((out * y).sum(), x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_bilinear_upsample_refuses_to_shrink() -> None:
    with pytest.raises(ValueError, match="enlarges only"):
        bilinear_upsample(torch.zeros(1, 1, 8, 8), (4, 8))
