"""Hard-query and class-relation-aware negative sampling for pixel-level contrastive losses.

A shared component: it only *selects* pixels (queries, a positive prototype and negatives);
the loss that consumes them lives elsewhere (e.g. :func:`kdseg.losses.anatomical_contrast.
anatomical_contrast_loss`). The scheme follows the regional/anatomical contrast of ACTION
(You et al., IPMI 2023), itself derived from ReCo:

* **queries** of class ``c`` are pixels labelled ``c`` (ground truth or pseudo-label) whose
  predicted probability for ``c`` is below ``hard_threshold`` ("hard" pixels);
* the **positive key** of a query is its class prototype, the mean embedding of all valid
  pixels of that class in the batch;
* **negatives** are drawn class first, from a distribution over the *other* present classes
  that is the softmax of prototype cosine similarities divided by a temperature (the class
  relation graph: classes that look alike are used more often), then a uniformly random pixel
  of the drawn class.

Memory is kept small: indices are sampled first and only the sampled pixels' embeddings are
gathered; no pixel-by-pixel similarity matrix is ever built. The one full-size extra tensor is a
detached pixel-major copy of the embeddings (``B*H*W x D``, no gradient), from which the
prototypes are summed in one pass and the negatives are read as contiguous rows (on CPU several
times faster than gathering strided columns of the ``(B, D, H*W)`` view).

Optional per-class memory bank (:class:`HardNegativeSampler`, ``memory_size_per_class > 0``):
a FIFO of detached, L2-normalised pixel embeddings per class that persists across batches
(and goes into checkpoints as buffers). Negatives are then drawn from the batch *and* the
bank, and a class seen only in the bank can still serve as a negative class. Under
``torch.distributed`` the update is all-gathered, so every rank holds the same bank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdseg.distributed import all_gather_rows
from kdseg.losses.ring_buffer import fifo_write

__all__ = [
    "ContrastSample",
    "HardNegativeSampler",
    "class_relation_weights",
    "sample_negatives",
    "select_hard_queries",
]


def _gen_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return fallback if generator is None else generator.device


def _randperm(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    perm = torch.randperm(n, generator=generator, device=_gen_device(generator, device))
    return perm.to(device)


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    u = torch.rand(n, generator=generator, device=_gen_device(generator, device))
    return u.to(device)


def _multinomial(weights: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    w = weights.detach().float().to(_gen_device(generator, weights.device))
    return torch.multinomial(w, n, replacement=True, generator=generator).to(weights.device)


def _checked_valid(labels: Tensor, valid: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """``valid`` restricted to labels in ``[0, num_classes)``; labels clamped into range."""
    valid = valid.bool() & (labels >= 0) & (labels < num_classes)
    return labels.long().clamp(0, num_classes - 1), valid


class _ClassPools:
    """Valid pixel indices grouped by class: ``sorted_idx[offsets[c]:offsets[c]+counts[c]]``."""

    def __init__(self, labels: Tensor, valid: Tensor, num_classes: int):
        valid_idx = valid.nonzero().flatten()
        lab = labels[valid_idx]
        order = torch.argsort(lab, stable=True)
        self.valid_idx = valid_idx
        self.valid_labels = lab
        self.sorted_idx = valid_idx[order]
        self.counts = torch.bincount(lab, minlength=num_classes)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts

    def draw(self, classes: Tensor, u: Tensor) -> Tensor:
        """One uniformly random pixel index of each class in ``classes`` (``u`` in [0, 1))."""
        n = self.counts[classes]
        r = torch.minimum((u * n).long(), (n - 1).clamp_min(0))
        return self.sorted_idx[self.offsets[classes] + r]


def _select_hard(
    labels: Tensor,
    own_prob: Tensor,
    valid: Tensor,
    num_classes: int,
    num_queries: int,
    hard_threshold: float,
    generator: torch.Generator | None,
    fill_with_easy: bool,
) -> dict[int, Tensor]:
    device = labels.device
    hard = own_prob.detach() < hard_threshold
    counts = torch.bincount(labels[valid], minlength=num_classes)
    out: dict[int, Tensor] = {}
    if num_queries <= 0:
        return out
    for c in counts.nonzero().flatten().tolist():
        in_class = valid & (labels == c)
        hard_idx = (in_class & hard).nonzero().flatten()
        chosen = hard_idx[_randperm(hard_idx.numel(), generator, device)[:num_queries]]
        missing = num_queries - chosen.numel()
        if fill_with_easy and missing > 0:
            easy_idx = (in_class & ~hard).nonzero().flatten()
            extra = easy_idx[_randperm(easy_idx.numel(), generator, device)[:missing]]
            chosen = torch.cat([chosen, extra])
        if chosen.numel() > 0:
            out[int(c)] = chosen
    return out


def select_hard_queries(
    embeddings: Tensor,
    labels: Tensor,
    probs: Tensor,
    valid: Tensor,
    num_queries: int,
    hard_threshold: float = 0.97,
    generator: torch.Generator | None = None,
    fill_with_easy: bool = True,
) -> dict[int, Tensor]:
    """Indices of the query pixels of every class present among the valid pixels.

    Args:
        embeddings: ``(N, D)`` pixel embeddings (only their count is used; the indices returned
            index its rows).
        labels: ``(N,)`` long class of each pixel (ground truth or pseudo-label); values outside
            ``[0, C)`` are treated as invalid.
        probs: ``(N, C)`` predicted probabilities.
        valid: ``(N,)`` bool; pixels that may be used.
        num_queries: at most this many queries per class (distinct pixels, no replacement).
        hard_threshold: a pixel is *hard* when ``probs[i, labels[i]] < hard_threshold``.
        generator: optional ``torch.Generator`` for reproducible draws.
        fill_with_easy: when a class has fewer than ``num_queries`` hard pixels, top it up with
            random easy pixels of the same class (default). ``False`` keeps hard pixels only,
            and a class without hard pixels then gives no queries (what the released ACTION /
            ReCo code does: it draws its queries, with replacement, from the hard pixels only
            and skips a class whose pixels are all easy). The top-up keeps every present class
            in the loss once the network becomes confident.

    Returns:
        ``{class: indices}`` with classes in increasing order; the indices (long, on the device
        of ``labels``) list the hard pixels first (random order), then the easy ones. A class
        with no valid pixel (absent, or present only in invalid pixels) never appears.
    """
    if embeddings.dim() != 2 or labels.dim() != 1 or probs.dim() != 2 or valid.dim() != 1:
        raise ValueError("expected embeddings (N, D), labels (N,), probs (N, C), valid (N,)")
    n = embeddings.shape[0]
    if not (labels.shape[0] == probs.shape[0] == valid.shape[0] == n):
        raise ValueError(
            f"row counts differ: embeddings {n}, labels {labels.shape[0]}, "
            f"probs {probs.shape[0]}, valid {valid.shape[0]}"
        )
    num_classes = probs.shape[1]
    safe, valid = _checked_valid(labels, valid, num_classes)
    own = probs.detach().gather(1, safe.unsqueeze(1)).squeeze(1)
    return _select_hard(
        safe, own, valid, num_classes, num_queries, hard_threshold, generator, fill_with_easy
    )


@torch.no_grad()
def class_relation_weights(prototypes: Tensor, present: Tensor, temperature: float = 0.5) -> Tensor:
    """Class relation graph: ``W[c, k] ∝ exp(cos(p_c, p_k) / temperature)`` over other classes.

    Args:
        prototypes: ``(C, D)`` class prototypes (any scale; cosine similarity is used).
        present: ``(C,)`` bool, which classes exist (may be drawn as negatives).
        temperature: softmax temperature.

    Returns:
        ``(C, C)`` float32; row ``c`` of a present class is a distribution over the *other*
        present classes (diagonal and absent columns are 0). Rows of absent classes, and of a
        class with no other present class, are all zero. No gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_classes = prototypes.shape[0]
    present = present.bool().to(prototypes.device)
    p = F.normalize(prototypes.detach().float(), dim=1)
    sim = (p @ p.T) / temperature
    eye = torch.eye(num_classes, dtype=torch.bool, device=p.device)
    allowed = present[:, None] & present[None, :] & ~eye
    weights = torch.softmax(sim.masked_fill(~allowed, float("-inf")), dim=1)
    return torch.nan_to_num(weights, nan=0.0)  # all-masked rows give NaN -> 0


