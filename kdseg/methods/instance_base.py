"""The instance-segmentation bases: a Mask R-CNN student with per-image evaluation, and the
teacher-student core with its supervised warm-up.

The semantic methods (:mod:`kdseg.methods.base`) share their base with this family
(:class:`~kdseg.methods.method.Method`: construction hooks, optimizer, checks) and the EMA
teacher. Here the network is torchvision's :class:`~torchvision.models.detection.MaskRCNN` built
by :func:`~kdseg.networks.mask_rcnn.build_mask_rcnn`, the metrics are those of
:class:`~kdseg.evaluation.InstanceEvaluator`, and predictions are written by
:class:`~kdseg.callbacks.instance_prediction_writer.InstancePredictionWriter`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from kdseg.callbacks.instance_prediction_writer import InstancePredictionWriter
from kdseg.callbacks.prediction_writer import VolumePredictionWriter
from kdseg.data.augment import StrongPerturbation, random_erasing
from kdseg.distributed import distributed_ready
from kdseg.evaluation import InstanceEvaluator, write_test_results
from kdseg.evaluation.instance import format_instance_table, json_safe
from kdseg.methods.method import EMATeacherMixin, Method, dataclass_hparam
from kdseg.networks.mask_rcnn import (
    DetectorConfig,
    TeacherTargets,
    build_mask_rcnn,
    frozen_batchnorm_statistics,
    preprocess,
    teacher_targets,
    to_rgb,
)
from kdseg.schedules import sigmoid_rampup

__all__ = ["InstanceSegmentationMethod", "InstanceTeacherStudentMethod", "default_perturbation"]

DEFAULT_CLASS_NAMES: dict[int, str] = {1: "cytoplasm", 2: "nucleus"}


class InstanceSegmentationMethod(Method):
    """A Mask R-CNN student trained by a subclass's ``training_step``; shared evaluation.

    Batches come from :class:`~kdseg.data.instance_datamodule.CervicalCellDataModule`.
    Validation logs ``val/<metric>_<class>`` and ``val/<metric>_mean`` for ``aji``,
    ``aji_gated``, ``f1``, ``dice``, ``map``, ``ap50``, ``ap75`` (see
    :class:`~kdseg.metrics.instance.InstanceMetricAccumulator`); checkpoints monitor
    ``val/aji_mean``. Evaluation runs on every rank's images and gathers them before computing.

    Args:
        detector: the Mask R-CNN (see :class:`~kdseg.networks.mask_rcnn.DetectorConfig`).
        num_classes: classes including background (3; the CLI links it from the data).
        optimizer: ``sgd`` (momentum) or ``adamw``.
        lr, momentum, weight_decay: optimizer settings (MMT-PSM's public code: SGD, lr 0.005 for
            4 images, momentum 0.9, weight decay 1e-4).
        lr_warmup_steps, lr_warmup_factor: linear learning-rate warm-up from ``lr *
            lr_warmup_factor`` (maskrcnn-benchmark's defaults, kept by MMT-PSM: 500 steps from 1/3).
        poly_power: after warm-up the rate decays as ``(1 - t / T) ** poly_power``. Departure: the
            MMT-PSM config divides it by 10 at step 5000 of 7000; one poly schedule for every
            kdseg method keeps the supervised and semi-supervised detectors apart only by their losses.
        (Sources, and gradient clipping: ``experiments/results/notes/mmt_psm.md``.)
        eval_score_threshold: detections used for AJI / F1 / Dice (mAP ranks all).
        predict_score_threshold: detections written by ``predict``.
        predict_dir: where ``predict`` writes; None = the CLI's
            ``--prediction_writer.output_dir`` (default ``predictions``).
    """

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

    # -- checks ----------------------------------------------------------------------------------
    def class_names(self) -> dict[int, str]:
        names = getattr(getattr(self._trainer, "datamodule", None), "class_names", None) if self._trainer else None
        return dict(names) if names else dict(DEFAULT_CLASS_NAMES)

    # -- callbacks -------------------------------------------------------------------------------
    def prediction_output_dir(self) -> str | Path:
        if self.hparams.predict_dir:
            return self.hparams.predict_dir
        trainer = self._trainer
        for callback in getattr(trainer, "callbacks", []) if trainer is not None else []:
            if isinstance(callback, VolumePredictionWriter):
                return callback.output_dir
        return "predictions"

    def configure_callbacks(self) -> list[pl.Callback]:
        return [InstancePredictionWriter(self.prediction_output_dir())]

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate_batch(self, batch: Sequence[tuple[Tensor, dict[str, Tensor], str]]) -> None:
        self.evaluator.add_batch(self([item[0] for item in batch]), batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def _accumulate(self):  # type: ignore[no-untyped-def]
        return self.evaluator.accumulate(
            self.class_names(),
            score_threshold=self.hparams.eval_score_threshold,
            max_detections=max(100, self.detector_config.box_detections_per_img),
        )

    def on_validation_epoch_end(self) -> None:
        if not self.evaluator.rows and not distributed_ready():
            return
        summary = self._accumulate().compute()
        for key, value in summary.items():
            if key != "num_images":
                self.log(f"val/{key}", float(value), prog_bar=key in ("aji_mean", "map_mean"), sync_dist=False)

    def on_test_epoch_end(self) -> None:
        if not self.evaluator.rows and not distributed_ready():
            return
        accumulator = self._accumulate()
        summary = accumulator.compute()
        for key, value in summary.items():
            if key != "num_images":
                self.log(f"test/{key}", float(value), sync_dist=False)
        if self.trainer.is_global_zero:
            datamodule = getattr(self.trainer, "datamodule", None)
            content = {
                "method": type(self).__name__,
                "checkpoint": getattr(self.trainer, "ckpt_path", None),
                "data": getattr(datamodule, "source_name", None),
                "num_images": int(summary["num_images"]),
                "class_names": {int(k): v for k, v in self.class_names().items()},
                "score_threshold": self.hparams.eval_score_threshold,
                # The size the metrics were scored at: native unless the data module says otherwise.
                "image_size": getattr(datamodule, "image_size", None),
                "eval_native_size": bool(getattr(datamodule, "eval_native_size", True)),
                "metrics": {k: json_safe(float(v)) for k, v in summary.items() if k != "num_images"},
            }
            write_test_results(
                self.results_dir(), content, accumulator.write_csv, format_instance_table(summary, self.class_names())
            )

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
    """A Mask R-CNN student and its EMA teacher; unlabeled losses after a supervised warm-up.

    The teacher (:class:`~kdseg.methods.method.EMATeacherMixin`) is a deep copy of the student
    made after the method's :meth:`configure_heads`.

    Warm-up: for ``global_step < warmup_steps`` only the supervised losses are computed (no
    teacher forward at all). The EMA runs from the first step with its usual warm-up decay
    ``min(1 - 1/(t+1), decay)``, so when the unlabeled losses start the teacher is already the
    0.99-average of the recent students (the public code restarts the EMA 10 steps before; with a
    warm-up of >= 100 steps the difference is the EMA of a longer history, nothing else).

    Loss: ``L = L_sup + w(t) * L_unlabeled`` with ``w(t) = consistency_weight *
    sigmoid_rampup(t - warmup_steps, consistency_rampup_steps)`` after warm-up, 0 before.

    Every unlabeled image is seen by the teacher unperturbed (its detections with score >=
    ``pseudo_label_score``, after the detector's per-class NMS, are the pseudo-labels) and in
    perturbed views: ``perturbation`` (photometric, per view) then random erasing with
    probability ``erase_prob`` of a box covering ``erase_area`` of the image.

    BatchNorm statistics: the student's forward on its perturbed unlabeled view normalises with
    that batch's statistics but, by default, does not update the running statistics that
    evaluation (and, through the EMA, the teacher) uses: updating them collapsed the validation
    AJI on ISBI 2014 from scratch (measurements: ``experiments/results/notes/mmt_psm.md``). The
    public code's detector freezes the BatchNorm of its pretrained ResNet-50 (as
    :func:`~kdseg.networks.mask_rcnn.build_mask_rcnn` does with pretrained weights).

    Args:
        ema_decay: EMA decay after its warm-up (0.99 in MMT-PSM).
        eval_network: ``student`` or ``teacher`` at validation / test / predict.
        warmup_steps: supervised-only steps (MMT-PSM: 1000).
        consistency_weight: final weight of the unlabeled losses (MMT-PSM's lambda, 5).
        consistency_rampup_steps: sigmoid ramp-up length after warm-up (MMT-PSM: 250).
        pseudo_label_score: teacher detections kept as pseudo-labels.
        perturbation: photometric jitter of each perturbed view.
        erase_prob, erase_area: random erasing of each perturbed view.
        unlabeled_updates_bn_statistics: let the student's perturbed unlabeled forward update its
            BatchNorm running statistics (off: see above; on only to reproduce the collapse).
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

    def perturb(self, images: Sequence[Tensor]) -> list[Tensor]:
        """One independently perturbed view of each image (photometric jitter + random erasing)."""
        out = []
        for image in images:
            x = self.perturbation(image.unsqueeze(0))
            if self.erase_prob > 0:
                x = random_erasing(x, p=self.erase_prob, area_range=self.erase_area, value=0.0)
            out.append(x[0])
        return out

    @property
    def needs_foreground(self) -> bool:
        """Whether the method uses the teacher's foreground (then pseudo-label masks are predicted)."""
        return False

    def teacher_targets(self, images: Sequence[Tensor]) -> TeacherTargets:
        """Pseudo-labels, shared RoIs and the foreground from the teacher on the clean view."""
        return teacher_targets(self.ema_teacher, images, self.pseudo_label_score, self.needs_foreground)

    def view(self, model: nn.Module, images: Sequence[Tensor], targets: TeacherTargets) -> Any:
        """A perturbed view of ``images`` through ``model``'s transform (same frame as the teacher's)."""
        image_list, _ = preprocess(model, self.perturb(images))
        if tuple(image_list.tensors.shape[-2:]) != targets.padded_size:
            raise RuntimeError("perturbed views must have the clean view's input frame (use one detector.min_size)")
        return image_list

    def student_features(self, image_list: Any) -> dict[str, Tensor]:
        """The student's FPN features of a perturbed unlabeled view (with gradients).

        Unless ``unlabeled_updates_bn_statistics``, the student's BatchNorm running statistics
        are not updated by this forward (see the class docstring for why).
        """
        if self.unlabeled_updates_bn_statistics:
            return self.student.backbone(image_list.tensors)
        with frozen_batchnorm_statistics(self.student):
            return self.student.backbone(image_list.tensors)

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
