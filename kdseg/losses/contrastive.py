"""Class-wise (prototype) contrastive regularisation for ScribSD+.

Pixel embeddings are pulled towards the prototype (normalised mean embedding) of their class
and pushed away from the prototypes of the other classes present in the batch, with an
InfoNCE / softmax-over-prototypes objective.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["class_prototypes", "prototype_infonce_loss", "sample_pixels_per_class"]


def _flatten(
    features: Tensor, class_map: Tensor, num_classes: int, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate; return the normalised embeddings (N, D) and labels (N,) of the assigned pixels
    only, plus an all-True mask (N,). Only assigned pixels are gathered and normalised: with
    scribbles and confident pseudo-labels they are a small fraction of a batch, and normalising
    every pixel of a (B, D, H, W) map dominated the cost of the loss."""
    if features.dim() < 3:
        raise ValueError(f"features must be (B, D, *spatial), got {tuple(features.shape)}")
    expected = features.shape[:1] + features.shape[2:]
    if class_map.shape != expected:
        raise ValueError(
            f"class_map must have shape (B, *spatial) = {tuple(expected)}, "
            f"got {tuple(class_map.shape)}"
        )
    if class_map.dtype.is_floating_point or class_map.dtype == torch.bool:
        raise TypeError(f"class_map must be an integer tensor, got dtype {class_map.dtype}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = class_map.reshape(-1).long()
    assigned = labels != ignore_index
    bad = assigned & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"class_map values must be in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"found {sorted(set(labels[bad].tolist()))[:5]}"
        )
    index = torch.nonzero(assigned, as_tuple=False).squeeze(1)
    pixels_per_image = class_map[0].numel()
    rows = features.flatten(2).transpose(1, 2)  # (B, P, D) view, no copy
    z = F.normalize(rows[index // pixels_per_image, index % pixels_per_image], dim=1)
    labels = labels[index]
    return z, labels, torch.ones_like(labels, dtype=torch.bool)


def _prototypes_from_flat(
    z: Tensor, labels: Tensor, assigned: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    idx = labels[assigned]
    sums = z.new_zeros(num_classes, z.shape[1]).index_add(0, idx, z[assigned])
    counts = torch.bincount(idx, minlength=num_classes)
    present = counts > 0
    means = sums / counts.clamp_min(1).unsqueeze(1).to(z.dtype)
    # F.normalize maps the zero rows of absent classes to zero (it divides by max(norm, eps)).
    return F.normalize(means, dim=1), present


def class_prototypes(
    features: Tensor, class_map: Tensor, num_classes: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Per-class prototypes: L2-normalised mean of the L2-normalised pixel embeddings.

    Args:
        features: (B, D, *spatial), e.g. (B, D, H, W) projection-head output; normalised along
            D inside.
        class_map: (B, *spatial) integer class of each pixel (scribble or pseudo label), or
            ``ignore_index`` for unassigned pixels.
        num_classes: number of classes C.
        ignore_index: label of unassigned pixels.

    Returns:
        ``(prototypes, present)``: prototypes (C, D) with unit rows for present classes and zero
        rows for absent ones; present (C,) bool. Differentiable w.r.t. ``features``.
    """
    z, labels, assigned = _flatten(features, class_map, num_classes, ignore_index)
    return _prototypes_from_flat(z, labels, assigned, num_classes)


def sample_pixels_per_class(
    labels: Tensor,
    num_classes: int,
    max_pixels_per_class: int | None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of at most ``max_pixels_per_class`` pixels of each class, drawn uniformly.

    Args:
        labels: (N,) int64 flat labels; values outside ``[0, num_classes)`` (e.g. the ignore
            index) are never selected.
        num_classes: number of classes C.
        max_pixels_per_class: cap per class (without replacement); None keeps every pixel.
        generator: optional ``torch.Generator`` for reproducible draws; the permutation is
            drawn on the generator's device (CPU when None) and moved to ``labels.device``.

    Returns:
        (M,) int64 indices into ``labels``, grouped by class (ascending), M <= C * cap.
    """
    if max_pixels_per_class is not None and max_pixels_per_class < 1:
        raise ValueError(f"max_pixels_per_class must be >= 1 or None, got {max_pixels_per_class}")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    chosen: list[Tensor] = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c, as_tuple=False).squeeze(1)
        if max_pixels_per_class is not None and idx.numel() > max_pixels_per_class:
            perm = torch.randperm(idx.numel(), generator=generator, device=draw_device)
            idx = idx[perm[:max_pixels_per_class].to(idx.device)]
        chosen.append(idx)
    if not chosen:
        return labels.new_zeros(0, dtype=torch.long)
    return torch.cat(chosen)


def prototype_infonce_loss(
    features: Tensor,
    class_map: Tensor,
    num_classes: int,
    ignore_index: int,
    temperature: float = 0.1,
    max_pixels_per_class: int | None = 256,
    generator: torch.Generator | None = None,
    detach_prototypes: bool = False,
) -> Tensor:
    """Pixel-to-prototype InfoNCE: ``-log(exp(z.p_c/tau) / sum_{k present} exp(z.p_k/tau))``.

    ``z`` is a normalised pixel embedding of class ``c``; ``p_k`` are the prototypes
    (:func:`class_prototypes`) computed from *all* assigned pixels of the batch; only classes
    present in the batch enter the denominator. The loss is averaged over the anchor pixels,
    which are up to ``max_pixels_per_class`` per class drawn uniformly (bounding the
    (anchors x classes) similarity matrix and balancing large vs. small structures).

    With fewer than 2 present classes there are no negatives and the contrast is undefined
    (the softmax over one prototype is identically 1, loss log 1 = 0), so an exact 0 still
    attached to the graph of ``features`` is returned.

    Args:
        features: (B, D, *spatial) pixel embeddings; normalised along D inside.
        class_map: (B, *spatial) integer class per pixel, ``ignore_index`` = unassigned.
        num_classes: number of classes C.
        ignore_index: label of unassigned pixels.
        temperature: ``tau > 0``.
        max_pixels_per_class: anchor cap per class; None uses every assigned pixel.
        generator: optional ``torch.Generator`` for the anchor sampling.
        detach_prototypes: stop the gradient through the prototypes. Default False: gradient
            also flows through the batch means, i.e. into *every* assigned pixel (sampled or
            not), additionally tightening each class cluster and moving it away from the others.
            True treats prototypes as fixed targets (as with memory-bank / EMA prototypes):
            only the sampled anchors are updated, the objective is a plain classification of
            anchors against constant centres, and the backward pass is cheaper (no gradient
            through the class means over all pixels), the usual choice for stable
            prototype-based contrast.

    Returns:
        Scalar tensor.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z, labels, assigned = _flatten(features, class_map, num_classes, ignore_index)
    prototypes, present = _prototypes_from_flat(z, labels, assigned, num_classes)
    if int(present.sum()) < 2:
        return features.sum() * 0.0
    if detach_prototypes:
        prototypes = prototypes.detach()
    anchor_idx = sample_pixels_per_class(
        torch.where(assigned, labels, torch.full_like(labels, -1)),
        num_classes,
        max_pixels_per_class,
        generator,
    )
    anchors = z[anchor_idx]  # (M, D)
    present_ids = torch.nonzero(present, as_tuple=False).squeeze(1)  # (K,)
    # Column of each class among the present prototypes (-1 for absent classes, never used).
    column = torch.full((num_classes,), -1, dtype=torch.long, device=labels.device)
    column[present_ids] = torch.arange(present_ids.numel(), device=labels.device)
    logits = anchors @ prototypes[present_ids].t() / temperature  # (M, K)
    return F.cross_entropy(logits, column[labels[anchor_idx]])