def sample_negatives(
    embeddings: Tensor,
    labels: Tensor,
    valid: Tensor,
    relation_weights: Tensor,
    anchor_class: int,
    num_negatives: int,
    generator: torch.Generator | None = None,
    detach: bool = True,
) -> Tensor:
    """Negatives for a query of ``anchor_class``: class ~ ``relation_weights[anchor_class]``.

    Each negative's class is drawn (multinomial, with replacement) from the anchor's row of
    :func:`class_relation_weights`, then a uniformly random valid pixel of that class is taken.

    Args:
        embeddings: ``(N, D)``; labels: ``(N,)`` long; valid: ``(N,)`` bool.
        relation_weights: ``(C, C)`` from :func:`class_relation_weights`.
        anchor_class: class of the query.
        num_negatives: how many to draw.
        generator: optional ``torch.Generator``.
        detach: return detached embeddings (default; negatives carry no gradient in ACTION).

    Returns:
        ``(num_negatives, D)``.

    Raises:
        ValueError: when the anchor's row is all zero (no other class to draw from) or a class
            with positive weight has no valid pixel.
    """
    num_classes = relation_weights.shape[0]
    safe, valid = _checked_valid(labels, valid, num_classes)
    row = relation_weights[anchor_class].detach()
    if not bool((row > 0).any()):
        raise ValueError(f"class {anchor_class} has no negative class to sample from")
    pools = _ClassPools(safe, valid, num_classes)
    if bool(((row > 0) & (pools.counts.to(row.device) == 0)).any()):
        raise ValueError("relation_weights give weight to a class without valid pixels")
    classes = _multinomial(row, num_negatives, generator).to(safe.device)
    idx = pools.draw(classes, _rand(num_negatives, generator, safe.device))
    out = embeddings[idx]
    return out.detach() if detach else out


