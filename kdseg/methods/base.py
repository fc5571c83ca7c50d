"""The semantic-segmentation bases: :class:`SegmentationMethod` (a U-Net student, per-volume
evaluation by :class:`~kdseg.evaluation.VolumeEvaluator`) and :class:`TeacherStudentMethod` (with
the EMA teacher). A method writes ``training_step`` and, with extra heads, ``configure_heads``.

Train batches are ``{"labeled": {"image", "target", ...}, "unlabeled": {"image", ...}}`` (see
:mod:`kdseg.data.datamodule`); val/test/predict batches are whole volumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from kdseg.checkpoints import load_matching_weights
from kdseg.evaluation import VolumeEvaluator, format_summary_table
from kdseg.methods.method import EMATeacherMixin, Method, dataclass_hparam
from kdseg.metrics.distances import check_convention
from kdseg.networks.inference import predict_volume
from kdseg.networks.unet import NetworkOutput, SegmentationNetwork

__all__ = ["NetworkConfig", "SegmentationMethod", "TeacherStudentMethod"]


@dataclass(frozen=True)
class NetworkConfig:
    """The smp U-Net (:class:`~kdseg.networks.unet.SegmentationNetwork`); ``encoder_weights``:
    null (from scratch) or a local ``.pt/.pth`` encoder ``state_dict`` (nothing is downloaded)."""

    encoder_name: str = "resnet18"
    encoder_weights: str | None = None
    in_channels: int = 1
    encoder_depth: int = 5
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])


class SegmentationMethod(Method):
    """A U-Net student trained by a subclass's ``training_step``.

    Args:
        network: the U-Net (encoder, depth, decoder channels).
        num_classes: classes including background (the CLI links it from the data).
        scribble_ignore_index: scribble value of unannotated pixels (the CLI links it from the data).
        lr: initial SGD learning rate; decays as ``lr * (1 - t / T) ** poly_power`` over the run's
            optimizer steps (SSL4MIS / WSL4MIS schedule).
        momentum, weight_decay: SGD settings (0.9, 1e-4 in SSL4MIS).
        poly_power: exponent of the poly schedule.
        val_surface_metrics: also compute HD95/ASD at validation (slower; test always does).
        distance_convention: ``medpy``: HD95 / ASD per 3D volume in voxel units, as SSL4MIS /
            WSL4MIS compute the papers' numbers; ``monai``: in mm when the data carry a spacing
            (:mod:`kdseg.metrics.distances`). ``kdseg test --ckpt_path`` may override it.
        eval_slice_batch_size: slices per forward pass when segmenting a volume.
        init_weights_from: a checkpoint of an earlier run (e.g. a previous stage) whose matching
            weights initialise this one at ``fit`` start (:func:`~kdseg.checkpoints.load_matching_weights`).
        channels_last: keep the networks' 4-D weights (and so their activations) in channels-last
            memory order; the values are the same to float rounding. Single-channel images need
            no conversion: both orders store them alike. Speed per CPU: ``make bench --variants``.
    """

    progress_bar_metrics = ("val/dice_mean",)
    unlabeled_hint = (
        "trains on unlabeled data: set data.labeled_patients below the number of "
        "train patients and data.unlabeled_batch_size > 0"
    )

    def __init__(
        self,
        network: NetworkConfig = NetworkConfig(),
        num_classes: int = 4,
        scribble_ignore_index: int = 4,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        val_surface_metrics: bool = False,
        distance_convention: Literal["medpy", "monai"] = "medpy",
        eval_slice_batch_size: int = 16,
        init_weights_from: str | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()

    def configure_models(self) -> None:
        hp = self.hparams
        self.distance_convention = check_convention(hp.distance_convention)
        self.network_config = network = dataclass_hparam(NetworkConfig, hp.network)
        self.num_classes = hp.num_classes
        self.scribble_ignore_index = hp.scribble_ignore_index
        self.student = SegmentationNetwork(
            encoder_name=network.encoder_name,
            encoder_weights=network.encoder_weights,
            in_channels=network.in_channels,
            num_classes=hp.num_classes,
            encoder_depth=network.encoder_depth,
            decoder_channels=tuple(network.decoder_channels),
        )
        self.evaluator = VolumeEvaluator(self.num_classes, self.distance_convention)

    def forward(self, image: Tensor) -> NetworkOutput:
        return self.student(image)

    # -- initialisation from an earlier run ------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.init_weights_from:
            self.load_weights_from(self.hparams.init_weights_from)
        if self.hparams.get("channels_last", False):
            self.to(memory_format=torch.channels_last)

    def load_weights_from(self, path: str | Path) -> None:
        load_matching_weights(self, path)

    # -- evaluation ------------------------------------------------------------------------------
    def _predict(self, batch: dict[str, Any]) -> Tensor:
        return predict_volume(
            self.inference_network(), batch["image"], batch["input_size"], self.hparams.eval_slice_batch_size
        )

    def _evaluate_volume(self, batch: dict[str, Any], surface: bool) -> dict[str, Any]:
        return self.evaluator.score(self._predict(batch), batch, surface)

    def evaluate_batch(self, batch: dict[str, Any], stage: str) -> None:
        self.evaluator.add(self._evaluate_volume(batch, surface=self._surface(stage)))

    def _surface(self, stage: str) -> bool:
        return stage == "test" or self.hparams.val_surface_metrics

    def summarise(self, rows: list[dict[str, Any]], stage: str) -> tuple[dict[str, float], tuple[Any, ...] | None]:
        class_names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        summary = self.evaluator.summary(rows, class_names)
        metrics = {}
        for metric in ("dice", "hd95", "asd") if self._surface(stage) else ("dice",):
            metrics[f"{metric}_mean"] = summary["mean"][metric]
            for name, values in summary["per_class"].items():
                metrics[f"{metric}_{name}"] = values[f"{metric}_mean"]
        if stage != "test":
            return metrics, None
        summary["method"] = type(self).__name__
        summary["checkpoint"] = getattr(self.trainer, "ckpt_path", None)
        write_cases = lambda path: self.evaluator.write_cases(path, rows, summary["class_names"])  # noqa: E731
        return metrics, (summary, write_cases, format_summary_table(summary))

    # -- prediction ------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {
            "case_id": batch["case_id"],
            "index": batch["index"],
            "prediction": self._predict(batch).to(torch.uint8).cpu().numpy(),
        }


class TeacherStudentMethod(EMATeacherMixin, SegmentationMethod):
    """A U-Net student and its EMA teacher (:class:`~kdseg.methods.method.EMATeacherMixin`).

    Args:
        ema_decay: EMA decay after warm-up.
        eval_network: ``student`` (what SSL4MIS reports) or ``teacher``.
        (other arguments: see :class:`SegmentationMethod`)
    """

    def __init__(self, ema_decay: float = 0.99, eval_network: str = "student", **kwargs: Any) -> None:
        super().__init__(**kwargs)
