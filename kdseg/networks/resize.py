"""Bilinear upsampling as two small matrix products, for the CPU.

``F.interpolate(x, size, mode="bilinear", align_corners=False)`` is linear and separable:
``y = A_h x A_w^T`` with ``A`` the ``(out, in)`` interpolation matrix of each axis (two non-zero
weights per row, PyTorch's source index ``(o + 0.5) * in / out - 0.5`` clamped at 0). On one CPU
thread its backward is a scatter loop; here forward and backward are batched matrix products
(measured in ``experiments/results/bench/README.md``, 2026-12-06).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["bilinear_upsample", "interpolation_matrix"]


@functools.lru_cache(maxsize=64)
def _matrix(in_size: int, out_size: int) -> Tensor:
    scale = in_size / out_size
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    frac = source - low
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    return matrix


def interpolation_matrix(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(out_size, in_size)`` weights of 1-D linear interpolation, ``align_corners=False``."""
    return _matrix(in_size, out_size).to(dtype=dtype, device=device)


def bilinear_upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for ``size`` at least the
    input's, as ``A_h @ x @ A_w^T``. Shapes: ``(B, C, h, w) -> (B, C, *size)``."""
    (h, w), (out_h, out_w) = x.shape[-2:], size
    if out_h < h or out_w < w:
        raise ValueError(f"bilinear_upsample enlarges only: {tuple(x.shape[-2:])} -> {tuple(size)}")
    rows = interpolation_matrix(h, out_h, x.dtype, x.device)
    cols = interpolation_matrix(w, out_w, x.dtype, x.device)
    return torch.matmul(torch.matmul(rows, x), cols.t())
