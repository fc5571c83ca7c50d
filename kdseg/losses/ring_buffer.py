"""Ring-buffer writes of the FIFO memory banks (:class:`~kdseg.losses.contrastive_distillation.FeatureMemoryBank`,
:class:`~kdseg.losses.hard_negative_sampling.HardNegativeSampler`)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fifo_write"]


@torch.no_grad()
def fifo_write(buffer: Tensor, pointer: int, filled: int, x: Tensor) -> tuple[int, int]:
    """Write rows ``x`` into the ring ``buffer`` (``(size, D)``) at ``pointer``, oldest first out.

    Returns the new ``(pointer, filled)``. With more rows than ``size`` only the newest
    ``size`` survive. After the write, when the ring is full, slot ``pointer`` holds the oldest
    row, so ``torch.roll(buffer, -pointer, 0)`` is in chronological order.
    """
    size = buffer.shape[0]
    n = x.shape[0]
    if n == 0 or size == 0:
        return pointer, filled
    keep = x[-size:]
    start = (pointer + n - keep.shape[0]) % size
    slots = (start + torch.arange(keep.shape[0], device=buffer.device)) % size
    buffer[slots] = keep.to(device=buffer.device, dtype=buffer.dtype)
    return (pointer + n) % size, min(filled + n, size)
