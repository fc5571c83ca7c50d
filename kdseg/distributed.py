"""Collectives across ``torch.distributed`` ranks, in one place.

Everything here is a no-op without a process group of more than one rank, so single-process
runs and tests take the same code path. Every rank must make the same calls in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rows", "distributed_ready", "gather_objects", "gather_unique"]

T = TypeVar("T")


def distributed_ready() -> bool:
    """True when a ``torch.distributed`` process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def all_gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x`` (``(n_r, ...)`` on rank ``r``) over all ranks, in rank order.

    Row counts may differ between ranks (rows are padded for the collective and trimmed
    afterwards). Without an initialised process group (or with one rank) ``x`` is returned.
    Not differentiable: use it for memory banks only.
    """
    if not distributed_ready():
        return x
    world = dist.get_world_size()
    x = x.detach().contiguous()
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    if longest == 0:
        return x.new_empty((0, *x.shape[1:]))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)], dim=0)


def gather_objects(items: Sequence[T]) -> list[T]:
    """The picklable ``items`` of every rank, concatenated in rank order (``items`` alone without DDP)."""
    if not distributed_ready():
        return list(items)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def gather_unique(items: Sequence[T], key: Callable[[T], Hashable]) -> list[T]:
    """:func:`gather_objects`, one item per ``key`` (the last seen), sorted by key.

    A ``DistributedSampler`` pads the last ranks with repeated samples so that every rank gets
    as many; deduplicating by sample id scores each sample once.
    """
    unique = {key(item): item for item in gather_objects(items)}
    return [unique[k] for k in sorted(unique)]