class ContrastSample(NamedTuple):
    """What the sampler hands a contrastive loss for one class (unpacks as a 4-tuple)."""

    class_index: int
    queries: Tensor  # (Q, D), with gradient
    prototype: Tensor  # (D,), detached batch class mean
    negatives: Tensor  # (Q, num_negatives, D), detached


class HardNegativeSampler(nn.Module):
    """Samples hard queries, their prototype and relation-aware negatives from a dense batch.

    Args:
        num_queries: queries per class (ACTION: 256).
        num_negatives: negatives per query (ACTION: 512).
        hard_threshold: own-class probability under which a pixel is hard (ACTION: 0.97).
        temperature: temperature of the class relation softmax (ACTION: 0.5).
        memory_size_per_class: FIFO slots per class; 0 (default) = current batch only.
        num_classes, embedding_dim: needed (for the buffer shapes) when the bank is used.
        memory_push_per_class: how many pixels of each class present in a batch are pushed into
            the bank per update (all of them when fewer; a random subset otherwise).
        fill_with_easy: see :func:`select_hard_queries`.

    Buffers (in the state dict): ``memory`` ``(C, M, D)`` L2-normalised detached embeddings,
    ``memory_ptr`` ``(C,)`` next slot, ``memory_count`` ``(C,)`` filled slots. While a class's
    ring is not full its entries are slots ``0 .. count-1``.

    ``forward`` returns a list of :class:`ContrastSample`, one per class that has queries and at
    least one other class to draw negatives from (in the batch or the bank). In training mode
    (or with ``update_memory=True``) the bank is updated *after* sampling, so a batch never
    draws its own pixels from the bank.
    """

    def __init__(
        self,
        num_queries: int = 256,
        num_negatives: int = 512,
        hard_threshold: float = 0.97,
        temperature: float = 0.5,
        memory_size_per_class: int = 0,
        num_classes: int | None = None,
        embedding_dim: int | None = None,
        memory_push_per_class: int = 32,
        fill_with_easy: bool = True,
    ):
        super().__init__()
        if num_queries < 1 or num_negatives < 1:
            raise ValueError("num_queries and num_negatives must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if memory_size_per_class < 0:
            raise ValueError("memory_size_per_class must be >= 0")
        if memory_size_per_class > 0 and (num_classes is None or embedding_dim is None):
            raise ValueError("num_classes and embedding_dim are required with a memory bank")
        self.num_queries = int(num_queries)
        self.num_negatives = int(num_negatives)
        self.hard_threshold = float(hard_threshold)
        self.temperature = float(temperature)
        self.memory_size_per_class = int(memory_size_per_class)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.memory_push_per_class = int(memory_push_per_class)
        self.fill_with_easy = bool(fill_with_easy)
        c = num_classes if self.memory_size_per_class > 0 else 0
        d = embedding_dim if self.memory_size_per_class > 0 else 0
        self.register_buffer("memory", torch.zeros(c, self.memory_size_per_class, d))
        self.register_buffer("memory_ptr", torch.zeros(c, dtype=torch.long))
        self.register_buffer("memory_count", torch.zeros(c, dtype=torch.long))

    @property
    def uses_memory(self) -> bool:
        return self.memory_size_per_class > 0

    def extra_repr(self) -> str:
        return (
            f"num_queries={self.num_queries}, num_negatives={self.num_negatives}, "
            f"hard_threshold={self.hard_threshold}, temperature={self.temperature}, "
            f"memory_size_per_class={self.memory_size_per_class}"
        )

    def memory_entries(self, class_index: int) -> Tensor:
        """The bank's entries of one class, oldest first, ``(count, D)``."""
        if not self.uses_memory:
            return self.memory.new_zeros((0, 0))
        count = int(self.memory_count[class_index])
        ring = self.memory[class_index]
        if count < self.memory_size_per_class:
            return ring[:count]
        return torch.roll(ring, -int(self.memory_ptr[class_index]), dims=0)

    # -- shape handling ----------------------------------------------------------------------
    def _check(self, embeddings: Tensor, labels: Tensor, valid: Tensor, num_classes: int) -> None:
        if embeddings.dim() != 4:
            raise ValueError(f"embeddings must be (B, D, H, W), got {tuple(embeddings.shape)}")
        b, d, h, w = embeddings.shape
        if tuple(labels.shape) != (b, h, w) or tuple(valid.shape) != (b, h, w):
            raise ValueError(
                f"labels {tuple(labels.shape)} and valid {tuple(valid.shape)} must be {(b, h, w)}"
            )
        if self.uses_memory and (num_classes != self.num_classes or d != self.embedding_dim):
            raise ValueError(
                f"bank is for {self.num_classes} classes x {self.embedding_dim} dims, "
                f"got {num_classes} x {d}"
            )

    @staticmethod
    def _gather(view: Tensor, idx: Tensor) -> Tensor:
        """Rows of a ``(B, D, HW)`` view at flat pixel indices -> ``(n, D)`` (no full copy)."""
        hw = view.shape[2]
        return view[idx // hw, :, idx % hw]

    # -- memory ------------------------------------------------------------------------------
    @torch.no_grad()
    def update_memory(
        self,
        embeddings: Tensor,
        labels: Tensor,
        valid: Tensor,
        generator: torch.Generator | None = None,
    ) -> None:
        """Push up to ``memory_push_per_class`` valid pixels of each class into the bank.

        Collective under ``torch.distributed``: every rank must call it the same number of
        times; the pushes of all ranks are applied in rank order on every rank.
        """
        if not self.uses_memory:
            return
        num_classes = int(self.num_classes)
        self._check(embeddings, labels, valid, num_classes)
        view = embeddings.detach().flatten(2)
        safe, ok = _checked_valid(labels.reshape(-1), valid.reshape(-1), num_classes)
        pools = _ClassPools(safe, ok, num_classes)
        picked = []
        for c in (pools.counts > 0).nonzero().flatten().tolist():
            start, count = int(pools.offsets[c]), int(pools.counts[c])
            members = pools.sorted_idx[start : start + count]
            if count > self.memory_push_per_class:
                perm = _randperm(count, generator, members.device)
                members = members[perm[: self.memory_push_per_class]]
            picked.append(members)
        idx = torch.cat(picked) if picked else safe.new_zeros(0)
        rows = F.normalize(self._gather(view, idx).float(), dim=1).to(self.memory.dtype)
        rows = all_gather_rows(rows.to(self.memory.device))
        row_labels = all_gather_rows(safe[idx].to(self.memory.device))
        for c in range(num_classes):
            x = rows[row_labels == c]
            if x.shape[0] == 0:
                continue
            ptr, count = fifo_write(
                self.memory[c], int(self.memory_ptr[c]), int(self.memory_count[c]), x
            )
            self.memory_ptr[c] = ptr
            self.memory_count[c] = count

    # -- sampling ----------------------------------------------------------------------------
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        probs: Tensor,
        valid: Tensor,
        generator: torch.Generator | None = None,
        update_memory: bool | None = None,
    ) -> list[ContrastSample]:
        """Sample queries, prototypes and negatives.

        Args:
            embeddings: ``(B, D, H, W)`` pixel embeddings (queries keep their gradient).
            labels: ``(B, H, W)`` long (ground truth / pseudo-label; out-of-range = invalid).
            probs: ``(B, C, H, W)`` predicted probabilities.
            valid: ``(B, H, W)`` bool (e.g. labelled pixels and confident pseudo-labels).
            generator: optional ``torch.Generator``.
            update_memory: push this batch into the bank afterwards; default ``self.training``.
        """
        if probs.dim() != 4:
            raise ValueError(f"probs must be (B, C, H, W), got {tuple(probs.shape)}")
        num_classes = probs.shape[1]
        self._check(embeddings, labels, valid, num_classes)
        b, d, h, w = embeddings.shape
        if tuple(probs.shape) != (b, num_classes, h, w):
            raise ValueError(f"probs {tuple(probs.shape)} must be {(b, num_classes, h, w)}")
        device = embeddings.device
        view = embeddings.flatten(2)  # (B, D, HW) view, no copy
        safe, ok = _checked_valid(labels.reshape(-1), valid.reshape(-1), num_classes)
        own = probs.detach().gather(1, safe.view(b, 1, h, w)).reshape(-1)

        with torch.no_grad():
            pools = _ClassPools(safe, ok, num_classes)
            # One pixel-major copy of the (detached) embeddings: prototypes and the
            # num_queries x num_negatives negative rows are then read as contiguous rows, which
            # on CPU is several times faster than gathering strided columns of the (B, D, HW)
            # view. Invalid pixels are summed into a dropped extra row instead of being gathered.
            rows = embeddings.detach().permute(0, 2, 3, 1).reshape(-1, d)
            row_class = torch.where(ok, safe, torch.full_like(safe, num_classes))
            sums = torch.zeros(num_classes + 1, d, device=device).index_add_(0, row_class, rows.float())
            sums = sums[:num_classes]
            batch_counts = pools.counts
            prototypes = sums / batch_counts.clamp_min(1).unsqueeze(1).float()
            if self.uses_memory:
                bank_counts = self.memory_count.to(device)
                bank = self.memory.to(device)
                for c in ((batch_counts == 0) & (bank_counts > 0)).nonzero().flatten().tolist():
                    prototypes[c] = bank[c, : int(bank_counts[c])].float().mean(0)
            else:
                bank_counts = torch.zeros_like(batch_counts)
                bank = None
            totals = batch_counts + bank_counts
            relation = class_relation_weights(prototypes, totals > 0, self.temperature)

        queries = _select_hard(
            safe, own, ok, num_classes, self.num_queries, self.hard_threshold,
            generator, self.fill_with_easy,
        )
        contrasted = {c: q_idx for c, q_idx in queries.items() if bool((relation[c] > 0).any())}
        # All classes' queries in one gather: its backward then scatters into one zero-filled
        # (B, D, HW) gradient instead of one per class.
        gathered = self._gather(view, torch.cat(list(contrasted.values()))) if contrasted else None
        query_rows = gathered.split([q.numel() for q in contrasted.values()]) if gathered is not None else ()
        samples: list[ContrastSample] = []
        for (c, q_idx), class_queries in zip(contrasted.items(), query_rows):
            row = relation[c]
            n_q = q_idx.numel()
            n_total = n_q * self.num_negatives
            with torch.no_grad():
                classes = _multinomial(row, n_total, generator).to(device)
                u = _rand(n_total, generator, device)
                avail = totals[classes]
                r = torch.minimum((u * avail).long(), avail - 1)
                if bank is None:  # every negative is a batch pixel: one gather, no scatter
                    negatives = rows[pools.sorted_idx[pools.offsets[classes] + r]]
                else:
                    from_batch = r < batch_counts[classes]
                    negatives = torch.empty(n_total, d, dtype=embeddings.dtype, device=device)
                    bi = from_batch.nonzero().flatten()
                    if bi.numel():
                        pix = pools.sorted_idx[pools.offsets[classes[bi]] + r[bi]]
                        negatives[bi] = rows[pix]
                    mi = (~from_batch).nonzero().flatten()
                    if mi.numel():
                        slot = r[mi] - batch_counts[classes[mi]]
                        negatives[mi] = bank[classes[mi], slot].to(embeddings.dtype)
            samples.append(
                ContrastSample(
                    class_index=c,
                    queries=class_queries,
                    prototype=prototypes[c].to(embeddings.dtype),
                    negatives=negatives.view(n_q, self.num_negatives, d),
                )
            )

        if update_memory is None:
            update_memory = self.training
        if update_memory and self.uses_memory:
            self.update_memory(embeddings, labels, valid, generator)
        return samples
