"""The instance-segmentation bases: :class:`InstanceSegmentationMethod` (a Mask R-CNN student
from :func:`~kdseg.networks.mask_rcnn.build_mask_rcnn`, per-image evaluation by
:class:`~kdseg.evaluation.InstanceEvaluator`) and :class:`InstanceTeacherStudentMethod` (with the
EMA teacher and a supervised warm-up).
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from kdseg.callbacks.instance_prediction_writer import InstancePredictionWriter
from kdseg.data.augment import StrongPerturbation, random_erasing
from kdseg.evaluation import InstanceEvaluator
from kdseg.evaluation.instance import format_instance_table, instance_test_summary
from kdseg.methods.method import EMATeacherMixin, Method, dataclass_hparam
from kdseg.networks.mask_rcnn import (
    DetectorConfig,
    TeacherTargets,
    backbone_features,
    build_mask_rcnn,
    perturbed_view,
    teacher_targets,
    to_rgb,
)
from kdseg.schedules import sigmoid_rampup

__all__ = ["InstanceSegmentationMethod", "InstanceTeacherStudentMethod", "default_perturbation"]

DEFAULT_CLASS_NAMES: dict[int, str] = {1: "cytoplasm", 2: "nucleus"}


class InstanceSegmentationMethod(Method):
    """A Mask R-CNN student trained by a subclass's ``training_step`` on
    :class:`~kdseg.data.instance_datamodule.CervicalCellDataModule` batches; logs
    ``val/<metric>_<class|mean>`` (:class:`~kdseg.metrics.instance.InstanceMetricAccumulator`).

    Args:
        detector: the Mask R-CNN (see :class:`~kdseg.networks.mask_rcnn.DetectorConfig`).
        num_classes: classes including background (3; the CLI links it from the data).
        optimizer: ``sgd`` (momentum) or ``adamw``.
        lr, momentum, weight_decay: optimizer settings (MMT-PSM's public code: 0.005 for 4 images, 0.9, 1e-4).
        lr_warmup_steps, lr_warmup_factor: linear warm-up from ``lr * lr_warmup_factor`` (MMT-PSM: 500, 1/3).
        poly_power: then ``(1 - t / T) ** poly_power``. Departure: MMT-PSM steps it down at 5000 of
            7000; one schedule for every kdseg method leaves the detectors apart only by their losses.
        (Sources, and gradient clipping: ``experiments/results/notes/mmt_psm.md``.)
        eval_score_threshold: detections used for AJI / F1 / Dice (mAP ranks all).
        predict_score_threshold: detections written by ``predict``.
        predict_dir: where ``predict`` writes; None: ``--prediction_writer.output_dir``.
    """

    progress_bar_metrics = ("val/aji_mean", "val/map_mean")
    unlabeled_hint = (
        "trains on unlabeled images: set data.unlabeled_batch_size > 0 and "
        "leave some training images unlabeled (data.num_labeled) or add EDF images"
    )

    def __init__(
        self,
        detector: DetectorConfig = DetectorConfig(),
        num_classes: int = 3,
        optimizer: str = "sgd",
        lr: float = 0.005,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_warmup_steps: int = 500,
        lr_warmup_factor: float = 1.0 / 3.0,
        poly_power: float = 0.9,
        eval_score_threshold: float = 0.5,
        predict_score_threshold: float = 0.5,
        predict_dir: str | None = None,
    ) -> None:
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        super().__init__()

    def configure_models(self) -> None:
        self.detector_config = dataclass_hparam(DetectorConfig, self.hparams.detector)
        self.num_classes = self.hparams.num_classes
        self.student = build_mask_rcnn(self.detector_config, self.num_classes)
        self.evaluator = InstanceEvaluator()

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections in image coordinates (``masks`` ``(N, 1, H, W)`` probabilities)."""
        return self.inference_network()(to_rgb(images))

    def supervised_loss(self, labeled: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, dict[str, Tensor]]:
        """The Mask R-CNN losses (RPN objectness / box, RoI class / box, mask) of the student,
        logged as ``train/L_<torchvision's name without loss_>``."""
        images = [item[0] for item in labeled]
        targets = [item[1] for item in labeled]
        losses = self.student(to_rgb(images), targets)
        return sum(losses.values()), {f"train/L_{k.removeprefix('loss_')}": v.detach() for k, v in losses.items()}

    def log_train(self, values: dict[str, Any], batch_size: int) -> None:
        self.log_dict(values, batch_size=batch_size, prog_bar=False)

    def class_names(self) -> dict[int, str]:
        names = getattr(getattr(self._trainer, "datamodule", None), "class_names", None) if self._trainer else None
        return dict(names) if names else dict(DEFAULT_CLASS_NAMES)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [InstancePredictionWriter.replacing(self._trainer, self.hparams.predict_dir)]

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_batch(self, batch: Sequence[tuple[Tensor, dict[str, Tensor], str]], stage: str) -> None:
        self.evaluator.add_batch(self([item[0] for item in batch]), batch)

    def summarise(self, rows: list[Any], stage: str) -> tuple[dict[str, float], tuple[Any, ...] | None]:
        threshold, names = self.hparams.eval_score_threshold, self.class_names()
        max_detections = max(100, self.detector_config.box_detections_per_img)
        accumulator = self.evaluator.accumulate(names, threshold, max_detections, records=rows)
        summary = accumulator.compute()
        metrics = {k: float(v) for k, v in summary.items() if k != "num_images"}
        if stage != "test":
            return metrics, None
        content = instance_test_summary(summary, type(self).__name__, getattr(self.trainer, "ckpt_path", None),
                                        getattr(self.trainer, "datamodule", None), names, threshold)
        return metrics, (content, accumulator.write_csv, format_instance_table(summary, names))

    # -- prediction ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        outputs = self([item[0] for item in batch])
        results = []
        for out, (image, image_id) in zip(outputs, batch):
            keep = out["scores"] >= self.hparams.predict_score_threshold
            results.append({
                "image_id": str(image_id),
                "image": image[0].float().cpu().numpy(),
                "masks": (out["masks"][keep, 0] >= 0.5).cpu().numpy(),
                "labels": out["labels"][keep].cpu().numpy(),
                "scores": out["scores"][keep].float().cpu().numpy(),
                "boxes": out["boxes"][keep].float().cpu().numpy(),
            })
        return results


def default_perturbation() -> StrongPerturbation:
    """MMT-PSM's photometric jitter (brightness and contrast 0.15, applied always); gamma, blur
    and noise off. Random erasing is added separately (``erase_prob``)."""
    return StrongPerturbation(brightness=0.15, contrast=0.15, gamma=0.0, blur_sigma=(0.0, 0.0), noise_std=0.0, p=1.0)


class InstanceTeacherStudentMethod(EMATeacherMixin, InstanceSegmentationMethod):
    """A Mask R-CNN student and its EMA teacher (:class:`~kdseg.methods.method.EMATeacherMixin`).

    ``L = L_sup + w(t) * L_unlabeled``, ``w(t) = consistency_weight * sigmoid_rampup(t -
    warmup_steps, consistency_rampup_steps)`` after ``warmup_steps`` supervised-only steps, 0 before.
    Pseudo-labels: the teacher's detections on the clean view with score >= ``pseudo_label_score``;
    perturbed views: ``perturbation`` then random erasing (``erase_prob``, ``erase_area``).
    Departure: the EMA runs from step 0 (the public code restarts it 10 steps before the unlabeled
    losses; with >= 100 warm-up steps only the averaged history differs).
    Departure: the student's unlabeled forward leaves BatchNorm running statistics alone (updating
    them collapsed the ISBI 2014 AJI from scratch: ``experiments/results/notes/mmt_psm.md``).

    Args:
        ema_decay: EMA decay after its warm-up (0.99 in MMT-PSM).
        eval_network: ``student`` or ``teacher`` at validation / test / predict.
        warmup_steps: supervised-only steps (MMT-PSM: 1000).
        consistency_weight: final weight of the unlabeled losses (MMT-PSM's lambda, 5).
        consistency_rampup_steps: sigmoid ramp-up length after warm-up (MMT-PSM: 250).
        pseudo_label_score: teacher detections kept as pseudo-labels.
        perturbation: photometric jitter of each perturbed view.
        erase_prob, erase_area: random erasing of each perturbed view.
        unlabeled_updates_bn_statistics: let that forward update them (to reproduce the collapse).
        (other arguments: see :class:`InstanceSegmentationMethod`)
    """

    uses_unlabeled = True

    def __init__(
        self,
        ema_decay: float = 0.99,
        eval_network: str = "student",
        warmup_steps: int = 1000,
        consistency_weight: float = 1.0,
        consistency_rampup_steps: int = 250,
        pseudo_label_score: float = 0.5,
        perturbation: StrongPerturbation = default_perturbation(),
        erase_prob: float = 0.9,
        erase_area: tuple[float, float] = (0.02, 0.2),
        unlabeled_updates_bn_statistics: bool = False,
        **kwargs: Any,
    ) -> None:
        if warmup_steps < 0 or consistency_rampup_steps < 0:
            raise ValueError("warmup_steps and consistency_rampup_steps must be >= 0")
        super().__init__(**kwargs)
        self.warmup_steps = warmup_steps
        self.consistency_weight = consistency_weight
        self.consistency_rampup_steps = consistency_rampup_steps
        self.pseudo_label_score = pseudo_label_score
        self.perturbation = perturbation
        self.erase_prob = erase_prob
        self.erase_area = tuple(erase_area)
        self.unlabeled_updates_bn_statistics = unlabeled_updates_bn_statistics

    def unlabeled_weight(self, step: int) -> float:
        """``w(t)``: 0 during warm-up, then the sigmoid ramp-up to ``consistency_weight``."""
        if step < self.warmup_steps:
            return 0.0
        return self.consistency_weight * sigmoid_rampup(step - self.warmup_steps, self.consistency_rampup_steps)

    def perturb(self, image: Tensor) -> Tensor:
        """One independently perturbed view of a ``(C, H, W)`` image (jitter + random erasing)."""
        x = self.perturbation(image.unsqueeze(0))
        if self.erase_prob > 0:
            x = random_erasing(x, p=self.erase_prob, area_range=self.erase_area, value=0.0)
        return x[0]

    @property
    def needs_foreground(self) -> bool:
        """Whether the method uses the teacher's foreground (then pseudo-label masks are predicted)."""
        return False

    def teacher_targets(self, images: Sequence[Tensor]) -> TeacherTargets:
        """Pseudo-labels, shared RoIs and the foreground from the teacher on the clean view."""
        return teacher_targets(self.ema_teacher, images, self.pseudo_label_score, self.needs_foreground)

    def view(self, model: nn.Module, images: Sequence[Tensor], targets: TeacherTargets) -> Any:
        """A perturbed view of ``images`` through ``model``'s transform (the teacher's frame)."""
        return perturbed_view(model, images, targets, self.perturb)

    def student_features(self, image_list: Any) -> dict[str, Tensor]:
        """The student's FPN features of a perturbed unlabeled view (with gradients)."""
        return backbone_features(self.student, image_list, self.unlabeled_updates_bn_statistics)

    def unlabeled_loss(self, images: Sequence[Tensor]) -> tuple[Tensor, dict[str, Any]]:
        """The method's unweighted unlabeled loss and values to log."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled = batch["labeled"]
        supervised, logs = self.supervised_loss(labeled)
        weight = self.unlabeled_weight(self.global_step)
        unlabeled = batch.get("unlabeled") or []
        loss = supervised
        if weight > 0 and unlabeled:
            term, extra = self.unlabeled_loss(unlabeled)
            loss = supervised + weight * term
            logs.update(extra)
            logs["train/L_unlabeled"] = term.detach()
        logs.update(
            {"train/loss": loss.detach(), "train/L_sup": supervised.detach(), "train/unlabeled_weight": weight}
        )
        self.log_train(logs, batch_size=len(labeled))
        return loss
