"""``pce_em``: partial cross-entropy plus entropy minimization (Grandvalet & Bengio, NeurIPS 2005),
the WSL4MIS ``pCE + EM`` baseline."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdseg.losses.entropy import entropy_minimization
from kdseg.losses.segmentation import partial_cross_entropy
from kdseg.methods.base import SegmentationMethod


class PartialCEEntropyMinimization(SegmentationMethod):
    """``L = L_pce + entropy_weight * L_em``, ``L_em`` the mean per-pixel prediction entropy over
    all pixels (annotated or not): it pushes unannotated pixels to confident predictions.

    Args:
        entropy_weight: weight of ``L_em`` (0.1: a fixed weight; EM has no teacher whose early
            noise would call for a ramp-up).
    """

    required_supervision = "scribble"

    def __init__(self, entropy_weight: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entropy_weight = entropy_weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled = batch["labeled"]
        logits = self.student(labeled["image"]).logits
        L_pce = partial_cross_entropy(logits, labeled["target"], self.scribble_ignore_index)
        L_em = entropy_minimization(logits)
        loss = L_pce + self.entropy_weight * L_em
        self.log_dict({"train/loss": loss, "train/pce": L_pce, "train/entropy": L_em})
        return loss
