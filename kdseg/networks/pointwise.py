"""A 1x1 convolution whose backward skips the pixels that receive no gradient.

Pixel-contrastive losses (ACTION's AnCo) read a full-resolution embedding map ``(B, D, H, W)`` but
back-propagate through a few hundred query pixels only: the prototypes and negatives are detached.
A dense 1x1 convolution backward then spends ``2 * B*H*W * D_in * D_out`` multiply-adds on zero
rows (about 17 G at 128 px, batch 8, 256 dimensions, several times the sampling and the loss).
:class:`RowSparseGradConv1x1` is an ``nn.Conv2d(kernel_size=1)`` (same parameters and state-dict
keys) whose backward computes the weight, bias and input gradients from the pixels whose output
gradient is non-zero, exactly the dense formulas restricted to those rows:

    dW = G_a^T X_a,   db = sum_a G_a,   dX_a = G_a W,   dX = 0 elsewhere

(``G``: output gradient rows ``(pixels, D_out)``, ``X``: input rows, ``a``: the active pixels).
When more than ``dense_fraction`` of the pixels are active it falls back to the dense backward.
The sums run in another order than cuDNN / oneDNN's, so gradients agree to float rounding, not
bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RowSparseGradConv1x1"]


class _RowSparseGradPointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, dense_fraction: float) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.dense_fraction = dense_fraction
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        b, d_out, h, w = grad.shape
        d_in = x.shape[1]
        w2 = weight.reshape(d_out, d_in)
        flat_grad = grad.flatten(2)  # (B, D_out, HW)
        active = flat_grad.ne(0).any(dim=1).flatten().nonzero().flatten()  # pixel indices b*HW + p
        if active.numel() > ctx.dense_fraction * b * h * w:
            g_rows = grad.permute(0, 2, 3, 1).reshape(-1, d_out)
            x_rows = x.permute(0, 2, 3, 1).reshape(-1, d_in)
            grad_x = (g_rows @ w2).reshape(b, h, w, d_in).permute(0, 3, 1, 2) if ctx.needs_input_grad[0] else None
        else:
            img, pix = active // (h * w), active % (h * w)
            g_rows = flat_grad[img, :, pix]  # (A, D_out)
            x_rows = x.flatten(2)[img, :, pix]  # (A, D_in)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = grad.new_zeros(b, d_in, h * w)
                grad_x[img, :, pix] = (g_rows @ w2).to(grad_x.dtype)
                grad_x = grad_x.view(b, d_in, h, w)
        grad_w = (g_rows.t() @ x_rows).reshape_as(weight) if ctx.needs_input_grad[1] else None
        grad_b = g_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class RowSparseGradConv1x1(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1, bias=bias)`` with a row-sparse backward.

    Shapes: input ``(B, D_in, H, W)``, output ``(B, D_out, H, W)``. The forward is the dense
    convolution; see the module docstring for the backward.

    Args:
        dense_fraction: above this fraction of pixels with a non-zero output gradient the dense
            backward is used (the row gather and scatter then cost more than they save).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, dense_fraction: float = 0.25) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)
        self.dense_fraction = dense_fraction

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            # Mirror conv2d's autocast cast (lower precision for both operands) inside the Function.
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                return _RowSparseGradPointwise.apply(x, weight, bias, self.dense_fraction)
        return _RowSparseGradPointwise.apply(x, weight, bias, self.dense_fraction)
