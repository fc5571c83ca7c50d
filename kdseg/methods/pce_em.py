"""``pce_em``: partial cross-entropy plus entropy minimization (Grandvalet & Bengio, NeurIPS 2005),
the WSL4MIS ``pCE + EM`` baseline."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdseg.losses.entropy import entropy_minimization
from kdseg.losses.segmentation import partial_cross_entropy
from kdseg.methods.base import SegmentationMethod


class PartialCEEntropyMinimization(SegmentationMethod):
    """``L = L_pce + entropy_weight * L_em``, ``L_em = mean_pixels(H(p)) / ln C``: the per-pixel
    prediction entropy over all pixels (annotated or not), normalised to [0, 1]; it pushes
    unannotated pixels to confident predictions.

    As WSL4MIS ``code/train_weakly_supervised_pCE_Entropy_Mini_2D.py``: ``loss_ce + 0.1 *
    entropy_loss(softmax, C=4)``, where ``entropy_loss`` (``code/utils/losses.py``) divides the
    mean entropy by ``ln C``; a fixed weight without ramp-up.

    Args:
        entropy_weight: weight of ``L_em`` (0.1, WSL4MIS).
    """

    required_supervision = "scribble"

    def __init__(self, entropy_weight: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entropy_weight = entropy_weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled = batch["labeled"]
        logits = self.student(labeled["image"]).logits
        L_pce = partial_cross_entropy(logits, labeled["target"], self.scribble_ignore_index)
        L_em = entropy_minimization(logits, normalized=True)
        loss = L_pce + self.entropy_weight * L_em
        self.log_dict({"train/loss": loss, "train/L_pce": L_pce, "train/L_em": L_em})
        return loss
