"""Anatomical contrast (AnCo) loss of ACTION (You et al., IPMI 2023).

For every class sampled by :class:`kdseg.losses.hard_negative_sampling.HardNegativeSampler`,
each query ``q`` is pulled towards its class prototype ``p`` and pushed from its sampled
negatives ``n_j`` (InfoNCE):

    l(q) = -log( exp(q.p / tau) / (exp(q.p / tau) + sum_j exp(q.n_j / tau)) )

averaged over the queries of a class, then over the classes. ``q``, ``p`` and ``n_j`` are
L2-normalised first (cosine similarities, as in the released code).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["anatomical_contrast_loss"]


def anatomical_contrast_loss(
    samples: Iterable[Sequence],
    temperature: float = 0.5,
    reference: Tensor | None = None,
) -> Tensor:
    """InfoNCE of the sampled queries against their prototype and negatives.

    Args:
        samples: ``(class, queries (Q, D), prototype (D,), negatives (Q, M, D))`` per class,
            e.g. the :class:`~kdseg.losses.hard_negative_sampling.ContrastSample` list returned
            by ``HardNegativeSampler``; ``negatives`` may also be ``(M, D)``, shared by all
            queries of the class.
        temperature: softmax temperature (ACTION: 0.5).
        reference: optional tensor (e.g. the embeddings) used, when nothing was sampled, to
            return a zero that is on its device and attached to its graph.

    Returns:
        Scalar: mean over classes of the mean over queries. When no class has queries: 0 that
        requires grad (``reference.sum() * 0`` when given), so ``backward()`` still works.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    per_class = []
    for sample in samples:
        _, queries, prototype, negatives = sample
        if queries.shape[0] == 0:
            continue
        q = F.normalize(queries.float(), dim=-1)
        p = F.normalize(prototype.float().reshape(-1), dim=0)
        n = F.normalize(negatives.float(), dim=-1)
        positive = (q @ p).unsqueeze(1) / temperature  # (Q, 1)
        if n.dim() == 2:
            negative = q @ n.T / temperature  # (Q, M)
        else:
            negative = torch.einsum("qd,qmd->qm", q, n) / temperature
        logits = torch.cat([positive, negative], dim=1)
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        per_class.append(F.cross_entropy(logits, target))
    if not per_class:
        if reference is not None:
            return reference.sum() * 0.0
        return torch.zeros((), requires_grad=True)
    return torch.stack(per_class).mean()
