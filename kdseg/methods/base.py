"""Base LightningModules: a student with volume-level evaluation, and the teacher-student core.

Every method subclasses :class:`SegmentationMethod` (student only) or
:class:`TeacherStudentMethod` (student + EMA teacher) and writes only its ``training_step``; the
optimizer, the per-volume validation / test metrics, the results files and prediction are shared.

Train batches are ``{"labeled": {"image", "target", ...}, "unlabeled": {"image", ...}}`` (see
:mod:`kdseg.data.datamodule`); val/test/predict batches are whole volumes.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from kdseg.callbacks.ema import EMATeacher
from kdseg.callbacks.run_dir import run_dir
from kdseg.checkpoints import load_checkpoint
from kdseg.metrics.distances import check_convention
from kdseg.metrics.segmentation import distance_unit, summarize, volume_metrics
from kdseg.networks.inference import predict_volume
from kdseg.networks.unet import NetworkOutput, SegmentationNetwork

# The EMA teacher is in eval mode on purpose (see TeacherStudentMethod); Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


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


def next_free_path(path: Path) -> Path:
    """``path`` if it does not exist, else ``stem-1.suffix``, ``stem-2.suffix``, ...: results are
    never overwritten."""
    if not path.exists():
        return path
    for i in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"{path}: too many earlier results beside it")


class SegmentationMethod(pl.LightningModule):
    """A student network trained by a subclass's ``training_step``; shared evaluation.

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
            :mod:`kdseg.metrics.distances`). Not saved in checkpoints: ``kdseg test`` takes it
            from its own config / command line.
        eval_slice_batch_size: slices per forward pass when segmenting a volume.
        init_weights_from: a checkpoint of an earlier run (e.g. the previous stage of a multi-stage
            method) whose matching weights initialise this one at the start of ``fit``; heads
            that only this method has keep their fresh initialisation. Unlike ``--ckpt_path`` it
            restores no optimizer state or step.
    """

    #: whether ``training_step`` needs the unlabeled stream.
    uses_unlabeled: bool = False
    #: ``"dense"``, ``"scribble"`` or None (any).
    required_supervision: str | None = None

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
        # distance_convention is saved like every argument: a value given to `kdseg test --ckpt_path`
        # still wins over the checkpoint's (kdseg.cli.KdsegCLI._parse_ckpt_path).
        self.save_hyperparameters()
        self.distance_convention = check_convention(distance_convention)
        self.network_config = network
        self.num_classes = num_classes
        self.scribble_ignore_index = scribble_ignore_index
        self.student = SegmentationNetwork(
            encoder_name=network.encoder_name,
            encoder_weights=network.encoder_weights,
            in_channels=network.in_channels,
            num_classes=num_classes,
            encoder_depth=network.encoder_depth,
            decoder_channels=tuple(network.decoder_channels),
        )
        self._eval_rows: list[dict[str, Any]] = []

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, image: Tensor) -> NetworkOutput:
        return self.student(image)

    def inference_network(self) -> nn.Module:
        """The network evaluated at validation / test / predict."""
        return self.student

    # -- initialisation from an earlier run --------------------------------------------------------
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

    # -- checks before training ------------------------------------------------------------------
    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        method = type(self).__name__
        supervision = getattr(datamodule, "supervision", None)
        if self.required_supervision and supervision != self.required_supervision:
            raise ValueError(
                f"{method} needs data.supervision={self.required_supervision!r}, got {supervision!r}"
            )
        if self.uses_unlabeled and not getattr(datamodule, "has_unlabeled", False):
            raise ValueError(
                f"{method} trains on unlabeled data: set data.labeled_patients below the number of "
                "train patients and data.unlabeled_batch_size > 0"
            )

    # -- optimisation ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything with ``requires_grad`` outside the EMA teacher."""
        return [
            p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("ema_teacher.")
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(
            self.trainable_parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        power = self.hparams.poly_power
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(1.0 - step / total_steps, 0.0) ** power
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ------------------------------------------------------------------------------------
    def _evaluate_volume(self, batch: dict[str, Any], surface: bool) -> dict[str, Any]:
        prediction = predict_volume(
            self.inference_network(), batch["image"], batch["input_size"], self.hparams.eval_slice_batch_size
        )
        convention = self.distance_convention
        spacing = batch["spacing"].tolist()
        # The papers' medpy calls pass no voxelspacing: their distances are in voxel steps.
        if convention == "medpy" or any(math.isnan(s) for s in spacing):
            spacing = None
        else:
            spacing = tuple(spacing)
        per_class = volume_metrics(
            prediction.cpu().numpy(), batch["label"].cpu().numpy(), self.num_classes, spacing,
            surface=surface, convention=convention,
        )
        return {
            "case_id": batch["case_id"],
            "spacing": spacing,
            "metrics": {c: asdict(m) for c, m in per_class.items()},
        }

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_rows.append(self._evaluate_volume(batch, surface=self.hparams.val_surface_metrics))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_rows.append(self._evaluate_volume(batch, surface=True))

    def on_validation_epoch_start(self) -> None:
        self._eval_rows = []

    def on_test_epoch_start(self) -> None:
        self._eval_rows = []

    def _gathered_rows(self) -> list[dict[str, Any]]:
        """Rows of every rank, one per volume (DistributedSampler pads with repeats: deduplicated)."""
        rows = self._eval_rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        unique = {row["case_id"]: row for row in rows}
        return [unique[k] for k in sorted(unique)]

    def _summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        from kdseg.metrics.segmentation import ClassMetrics

        class_names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None) or {
            c: f"class{c}" for c in range(1, self.num_classes)
        }
        per_case = [{int(c): ClassMetrics(**m) for c, m in row["metrics"].items()} for row in rows]
        summary = summarize(per_case, class_names)
        spacings = [row["spacing"] for row in rows]
        summary["distance_unit"] = "pixel" if any(s is None for s in spacings) else distance_unit(spacings[0])
        summary["distance_convention"] = self.distance_convention
        summary["class_names"] = {int(c): n for c, n in class_names.items() if 0 < int(c) < self.num_classes}
        return summary

    def on_validation_epoch_end(self) -> None:
        rows = self._gathered_rows()
        if not rows:
            return
        summary = self._summary(rows)
        for metric in ("dice", "hd95", "asd") if self.hparams.val_surface_metrics else ("dice",):
            self.log(f"val/{metric}_mean", summary["mean"][metric], prog_bar=metric == "dice")
            for name, values in summary["per_class"].items():
                self.log(f"val/{metric}_{name}", values[f"{metric}_mean"])

    def on_test_epoch_end(self) -> None:
        rows = self._gathered_rows()
        if not rows:
            return
        summary = self._summary(rows)
        summary["method"] = type(self).__name__
        summary["checkpoint"] = getattr(self.trainer, "ckpt_path", None)
        for name, values in summary["per_class"].items():
            for metric in ("dice", "hd95", "asd"):
                self.log(f"test/{metric}_{name}", values[f"{metric}_mean"])
        for metric in ("dice", "hd95", "asd"):
            self.log(f"test/{metric}_mean", summary["mean"][metric])
        if self.trainer.is_global_zero:
            self._write_test_results(summary, rows)

    def results_dir(self) -> Path:
        """The run directory: the logger's version folder, or ``default_root_dir`` without one."""
        directory = run_dir(self.trainer)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def _write_test_results(self, summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        directory = self.results_dir()
        json_path = next_free_path(directory / "test_metrics.json")
        json_path.write_text(json.dumps(summary, indent=2))
        csv_path = next_free_path(directory / "test_cases.csv")
        class_names = summary["class_names"]
        with csv_path.open("w", newline="") as f:
            writer = csv.writer(f)
            header = ["case_id"]
            for c, name in class_names.items():
                header += [f"dice_{name}", f"hd95_{name}", f"asd_{name}", f"status_{name}"]
            writer.writerow(header)
            for row in rows:
                line = [row["case_id"]]
                for c in class_names:
                    m = row["metrics"][c]
                    line += [f"{m['dice']:.6f}", f"{m['hd95']:.6f}", f"{m['asd']:.6f}", m["status"]]
                writer.writerow(line)
        rank_zero_info(format_summary_table(summary))
        rank_zero_info(f"wrote {json_path} and {csv_path}")

    # -- prediction --------------------------------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        prediction = predict_volume(
            self.inference_network(), batch["image"], batch["input_size"], self.hparams.eval_slice_batch_size
        )
        return {
            "case_id": batch["case_id"],
            "index": batch["index"],
            "prediction": prediction.to(torch.uint8).cpu().numpy(),
        }


def format_summary_table(summary: dict[str, Any]) -> str:
    """A plain-text table of per-class and mean Dice / HD95 / ASD (mean +- std over volumes)."""
    unit = ", ".join(v for v in (summary.get("distance_convention"), summary.get("distance_unit")) if v)
    lines = [
        f"{'class':<8} {'Dice':>16} {'HD95 (' + unit + ')':>20} {'ASD (' + unit + ')':>20} {'missed':>7}",
    ]
    for name, values in summary["per_class"].items():
        cells = [f"{values[m + '_mean']:.4f} +- {values[m + '_std']:.4f}" for m in ("dice", "hd95", "asd")]
        lines.append(f"{name:<8} {cells[0]:>16} {cells[1]:>20} {cells[2]:>20} {values['missed']:>7}")
    mean = [f"{summary['mean'][m]:.4f}" for m in ("dice", "hd95", "asd")]
    lines.append(f"{'mean':<8} {mean[0]:>16} {mean[1]:>20} {mean[2]:>20} {summary['missed']:>7}")
    return "\n".join(lines)


class EMATeacherMixin:
    """The EMA-teacher mechanics shared by every teacher-student method, semantic or instance.

    :meth:`init_ema_teacher` deep-copies ``self.student`` (after the method's heads are added)
    into ``self.ema_teacher``, which never receives gradients and stays in eval mode; the
    :class:`~kdseg.callbacks.ema.EMATeacher` callback is added by :meth:`configure_callbacks`, so
    no config can forget it; ``eval_network`` picks the network evaluated.
    """

    def init_ema_teacher(self, ema_decay: float, eval_network: str) -> None:
        if eval_network not in ("student", "teacher"):
            raise ValueError(f"eval_network must be 'student' or 'teacher', got {eval_network!r}")
        self.ema_decay = ema_decay
        self.eval_network = eval_network
        self.ema_teacher = copy.deepcopy(self.student)
        self.ema_teacher.requires_grad_(False)
        self.ema_teacher.eval()

    def configure_callbacks(self) -> list[pl.Callback]:
        return [*super().configure_callbacks(), EMATeacher(decay=self.ema_decay)]

    def train(self, mode: bool = True):  # type: ignore[no-untyped-def]
        super().train(mode)
        self.ema_teacher.eval()  # Lightning switches every submodule to train mode: not the teacher
        return self

    def inference_network(self) -> nn.Module:
        return self.ema_teacher if self.eval_network == "teacher" else self.student


class TeacherStudentMethod(EMATeacherMixin, SegmentationMethod):
    """The teacher-student core: a student and an EMA teacher of the same architecture.

    The teacher is a deep copy of the student made after the method has added its heads
    (:meth:`add_heads`), so both have the same modules. It never receives gradients
    (``requires_grad=False``, excluded from the optimizer), stays in eval mode, and is updated
    by the :class:`~kdseg.callbacks.ema.EMATeacher` callback that the method adds itself. It is a
    submodule, so checkpoints hold it and ``--ckpt_path`` resumes it exactly.

    Args:
        ema_decay: EMA decay after warm-up.
        eval_network: ``student`` (what SSL4MIS reports) or ``teacher``.
        (other arguments: see :class:`SegmentationMethod`)
    """

    def __init__(self, ema_decay: float = 0.99, eval_network: str = "student", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_heads(self.student)
        self.init_ema_teacher(ema_decay, eval_network)

    def add_heads(self, network: SegmentationNetwork) -> None:
        """Hook: register the method's extra heads on the student (the teacher copies them)."""

    @torch.no_grad()
    def teacher_forward(self, image: Tensor) -> NetworkOutput:
        """The teacher's output, computed without a graph."""
        return self.ema_teacher(image)
