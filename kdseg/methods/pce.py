"""``pce``: partial cross-entropy on scribbles, the scribble-supervised baseline (WSL4MIS)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdseg.losses.segmentation import partial_cross_entropy
from kdseg.methods.base import SegmentationMethod


class PartialCE(SegmentationMethod):
    """``L = L_pce = pCE(student(x), scribble)``: CE over annotated pixels; unannotated pixels
    (``scribble_ignore_index``) carry no loss (WSL4MIS ``train_weakly_supervised_pCE_2D``)."""

    required_supervision = "scribble"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled = batch["labeled"]
        logits = self.student(labeled["image"]).logits
        L_pce = partial_cross_entropy(logits, labeled["target"], self.scribble_ignore_index)
        self.log("train/loss", L_pce, prog_bar=True)
        self.log("train/L_pce", L_pce)
        return L_pce
