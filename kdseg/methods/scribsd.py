"""``scribsd``: ScribSD, Qu, Zhao, Wei, Lu, Zhang, Wang, "ScribSD: Scribble-Supervised Fetal MRI
Segmentation based on Simultaneous Feature and Prediction Self-Distillation" (MICCAI 2023
MILLanD workshop), the predecessor of ScribSD+ (:mod:`kdseg.methods.scribsd_plus`).

Loss::

    L_total = L_pce + w(t) * (w_kd * L_kd + w_fkd * L_feature_kd)

- ``L_pce``: partial cross-entropy on the scribbles.
- ``L_kd``: prediction KD from the EMA teacher, ``T^2 * KL(softmax(t / T_t) || softmax(s / T))``.
- ``L_feature_kd``: mean squared difference of the channel-normalised decoder features of student
  and teacher, every decoder block, equal weights (:func:`~kdseg.losses.distillation.feature_kd_loss`).

Choices (no public code was found):

- Feature KD on every decoder block with equal weights: kdseg's choice, no weights being known.
- Input noise, ``T = 2`` and the sigmoid ramp ``w(t)`` as kdseg's ScribSD+: the two then differ only in their regularizers.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from kdseg.losses.distillation import feature_kd_loss, kd_kl_divergence
from kdseg.losses.segmentation import partial_cross_entropy
from kdseg.schedules import sigmoid_rampup
from kdseg.methods.base import TeacherStudentMethod
from kdseg.methods.noisy_view import NoisyViewMixin


class ScribSD(NoisyViewMixin, TeacherStudentMethod):
    """ScribSD: ``L_total = L_pce + w(t) * (w_kd * L_kd + w_fkd * L_feature_kd)``.

    Args:
        kd_weight: ``w_kd``, final weight of the prediction KD (0 switches it off).
        feature_kd_weight: ``w_fkd``, final weight of the feature KD (0 switches it off).
        kd_temperature: KD temperature T (student side, and teacher side unless given).
        kd_teacher_temperature: the teacher's temperature T_t (None: T).
        consistency_rampup_steps: sigmoid ramp-up length of ``w(t)``.
        noise_std: std of the clipped Gaussian input noise.
        noise_on: which network's input gets the noise: ``teacher``, ``student`` or ``none``.
        (other arguments: see :class:`~kdseg.methods.base.TeacherStudentMethod`)
    """

    required_supervision = "scribble"

    def __init__(
        self,
        kd_weight: float = 1.0,
        feature_kd_weight: float = 1.0,
        kd_temperature: float = 2.0,
        kd_teacher_temperature: float | None = None,
        consistency_rampup_steps: int = 12000,
        noise_std: float = 0.1,
        noise_on: str = "teacher",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kd_weight = kd_weight
        self.feature_kd_weight = feature_kd_weight
        self.kd_temperature = kd_temperature
        self.kd_teacher_temperature = kd_temperature if kd_teacher_temperature is None else kd_teacher_temperature
        self.consistency_rampup_steps = consistency_rampup_steps
        self.init_noisy_view(noise_std, noise_on)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, scribble = batch["labeled"]["image"], batch["labeled"]["target"]
        student = self.student(self.perturb(image, "student"))
        teacher = self.teacher_forward(self.perturb(image, "teacher"))
        ramp = sigmoid_rampup(self.global_step, self.consistency_rampup_steps)

        L_pce = partial_cross_entropy(student.logits, scribble, self.scribble_ignore_index)
        loss = L_pce
        logs = {"train/L_pce": L_pce}
        if self.kd_weight > 0:
            L_kd = kd_kl_divergence(student.logits, teacher.logits, self.kd_temperature,
                                    teacher_temperature=self.kd_teacher_temperature)
            loss = loss + self.kd_weight * ramp * L_kd
            logs["train/L_kd"] = L_kd
        if self.feature_kd_weight > 0:
            levels = len(student.decoder_features)
            L_feature_kd = feature_kd_loss(student.decoder_features, teacher.decoder_features, [1.0] * levels)
            loss = loss + self.feature_kd_weight * ramp * L_feature_kd
            logs["train/L_feature_kd"] = L_feature_kd
        logs.update({"train/loss": loss, "train/ramp": ramp})
        self.log_dict(logs)
        return loss
