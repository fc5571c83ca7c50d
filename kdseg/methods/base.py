"""The semantic-segmentation bases: a U-Net student with volume-level evaluation, and the
teacher-student core.

Every U-Net method subclasses :class:`SegmentationMethod` (student only) or
:class:`TeacherStudentMethod` (student + EMA teacher) and writes its ``training_step`` (and, if
it has extra heads, ``configure_heads``); the optimizer, the construction order and the checks
come from :class:`~kdseg.methods.method.Method`, the per-volume metrics and result files from
:class:`~kdseg.evaluation.VolumeEvaluator`.

Train batches are ``{"labeled": {"image", "target", ...}, "unlabeled": {"image", ...}}`` (see
:mod:`kdseg.data.datamodule`); val/test/predict batches are whole volumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from kdseg.checkpoints import load_checkpoint
from kdseg.evaluation import VolumeEvaluator, format_summary_table, write_test_results
from kdseg.methods.method import EMATeacherMixin, Method, dataclass_hparam
from kdseg.metrics.distances import check_convention
from kdseg.networks.inference import predict_volume
from kdseg.networks.unet import NetworkOutput, SegmentationNetwork

__all__ = ["NetworkConfig", "SegmentationMethod", "TeacherStudentMethod"]


@dataclass(frozen=True)
class NetworkConfig:
    """The smp U-Net of student and teacher (see :class:`~kdseg.networks.unet.SegmentationNetwork`).

    ``encoder_weights: null`` trains from scratch offline; a ``.pt/.pth`` path loads a local
    encoder ``state_dict`` (nothing is downloaded).
    """

    encoder_name: str = "resnet18"
    encoder_weights: str | None = None
    in_channels: int = 1
    encoder_depth: int = 5
    decoder_channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])


class SegmentationMethod(Method):
    """A U-Net student trained by a subclass's ``training_step``; shared evaluation.

    Args:
        network: the U-Net (encoder, depth, decoder channels).
        num_classes: classes including background (the CLI links it from the data).
        scribble_ignore_index: scribble value of unannotated pixels (the CLI links it from the data).
        lr: initial SGD learning rate; decays as ``lr * (1 - t / T) ** poly_power`` over the run's
            optimizer steps (SSL4MIS / WSL4MIS schedule).
        momentum, weight_decay: SGD settings (0.9, 1e-4 in SSL4MIS).
        poly_power: exponent of the poly schedule.
        val_surface_metrics: also compute HD95/ASD at validation (slower; test always does).
        distance_convention: ``medpy`` (default): HD95 / ASD are ``medpy.metric.binary.hd95`` /
            ``asd`` on each 3D volume in voxel units, without the voxel spacing, as SSL4MIS /
            WSL4MIS ``code/test_2D_fully.py`` compute the papers' numbers; ``monai``: kdseg's
            earlier MONAI definitions, in mm when the data carry a spacing (see
            :mod:`kdseg.metrics.distances`). A value given to ``kdseg test --ckpt_path`` wins over
            the checkpoint's (``kdseg.cli.KdsegCLI._parse_ckpt_path``).
        eval_slice_batch_size: slices per forward pass when segmenting a volume.
        init_weights_from: a checkpoint of an earlier run (e.g. the previous stage of a multi-stage
            method) whose matching weights initialise this one at the start of ``fit``; heads
            that only this method has keep their fresh initialisation. Unlike ``--ckpt_path`` it
            restores no optimizer state or step.
    """

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

    def load_weights_from(self, path: str | Path) -> None:
        """Copies every tensor of the checkpoint's ``state_dict`` whose name and shape match.

        Raises:
            FileNotFoundError: no such checkpoint.
            CheckpointError: not a checkpoint, or one holding more than tensors and plain values.
            ValueError: the checkpoint has no weights for the student's U-Net.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: init_weights_from names no checkpoint file")
        state = load_checkpoint(path).get("state_dict", {})  # weights_only: a shared file runs no code
        own = self.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not any(k.startswith("student.unet.") for k in matched):
            raise ValueError(f"{path}: no student U-Net weights of this architecture in the checkpoint")
        if hasattr(self, "ema_teacher") and not any(k.startswith("ema_teacher.") for k in matched):
            # An earlier student-only run: its student also initialises the teacher.
            matched.update({
                "ema_teacher." + k[len("student."):]: v for k, v in matched.items()
                if k.startswith("student.") and "ema_teacher." + k[len("student."):] in own
            })
        self.load_state_dict(matched, strict=False)
        rank_zero_info(f"initialised {len(matched)} of {len(own)} tensors from {path}")

    # -- evaluation ------------------------------------------------------------------------------
    def _predict(self, batch: dict[str, Any]) -> Tensor:
        return predict_volume(
            self.inference_network(), batch["image"], batch["input_size"], self.hparams.eval_slice_batch_size
        )

    def _evaluate_volume(self, batch: dict[str, Any], surface: bool) -> dict[str, Any]:
        return self.evaluator.score(self._predict(batch), batch, surface)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.add(self._evaluate_volume(batch, surface=self.hparams.val_surface_metrics))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.evaluator.add(self._evaluate_volume(batch, surface=True))

    def _class_names(self) -> dict[int, str] | None:
        return getattr(getattr(self.trainer, "datamodule", None), "class_names", None)

    def on_validation_epoch_end(self) -> None:
        rows = self.evaluator.gathered()
        if not rows:
            return
        summary = self.evaluator.summary(rows, self._class_names())
        for metric in ("dice", "hd95", "asd") if self.hparams.val_surface_metrics else ("dice",):
            self.log(f"val/{metric}_mean", summary["mean"][metric], prog_bar=metric == "dice")
            for name, values in summary["per_class"].items():
                self.log(f"val/{metric}_{name}", values[f"{metric}_mean"])

    def on_test_epoch_end(self) -> None:
        rows = self.evaluator.gathered()
        if not rows:
            return
        summary = self.evaluator.summary(rows, self._class_names())
        summary["method"] = type(self).__name__
        summary["checkpoint"] = getattr(self.trainer, "ckpt_path", None)
        for name, values in summary["per_class"].items():
            for metric in ("dice", "hd95", "asd"):
                self.log(f"test/{metric}_{name}", values[f"{metric}_mean"])
        for metric in ("dice", "hd95", "asd"):
            self.log(f"test/{metric}_mean", summary["mean"][metric])
        if self.trainer.is_global_zero:
            write_test_results(
                self.results_dir(), summary,
                lambda path: self.evaluator.write_cases(path, rows, summary["class_names"]),
                format_summary_table(summary),
            )

    # -- prediction ------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return {
            "case_id": batch["case_id"],
            "index": batch["index"],
            "prediction": self._predict(batch).to(torch.uint8).cpu().numpy(),
        }


class TeacherStudentMethod(EMATeacherMixin, SegmentationMethod):
    """The teacher-student core: a U-Net student and an EMA teacher of the same architecture
    (see :class:`~kdseg.methods.method.EMATeacherMixin`), a deep copy of the student made after
    the method's :meth:`configure_heads`, so both have the same modules.

    Args:
        ema_decay: EMA decay after warm-up.
        eval_network: ``student`` (what SSL4MIS reports) or ``teacher``.
        (other arguments: see :class:`SegmentationMethod`)
    """

    def __init__(self, ema_decay: float = 0.99, eval_network: str = "student", **kwargs: Any) -> None:
        super().__init__(**kwargs)
