"""``instance_supervised``: Mask R-CNN on the labeled images only (the lower bound of MMT-PSM's tables)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdseg.methods.instance_base import InstanceSegmentationMethod


class InstanceSupervised(InstanceSegmentationMethod):
    """``L = L_rpn_cls + L_rpn_box + L_cls + L_box + L_mask`` (torchvision's Mask R-CNN losses).

    Any unlabeled stream is ignored, so set ``data.unlabeled_batch_size: 0``.
    (arguments: see :class:`~kdseg.methods.instance_base.InstanceSegmentationMethod`)
    """

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled = batch["labeled"]
        loss, logs = self.supervised_loss(labeled)
        logs["train/loss"] = loss.detach()
        self.log_train(logs, batch_size=len(labeled))
        return loss
