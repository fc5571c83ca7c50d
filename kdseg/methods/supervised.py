"""``supervised``: the lower bound of semi-supervised tables, trained on the labeled part only."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdseg.losses.segmentation import ce_dice_loss
from kdseg.methods.base import SegmentationMethod


class Supervised(SegmentationMethod):
    """``L = L_sup = (CE + Dice) / 2`` on labeled slices (SSL4MIS ``train_fully_supervised_2D``).

    Any unlabeled stream is ignored, so set ``data.unlabeled_batch_size: 0`` to save its loading.
    """

    required_supervision = "dense"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled = batch["labeled"]
        logits = self.student(labeled["image"]).logits
        L_sup = ce_dice_loss(logits, labeled["target"])
        self.log("train/loss", L_sup, prog_bar=True)
        self.log("train/L_sup", L_sup)
        return L_sup
