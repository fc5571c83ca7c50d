"""``scribsd``: ScribSD (Qu et al., MICCAI 2023 MILLanD workshop), the predecessor of ScribSD+:
single-scale prediction-level KD plus multi-scale feature-level KD from the EMA teacher, no
contrast. Implemented as :class:`~kdseg.methods.scribsd_plus.ScribSDPlus` with other defaults,
so the two differ only in those defaults (multi-scale prediction KD and contrast switched off)."""

from __future__ import annotations

from typing import Any

from kdseg.methods.scribsd_plus import ScribSDPlus


class ScribSD(ScribSDPlus):
    """``L_total = L_pce + w(t) * (L_kd[full resolution] + L_feature_kd[all decoder scales])``.

    Feature KD: mean squared difference of channel-normalised decoder features of student and
    teacher at every decoder block (``feature_kd_loss``), equally weighted.
    """

    def __init__(
        self,
        kd_scales: list[int] = [1],  # noqa: B006
        contrast_weight: float = 0.0,
        feature_kd_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(kd_scales=kd_scales, contrast_weight=contrast_weight, feature_kd_weight=feature_kd_weight, **kwargs)
