"""Contrastive distillation with soft-labelled negatives (ACTION, You et al., IPMI 2023).

Instead of a binary positive/negative split, the student learns to reproduce the teacher's
*similarity distribution* over a set of anchors (a memory bank of past teacher embeddings):

    p_t = softmax(cos(teacher, anchors) / tau_t),   p_s = softmax(cos(student, anchors) / tau_s)
    loss = mean_i KL(p_t[i] || p_s[i])

with a sharp teacher temperature (0.01) and a softer student one (0.1), and
:class:`FeatureMemoryBank` is the FIFO of anchors (36 entries by default): the values of the
released ACTION ``code/train_2D.sh`` (``--T_t 0.01 --T_s 0.1 --K 36``).
The global (stage-1) variant is :func:`contrastive_distillation_loss` on one vector per image;
the local (stage-2) variant is :func:`dense_contrastive_distillation_loss` on per-pixel vectors.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdseg.distributed import all_gather_rows
from kdseg.losses.ring_buffer import fifo_write

__all__ = [
    "FeatureMemoryBank",
    "contrastive_distillation_loss",
    "dense_contrastive_distillation_loss",
]


class FeatureMemoryBank(nn.Module):
    """FIFO queue of L2-normalised, detached embeddings used as distillation anchors.

    Args:
        dim: embedding size.
        size: number of slots (36 in the released ACTION ``code/train_2D.sh``).
        random_init: start full of random unit vectors, as the released ACTION code does;
            default ``False`` starts empty (``get()`` is then ``(0, dim)`` until the first
            ``enqueue`` and the distillation loss is 0 for that step).

    Buffers (saved in checkpoints): ``embeddings`` ``(size, dim)``, ``pointer`` (next slot to
    write, 0-dim long), ``num_filled`` (0-dim long).

    Under ``torch.distributed`` :meth:`enqueue` is a collective: it all-gathers the rows of every
    rank (in rank order) before writing, so all ranks keep the same bank. Every rank must call
    it the same number of times.
    """

    def __init__(self, dim: int, size: int = 36, random_init: bool = False):
        super().__init__()
        if dim < 1 or size < 1:
            raise ValueError(f"dim and size must be >= 1, got dim={dim}, size={size}")
        self.dim = int(dim)
        self.size = int(size)
        if random_init:
            init = F.normalize(torch.randn(self.size, self.dim), dim=1)
            filled = self.size
        else:
            init = torch.zeros(self.size, self.dim)
            filled = 0
        self.register_buffer("embeddings", init)
        self.register_buffer("pointer", torch.tensor(0, dtype=torch.long))
        self.register_buffer("num_filled", torch.tensor(filled, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}"

    def __len__(self) -> int:
        return int(self.num_filled)

    @torch.no_grad()
    def enqueue(self, x: Tensor) -> None:
        """Append rows ``x`` ``(N, dim)`` (detached, L2-normalised); the oldest are overwritten.

        With more rows than ``size`` (after the DDP gather) only the newest ``size`` are kept.
        """
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (N, {self.dim}), got {tuple(x.shape)}")
        x = F.normalize(x.detach().to(self.embeddings.device).float(), dim=1)
        x = all_gather_rows(x.to(self.embeddings.dtype))
        pointer, filled = fifo_write(self.embeddings, int(self.pointer), int(self.num_filled), x)
        self.pointer.fill_(pointer)
        self.num_filled.fill_(filled)

    def get(self) -> Tensor:
        """The stored embeddings, oldest first, ``(num_filled, dim)`` (a detached tensor)."""
        filled = int(self.num_filled)
        if filled < self.size:
            return self.embeddings[:filled].detach()
        return torch.roll(self.embeddings, -int(self.pointer), dims=0).detach()

    def reset(self) -> None:
        """Empty the bank."""
        self.embeddings.zero_()
        self.pointer.zero_()
        self.num_filled.zero_()


def contrastive_distillation_loss(
    student_embedding: Tensor,
    teacher_embedding: Tensor,
    anchors: Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.01,
) -> Tensor:
    """``mean_i KL(p_t[i] || p_s[i])`` of the anchor-similarity distributions.

    Args:
        student_embedding: ``(N, D)``.
        teacher_embedding: ``(N, D)``; detached (the teacher gets no gradient).
        anchors: ``(K, D)``, e.g. ``FeatureMemoryBank.get()``; detached.
        student_temperature, teacher_temperature: softmax temperatures (released ACTION code: 0.1 / 0.01).

    All three are L2-normalised, so similarities are cosines. Returns a scalar; 0 (still
    attached to the student's graph) when there is no anchor or no sample.
    """
    if student_embedding.dim() != 2 or teacher_embedding.shape != student_embedding.shape:
        raise ValueError(
            f"student {tuple(student_embedding.shape)} and teacher "
            f"{tuple(teacher_embedding.shape)} must both be (N, D)"
        )
    if anchors.dim() != 2 or (anchors.shape[0] and anchors.shape[1] != student_embedding.shape[1]):
        raise ValueError(
            f"anchors must be (K, {student_embedding.shape[1]}), got {tuple(anchors.shape)}"
        )
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError("temperatures must be > 0")
    if anchors.shape[0] == 0 or student_embedding.shape[0] == 0:
        return student_embedding.sum() * 0.0
    anchors = F.normalize(anchors.detach().float(), dim=1)
    student = F.normalize(student_embedding.float(), dim=1)
    teacher = F.normalize(teacher_embedding.detach().float(), dim=1)
    log_p_s = F.log_softmax(student @ anchors.T / student_temperature, dim=1)
    log_p_t = F.log_softmax(teacher @ anchors.T / teacher_temperature, dim=1)
    # batchmean: sum over anchors, mean over the N samples
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def dense_contrastive_distillation_loss(
    student_map: Tensor,
    teacher_map: Tensor,
    anchors: Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.01,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Local (per-pixel) variant of :func:`contrastive_distillation_loss`.

    Args:
        student_map, teacher_map: ``(B, D, H, W)``; every pixel's ``D``-vector is one sample.
        anchors: ``(K, D)``.
        num_samples: when set (and smaller than ``B*H*W``), only that many random pixels
            (without replacement, the same positions in both maps) enter the loss, which bounds
            memory at ``num_samples x K``; ``None`` uses all pixels.
        generator: optional ``torch.Generator`` for the pixel draw.
    """
    if student_map.dim() != 4 or teacher_map.shape != student_map.shape:
        raise ValueError(
            f"student {tuple(student_map.shape)} and teacher {tuple(teacher_map.shape)} "
            "must both be (B, D, H, W)"
        )
    b, d, h, w = student_map.shape
    total = b * h * w
    if num_samples is not None and num_samples < total:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        gen_device = student_map.device if generator is None else generator.device
        idx = torch.randperm(total, generator=generator, device=gen_device)[:num_samples]
        idx = idx.to(student_map.device)
        hw = h * w
        student = student_map.flatten(2)[idx // hw, :, idx % hw]
        teacher = teacher_map.flatten(2)[idx // hw, :, idx % hw]
    else:
        student = student_map.permute(0, 2, 3, 1).reshape(total, d)
        teacher = teacher_map.permute(0, 2, 3, 1).reshape(total, d)
    return contrastive_distillation_loss(
        student, teacher, anchors, student_temperature, teacher_temperature
    )
