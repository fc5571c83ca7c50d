"""RowSparseGradConv1x1: the gradients of nn.Conv2d(kernel_size=1), on sparse and dense output
gradients, and the same state-dict keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kdseg.networks.pointwise import RowSparseGradConv1x1


@pytest.mark.parametrize("active_pixels", [0, 3, 40])  # none, sparse path, dense fallback (40 of 2*5*6)
def test_gradients_equal_dense_conv(active_pixels: int) -> None:
    torch.manual_seed(0)
    sparse = RowSparseGradConv1x1(4, 3)
    dense = nn.Conv2d(4, 3, 1)
    dense.load_state_dict(sparse.state_dict())
    assert list(sparse.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    sparse.double(), dense.double()
    mask = torch.zeros(2 * 5 * 6, dtype=torch.bool)
    mask[torch.randperm(60)[:active_pixels]] = True
    upstream = torch.randn(2, 3, 5, 6, dtype=torch.float64) * mask.view(2, 1, 5, 6)
    grads = []
    for module in (sparse, dense):
        xi = x.clone().requires_grad_()
        module.zero_grad()
        out = module(xi)
        (out * upstream).sum().backward()
        grads.append((out.detach(), xi.grad, module.weight.grad, module.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # Hand value: a single active pixel gives dW = g x^T, db = g.
    if active_pixels == 3:
        rows = mask.nonzero().flatten()
        g = upstream.permute(0, 2, 3, 1).reshape(-1, 3)[rows]
        xr = x.permute(0, 2, 3, 1).reshape(-1, 4)[rows]
        torch.testing.assert_close(grads[0][2].view(3, 4), g.T @ xr)
        torch.testing.assert_close(grads[0][3], g.sum(0))


def test_no_grad_and_autocast_paths() -> None:
    conv = RowSparseGradConv1x1(4, 3)
    x = torch.randn(1, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), nn.functional.conv2d(x, conv.weight, conv.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x.requires_grad_())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32
