"""Base LightningModules of the instance-segmentation family (Mask R-CNN students).

The semantic-segmentation methods (:mod:`kdseg.methods.base`) share their conventions with this
family: a ``student`` network, an optional EMA ``ema_teacher`` updated by
:class:`~kdseg.callbacks.ema.EMATeacher`, results written into the run folder and never
overwritten. Here the network is torchvision's :class:`~torchvision.models.detection.MaskRCNN`
and the metrics are the instance metrics of :mod:`kdseg.metrics.instance`.

- :class:`DetectorConfig` / :func:`build_mask_rcnn`: a ResNet-FPN Mask R-CNN built from scratch
  or from *local* weight files (nothing is ever downloaded). ``resnet50`` is the public MMT-PSM
  code's backbone (its maskrcnn-benchmark config, R-50-FPN); ``resnet18`` with narrow heads is the light one for CPUs.
- Helpers that run parts of a Mask R-CNN by hand, for methods that need RoI logits of given
  RoIs or FPN features: :func:`to_rgb`, :func:`preprocess`, :func:`detect_in_input_frame`,
  :func:`sample_shared_rois`, :func:`roi_class_logits` (also for flipped views),
  :func:`hflip_boxes`, :func:`paste_foreground`.
- :class:`InstanceSegmentationMethod`: the student, optimizer, validation / test with
  :class:`~kdseg.metrics.instance.InstanceMetricAccumulator` (``val/aji_mean``,
  ``val/map_mean``, ...; test writes ``test_metrics.json`` and ``test_cases.csv``), prediction.
- :class:`InstanceTeacherStudentMethod`: adds the EMA teacher, the supervised warm-up and the
  ramped weight of the unlabeled losses; subclasses write :meth:`unlabeled_loss`.
- :class:`InstancePredictionWriter`: writes ``<image_id>.npz`` (masks, labels, scores, boxes)
  and ``<image_id>_overlay.png`` per predicted image, refusing to overwrite.

Grayscale input: images are ``(1, H, W)`` in [0, 1] and are repeated to 3 channels
(:func:`to_rgb`) with ImageNet mean / std in the detector's transform. This keeps the standard
3-channel stem, so a locally stored ImageNet or COCO checkpoint loads unchanged; from scratch the
repetition costs nothing measurable.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from kdseg.callbacks.prediction_writer import VolumePredictionWriter
from kdseg.callbacks.run_dir import run_dir
from kdseg.checkpoints import load_checkpoint
from kdseg.data.augment import StrongPerturbation, random_erasing
from kdseg.losses.segmentation import sigmoid_rampup
from kdseg.methods.base import EMATeacherMixin, next_free_path
from kdseg.metrics.native_size import masks_to_size

# The EMA teacher stays in eval mode on purpose; Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")

DEFAULT_CLASS_NAMES: dict[int, str] = {1: "cytoplasm", 2: "nucleus"}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
#: FPN outputs of the ResNet-FPN built here: layer1..layer4 and the max-pooled extra level.
NUM_FPN_LEVELS = 5


# =========================================================================== the detector


@dataclass(frozen=True)
class DetectorConfig:
    """The Mask R-CNN of student and teacher.

    Attributes:
        backbone: ``resnet18`` / ``resnet34`` (light) or ``resnet50`` / ``resnet101`` (the public MMT-PSM code uses R-50-FPN), with FPN.
        weights: a local ``.pth`` / ``.pt`` state_dict of a whole Mask R-CNN (e.g. torchvision's
            COCO ``maskrcnn_resnet50_fpn`` file downloaded beforehand, or a ``.ckpt`` of an earlier
            kdseg run); tensors whose name and shape match are loaded, class-specific layers of
            another class count are skipped. None = from scratch.
        backbone_weights: a local ImageNet ``state_dict`` of the ResNet trunk.
        trainable_layers: trainable ResNet stages counted from the top (5 = all). With pretrained
            weights torchvision's convention is 3 (and frozen BatchNorm); from scratch use 5.
        fpn_channels: FPN width (256 in the public MMT-PSM code's maskrcnn-benchmark config; 64 is enough on a CPU).
        box_representation_size: width of the two-layer MLP box head (``MLP_HEAD_DIM`` 1024 in the public code's config).
        mask_head_channels: width of the four-conv mask head (256 in the public code's config).
        min_size, max_size: the detector's internal resize (shorter side, longer-side cap). Use
            the training image size to keep images at scale 1.
        anchor_sizes: one anchor size per FPN level (5 levels).
        aspect_ratios: anchor aspect ratios (the same on every level).
        rpn_post_nms_top_n_train, rpn_post_nms_top_n_test: RPN proposals kept.
        box_score_thresh, box_nms_thresh, box_detections_per_img: detection post-processing.
        box_batch_size_per_image: RoIs sampled per image for the box head (25 % positive).
        image_mean, image_std: normalisation of the 3-channel (repeated gray) input.
    """

    backbone: str = "resnet50"
    weights: str | None = None
    backbone_weights: str | None = None
    trainable_layers: int = 5
    fpn_channels: int = 256
    box_representation_size: int = 1024
    mask_head_channels: int = 256
    min_size: int = 512
    max_size: int = 1024
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_batch_size_per_image: int = 512
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


def _load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found (kdseg never downloads weights)")
    state = load_checkpoint(path)  # weights_only: a shared file runs no code
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state_dict")
    if any(k.startswith("student.") for k in state):  # a kdseg checkpoint: its student
        state = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    return state


def _load_matching(module: nn.Module, state: dict[str, Tensor], path: str | Path) -> int:
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(f"{path}: no tensor of this architecture in the file")
    module.load_state_dict(matched, strict=False)
    rank_zero_info(f"loaded {len(matched)} of {len(own)} tensors from {path}")
    return len(matched)


def build_mask_rcnn(config: DetectorConfig = DetectorConfig(), num_classes: int = 3) -> nn.Module:
    """A ResNet-FPN :class:`~torchvision.models.detection.MaskRCNN` (``weights=None`` always).

    From scratch the trunk uses ordinary BatchNorm (as torchvision does without weights); with
    local pretrained weights it uses frozen BatchNorm, torchvision's convention.

    Args:
        config: architecture and post-processing (see :class:`DetectorConfig`).
        num_classes: classes including background (3: background, cytoplasm, nucleus).
    """
    from torchvision.models import resnet
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    from torchvision.ops.misc import FrozenBatchNorm2d

    if config.backbone not in RESNETS:
        raise ValueError(f"detector.backbone must be one of {RESNETS}, got {config.backbone!r}")
    if len(config.anchor_sizes) != NUM_FPN_LEVELS:
        raise ValueError(
            f"detector.anchor_sizes needs one size per FPN level ({NUM_FPN_LEVELS}), got {config.anchor_sizes}"
        )
    if not 0 <= config.trainable_layers <= 5:
        raise ValueError(f"detector.trainable_layers must be in [0, 5], got {config.trainable_layers}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
    pretrained = bool(config.weights or config.backbone_weights)
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    trunk = getattr(resnet, config.backbone)(weights=None, norm_layer=norm_layer)
    if config.backbone_weights:
        _load_matching(trunk, _load_state_dict_file(config.backbone_weights), config.backbone_weights)
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][: config.trainable_layers]
    if config.trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in trunk.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    stage2 = trunk.inplanes // 8
    backbone = BackboneWithFPN(
        trunk,
        return_layers={f"layer{k}": str(k - 1) for k in range(1, 5)},
        in_channels_list=[stage2 * 2 ** (k - 1) for k in range(1, 5)],
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    anchors = AnchorGenerator(
        sizes=tuple((int(s),) for s in config.anchor_sizes),
        aspect_ratios=(tuple(float(r) for r in config.aspect_ratios),) * NUM_FPN_LEVELS,
    )
    c, rep, mc = config.fpn_channels, config.box_representation_size, config.mask_head_channels
    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=config.min_size,
        max_size=config.max_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(c, anchors.num_anchors_per_location()[0]),
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        box_head=TwoMLPHead(c * 7 * 7, rep),
        box_predictor=FastRCNNPredictor(rep, num_classes),
        box_score_thresh=config.box_score_thresh,
        box_nms_thresh=config.box_nms_thresh,
        box_detections_per_img=config.box_detections_per_img,
        box_batch_size_per_image=config.box_batch_size_per_image,
        mask_head=MaskRCNNHeads(c, [mc] * 4, 1),
        mask_predictor=MaskRCNNPredictor(mc, mc, num_classes),
    )
    if config.weights:
        _load_matching(model, _load_state_dict_file(config.weights), config.weights)
    return model


# =========================================================================== Mask R-CNN by hand


def to_rgb(images: Sequence[Tensor]) -> list[Tensor]:
    """``(1, H, W)`` grayscale images repeated to ``(3, H, W)``; 3-channel images pass through."""
    out = []
    for image in images:
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected (1, H, W) or (3, H, W) images, got shape {tuple(image.shape)}")
        out.append(image.expand(3, -1, -1) if image.shape[0] == 1 else image)
    return out


def preprocess(model: nn.Module, images: Sequence[Tensor], targets: list[dict[str, Tensor]] | None = None):
    """The detector's own transform (normalise, resize, pad to a batch): ``(ImageList, targets)``.

    Every later step (RPN, RoI heads, features) works in this *input frame*: resized, padded to
    ``image_list.tensors.shape[-2:]`` at the bottom / right.
    """
    return model.transform(to_rgb(images), targets)


@torch.no_grad()
def detect_in_input_frame(
    model: nn.Module, image_list: Any, features: dict[str, Tensor], min_score: float = 0.0, with_masks: bool = True
) -> tuple[list[dict[str, Tensor]], list[Tensor]]:
    """Eval-mode detection on an already transformed batch, without mapping back to the image.

    The RPN, the box branch and its post-processing (score threshold, per-class NMS, top
    detections) are torchvision's; detections below ``min_score`` are then dropped *before* the
    mask head, which runs only when ``with_masks`` (the pseudo-labels of a teacher need no mask
    unless their foreground is used).

    Args:
        model: a Mask R-CNN in eval mode (the EMA teacher).
        image_list: from :func:`preprocess`; features: ``model.backbone(image_list.tensors)``.
        min_score: detections kept.
        with_masks: also predict the masks.

    Returns:
        ``(detections, proposals)``: per image ``boxes`` (input frame), ``labels``, ``scores``
        and, with masks, ``masks`` ``(N, 1, 28, 28)`` probabilities in box coordinates; and the
        RPN proposals.
    """
    from torchvision.models.detection.roi_heads import maskrcnn_inference

    if model.training:
        raise RuntimeError("detect_in_input_frame needs the model in eval mode")
    heads = model.roi_heads
    sizes = list(image_list.image_sizes)
    proposals, _ = model.rpn(image_list, features)
    x = heads.box_head(heads.box_roi_pool(features, proposals, sizes))
    class_logits, box_regression = heads.box_predictor(x)
    boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals, sizes)
    detections = []
    for b, s, lab in zip(boxes, scores, labels):
        keep = s >= min_score
        detections.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
    if with_masks:
        kept_boxes = [d["boxes"] for d in detections]
        if sum(int(b.shape[0]) for b in kept_boxes):
            mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, kept_boxes, sizes)))
            probs = maskrcnn_inference(mask_logits, [d["labels"] for d in detections])
        else:
            probs = [b.new_zeros((0, 1, 28, 28)) for b in kept_boxes]
        for d, p in zip(detections, probs):
            d["masks"] = p
    return detections, proposals


def paste_foreground(detections: Sequence[dict[str, Tensor]], image_list: Any, threshold: float = 0.5) -> Tensor:
    """Union of the detections' masks pasted into the (padded) input frame: bool ``(B, H_p, W_p)``."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    tensors = image_list.tensors
    out = torch.zeros_like(tensors[:, 0], dtype=torch.bool)
    for i, (det, (h, w)) in enumerate(zip(detections, image_list.image_sizes)):
        if det["boxes"].numel() == 0:
            continue
        pasted = paste_masks_in_image(det["masks"], det["boxes"], (h, w))  # (N, 1, h, w)
        out[i, :h, :w] = (pasted[:, 0] >= threshold).any(dim=0)
    return out


@torch.no_grad()
def sample_shared_rois(
    roi_heads: nn.Module, proposals: Sequence[Tensor], boxes: Sequence[Tensor], labels: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """RoIs sampled against (pseudo-)labels the way Mask R-CNN samples its training RoIs.

    The label boxes are added to the proposals, every proposal is matched (IoU >= the head's
    foreground threshold, 0.5) and ``box_batch_size_per_image`` RoIs are drawn per image with at
    most 25 % positives.

    Returns:
        per image ``rois`` ``(R_i, 4)`` (input frame) and their labels ``(R_i,)`` (0 = negative).
    """
    proposals = roi_heads.add_gt_proposals(list(proposals), [b.to(proposals[0].dtype) for b in boxes])
    _, roi_labels = roi_heads.assign_targets_to_proposals(proposals, list(boxes), list(labels))
    sampled = roi_heads.subsample(roi_labels)
    return [p[s] for p, s in zip(proposals, sampled)], [lab[s] for lab, s in zip(roi_labels, sampled)]


def roi_class_logits(
    model: nn.Module,
    features: dict[str, Tensor],
    rois: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    mirror: bool = False,
) -> Tensor:
    """The box head's class logits ``(sum R_i, C)`` for given RoIs (input frame) on given features.

    ``mirror``: the pooled RoI features are flipped left-right before the box head. For a view
    computed on a horizontally flipped image, pass its features flipped back (``f.flip(-1)``,
    cell-exact because the padded width is a multiple of every pooled stride) with the original
    RoIs and ``mirror=True``: the head then sees exactly the mirrored RoI, as if the RoI had been
    mirrored in the flipped image. Mirroring the boxes instead (:func:`hflip_boxes`) is off by one
    feature cell per level, because torchvision pools with ``RoIAlign(aligned=False)``.
    """
    heads = model.roi_heads
    x = heads.box_roi_pool(features, list(rois), list(image_sizes))
    if mirror:
        x = x.flip(-1)
    class_logits, _ = heads.box_predictor(heads.box_head(x))
    return class_logits


def hflip_boxes(boxes: Tensor, width: int | float) -> Tensor:
    """Boxes ``(N, 4)`` xyxy mirrored in an image of ``width``: ``x1' = W - x2, x2' = W - x1``."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


@contextmanager
def frozen_batchnorm_statistics(module: nn.Module) -> Iterator[None]:
    """Inside the block, ``module``'s BatchNorm layers in train mode still normalise with the
    batch statistics (and pass gradients through them) but leave ``running_mean`` /
    ``running_var`` / ``num_batches_tracked`` untouched; the flags are restored on exit.

    Done by switching ``track_running_stats`` off, which makes ``torch.nn.BatchNorm2d`` pass no
    running buffers to ``F.batch_norm`` in train mode.
    """
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    flags = [m.track_running_stats for m in layers]
    try:
        for m in layers:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in zip(layers, flags):
            m.track_running_stats = flag


# =========================================================================== outputs


def safe_name(image_id: str) -> str:
    """A file name for ``image_id`` (path separators and odd characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(image_id)).strip("._") or "image"


def overlay_instances(image: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 3)``: the gray image with each instance's outline drawn (nuclei red,
    cytoplasms in cycling colours)."""
    from skimage.segmentation import find_boundaries

    rgb = np.repeat((np.clip(image, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
    palette = np.array(
        [[0, 200, 0], [0, 120, 255], [255, 200, 0], [200, 0, 255], [0, 220, 220], [255, 120, 0]], np.uint8
    )
    order = np.argsort(labels == 2, kind="stable")  # nuclei last, on top
    for n, i in enumerate(order):
        edge = find_boundaries(masks[i], mode="inner")
        rgb[edge] = [255, 0, 0] if labels[i] == 2 else palette[n % len(palette)]
    return rgb


class InstancePredictionWriter(VolumePredictionWriter):
    """Writes ``<image_id>.npz`` (``masks`` bool ``(N, H, W)``, ``labels``, ``scores``, ``boxes``)
    and ``<image_id>_overlay.png`` per image under ``output_dir``; never overwrites.

    The targets of every image of the data module's ``predict_samples`` are checked before the
    first one is predicted. It subclasses :class:`VolumePredictionWriter` so that an instance
    method returning it from ``configure_callbacks`` replaces the CLI's volume writer (Lightning
    replaces a trainer callback by a model callback of a subclass), keeping the CLI's
    ``--prediction_writer.output_dir``.
    """

    def __init__(self, output_dir: str | Path = "predictions") -> None:
        super().__init__(output_dir=output_dir)

    def targets_for(self, image_id: str) -> list[Path]:
        name = safe_name(image_id)
        return [self.output_dir / f"{name}.npz", self.output_dir / f"{name}_overlay.png"]

    def _refuse_existing(self, image_id: str) -> None:
        for target in self.targets_for(image_id):
            if target.exists():
                raise FileExistsError(
                    f"{target} already exists: kdseg predict never overwrites; choose another "
                    "--prediction_writer.output_dir"
                )

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples = getattr(getattr(trainer, "datamodule", None), "predict_samples", None) or []
        for sample in samples:
            self._refuse_existing(sample.image_id)

    def write_on_batch_end(  # type: ignore[no-untyped-def]
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        from skimage import io

        self.output_dir.mkdir(parents=True, exist_ok=True)
        for item in prediction:
            self._refuse_existing(item["image_id"])
            npz_path, png_path = self.targets_for(item["image_id"])
            np.savez_compressed(
                npz_path, masks=item["masks"], labels=item["labels"], scores=item["scores"],
                boxes=item["boxes"], image_id=np.array(item["image_id"]),
            )
            overlay = overlay_instances(item["image"], item["masks"], item["labels"])
            io.imsave(str(png_path), overlay, check_contrast=False)
            rank_zero_info(f"wrote {npz_path} and {png_path.name} ({len(item['labels'])} instances)")


def _pack(masks: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    return np.packbits(masks, axis=-1), masks.shape


def _unpack(packed: tuple[np.ndarray, tuple[int, ...]]) -> np.ndarray:
    bits, shape = packed
    return np.unpackbits(bits, axis=-1, count=shape[-1]).astype(bool).reshape(shape)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# =========================================================================== methods


class InstanceSegmentationMethod(pl.LightningModule):
    """A Mask R-CNN student trained by a subclass's ``training_step``; shared evaluation.

    Batches come from :class:`~kdseg.data.instance_datamodule.CervicalCellDataModule`.
    Validation logs ``val/<metric>_<class>`` and ``val/<metric>_mean`` for ``aji``,
    ``aji_gated``, ``f1``, ``dice``, ``map``, ``ap50``, ``ap75`` (see
    :class:`~kdseg.metrics.instance.InstanceMetricAccumulator`); checkpoints monitor
    ``val/aji_mean``. Evaluation runs on every rank's images and gathers them before computing.

    Args:
        detector: the Mask R-CNN (see :class:`DetectorConfig`).
        num_classes: classes including background (3; the CLI links it from the data).
        optimizer: ``sgd`` (momentum) or ``adamw``.
        lr, momentum, weight_decay: optimizer settings. MMT-PSM's public code: SGD, lr 0.005
            for 4 images (``scripts/train_mt.sh``), weight decay 1e-4
            (``configs/pap/e2e_mask_rcnn_R_50_FPN_1x.yaml``, overriding maskrcnn-benchmark's
            5e-4), momentum 0.9 (``maskrcnn_benchmark/config/defaults.py``).
        lr_warmup_steps, lr_warmup_factor: linear learning-rate warm-up from
            ``lr * lr_warmup_factor``: 500 steps from 1/3, maskrcnn-benchmark's
            ``SOLVER.WARMUP_ITERS`` / ``WARMUP_FACTOR`` (``defaults.py``), which the MMT-PSM
            config and script keep.
        poly_power: after warm-up the rate decays as ``(1 - t / T) ** poly_power``. Departure:
            the MMT-PSM config instead divides the rate by 10 at step 5000 of 7000
            (``SOLVER.STEPS``); kdseg uses one poly schedule for all its methods, so that the
            supervised and semi-supervised detectors differ only in their losses.
        Gradient clipping is not done by the public code (no clipping in its trainer
        ``maskrcnn_benchmark/engine/MTtrainer.py``); the ISBI configs do not clip either, the
        cpu reproduce profile clips at 10 (its measured tables were run so).
        eval_score_threshold: detections used for AJI / F1 / Dice (mAP ranks all).
        predict_score_threshold: detections written by ``predict``.
        predict_dir: where ``predict`` writes; None = the CLI's
            ``--prediction_writer.output_dir`` (default ``predictions``).
    """

    #: whether ``training_step`` needs the unlabeled stream.
    uses_unlabeled: bool = False

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
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        self.save_hyperparameters()
        self.detector_config = detector
        self.num_classes = num_classes
        self.student = build_mask_rcnn(detector, num_classes)
        self._eval_records: list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    # -- forward ---------------------------------------------------------------------------------
    def inference_network(self) -> nn.Module:
        """The network evaluated at validation / test / predict."""
        return self.student

    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Detections in image coordinates (``masks`` ``(N, 1, H, W)`` probabilities)."""
        return self.inference_network()(to_rgb(images))

    def supervised_loss(self, labeled: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, dict[str, Tensor]]:
        """The Mask R-CNN losses (RPN objectness / box, RoI class / box, mask) of the student."""
        images = [item[0] for item in labeled]
        targets = [item[1] for item in labeled]
        losses = self.student(to_rgb(images), targets)
        return sum(losses.values()), {f"train/{k}": v.detach() for k, v in losses.items()}

    def log_train(self, values: dict[str, Any], batch_size: int) -> None:
        self.log_dict(values, batch_size=batch_size, prog_bar=False)

    # -- checks ------------------------------------------------------------------------------------
    def class_names(self) -> dict[int, str]:
        names = getattr(getattr(self._trainer, "datamodule", None), "class_names", None) if self._trainer else None
        return dict(names) if names else dict(DEFAULT_CLASS_NAMES)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        if self.uses_unlabeled and not getattr(datamodule, "has_unlabeled", False):
            raise ValueError(
                f"{type(self).__name__} trains on unlabeled images: set data.unlabeled_batch_size > 0 and "
                "leave some training images unlabeled (data.num_labeled) or add EDF images"
            )

    # -- optimisation ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything with ``requires_grad`` outside the EMA teacher."""
        return [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("ema_teacher.")]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.trainable_parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup, factor, power = int(hp.lr_warmup_steps), float(hp.lr_warmup_factor), float(hp.poly_power)

        def schedule(step: int) -> float:
            if step < warmup:
                return factor + (1.0 - factor) * step / warmup
            return max(1.0 - step / total, 0.0) ** power

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- callbacks ---------------------------------------------------------------------------------
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

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate_batch(self, batch: Sequence[tuple[Tensor, dict[str, Tensor], str]]) -> None:
        outputs = self([item[0] for item in batch])
        for out, (_, target, image_id) in zip(outputs, batch):
            # Scored at the target's size (native when the data module resized the image): the
            # mask probabilities are resized bilinearly, then thresholded (kdseg.metrics.native_size).
            masks = masks_to_size(out["masks"], tuple(target["masks"].shape[-2:]))
            # Masks are kept bit-packed until the epoch ends (8x less memory for large test sets).
            pred = {
                "masks": _pack(masks.cpu().numpy()),
                "scores": out["scores"].float().cpu().numpy(),
                "labels": out["labels"].cpu().numpy(),
            }
            gt = {"masks": _pack(target["masks"].bool().cpu().numpy()), "labels": target["labels"].cpu().numpy()}
            self._eval_records.append((str(image_id), pred, gt))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def on_validation_epoch_start(self) -> None:
        self._eval_records = []

    def on_test_epoch_start(self) -> None:
        self._eval_records = []

    def _gathered_records(self) -> list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]]:
        records = self._eval_records
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        unique = {r[0]: r for r in records}  # a DistributedSampler pads with repeats
        return [unique[k] for k in sorted(unique)]

    def _accumulate(self):  # type: ignore[no-untyped-def]
        from kdseg.metrics.instance import InstanceMetricAccumulator

        names = self.class_names()
        accumulator = InstanceMetricAccumulator(
            classes=names,
            score_threshold=self.hparams.eval_score_threshold,
            max_detections=max(100, self.detector_config.box_detections_per_img),
        )
        for image_id, pred, gt in self._gathered_records():
            pred = {**pred, "masks": _unpack(pred["masks"])}
            accumulator.update(pred, {**gt, "masks": _unpack(gt["masks"])}, image_id)
        return accumulator

    def on_validation_epoch_end(self) -> None:
        if not self._eval_records and not dist.is_initialized():
            return
        summary = self._accumulate().compute()
        for key, value in summary.items():
            if key != "num_images":
                self.log(f"val/{key}", float(value), prog_bar=key in ("aji_mean", "map_mean"), sync_dist=False)

    def on_test_epoch_end(self) -> None:
        if not self._eval_records and not dist.is_initialized():
            return
        accumulator = self._accumulate()
        summary = accumulator.compute()
        for key, value in summary.items():
            if key != "num_images":
                self.log(f"test/{key}", float(value), sync_dist=False)
        if self.trainer.is_global_zero:
            self._write_test_results(summary, accumulator)

    def _write_test_results(self, summary: dict[str, float], accumulator: Any) -> None:
        directory = run_dir(self.trainer)
        directory.mkdir(parents=True, exist_ok=True)
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
            "metrics": {k: _json_safe(float(v)) for k, v in summary.items() if k != "num_images"},
        }
        json_path = next_free_path(directory / "test_metrics.json")
        json_path.write_text(json.dumps(content, indent=2))
        csv_path = accumulator.write_csv(next_free_path(directory / "test_cases.csv"))
        lines = [f"{'metric':<10} " + " ".join(f"{n:>10}" for n in [*self.class_names().values(), "mean"])]
        for metric in ("aji", "aji_gated", "f1", "dice", "map", "ap50", "ap75"):
            cells = [summary[f"{metric}_{n}"] for n in [*self.class_names().values(), "mean"]]
            lines.append(f"{metric:<10} " + " ".join(f"{v:>10.4f}" for v in cells))
        rank_zero_info("\n".join(lines))
        rank_zero_info(f"wrote {json_path} and {csv_path}")

    # -- prediction --------------------------------------------------------------------------------
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


@dataclass
class TeacherTargets:
    """What the teacher derives from the clean (unperturbed) view of an unlabeled batch.

    Attributes:
        image_sizes: per image ``(h, w)`` in the input frame; ``padded_size``: the batch tensor's.
        pseudo_labels: per image kept detections (``boxes``, ``labels``, ``scores``; ``masks``
            when the method :attr:`~InstanceTeacherStudentMethod.needs_foreground`).
        rois, roi_labels: per image shared RoIs and their labels against the pseudo-labels.
        foreground: bool ``(B, H_p, W_p)`` union of the pseudo-label masks (all False when the
            method does not need it).
    """

    image_sizes: list[tuple[int, int]]
    padded_size: tuple[int, int]
    pseudo_labels: list[dict[str, Tensor]]
    rois: list[Tensor]
    roi_labels: list[Tensor]
    foreground: Tensor

    @property
    def num_pseudo_labels(self) -> int:
        return sum(int(p["boxes"].shape[0]) for p in self.pseudo_labels)


def default_perturbation() -> StrongPerturbation:
    """MMT-PSM's photometric jitter (brightness and contrast 0.15, applied always); gamma, blur
    and noise off. Random erasing is added separately (``erase_prob``)."""
    return StrongPerturbation(brightness=0.15, contrast=0.15, gamma=0.0, blur_sigma=(0.0, 0.0), noise_std=0.0, p=1.0)


class InstanceTeacherStudentMethod(EMATeacherMixin, InstanceSegmentationMethod):
    """A Mask R-CNN student and its EMA teacher; unlabeled losses after a supervised warm-up.

    The teacher is a deep copy of the student made after the method added its extra modules
    (:meth:`add_heads`), never receives gradients, stays in eval mode and is updated by
    :class:`~kdseg.callbacks.ema.EMATeacher` (added by :meth:`configure_callbacks`).

    Warm-up: for ``global_step < warmup_steps`` only the supervised losses are computed (no
    teacher forward at all). The EMA runs from the first step with its usual warm-up decay
    ``min(1 - 1/(t+1), decay)``, so when the unlabeled losses start the teacher is already the
    0.99-average of the recent students (the public code restarts the EMA 10 steps before; with a
    warm-up of >= 100 steps the difference is the EMA of a longer history, nothing else).

    Loss: ``L = L_sup + w(t) * L_unlabeled`` with ``w(t) = consistency_weight *
    sigmoid_rampup(t - warmup_steps, rampup_steps)`` after warm-up, 0 before.

    Every unlabeled image is seen by the teacher unperturbed (its detections with score >=
    ``pseudo_label_score``, after the detector's per-class NMS, are the pseudo-labels) and in
    perturbed views: ``perturbation`` (photometric, per view) then random erasing with
    probability ``erase_prob`` of a box covering ``erase_area`` of the image.

    BatchNorm statistics: the student's forward on its perturbed unlabeled view normalises with
    that batch's statistics but, by default, does not update the running statistics that
    evaluation (and, through the EMA, the teacher) uses. Measured on ISBI 2014 (ResNet-18 FPN
    from scratch, cpu profile): 20 gradient-free train-mode forwards of perturbed unlabeled
    batches moved only the running statistics and dropped the validation AJI of the step-150
    checkpoint from 0.632 to 0.050 (clean unlabeled batches: 0.606; labeled: 0.622). Trained
    that way, MMT-PSM's student fell to validation AJI 0-0.3 once the unlabeled losses started;
    with this default its lowest validation AJI after the warm-up was 0.37-0.46 (w_mgd = 1; the
    rest of that drop is the MGD gradient's scale, see :class:`~kdseg.methods.mmt_psm.MMTPSM`).
    The public code's detector cannot have the problem: maskrcnn-benchmark freezes the BatchNorm of
    its ImageNet-pretrained ResNet-50 (as :func:`build_mask_rcnn` does with pretrained
    weights), so unlabeled views never touch it.

    Args:
        ema_decay: EMA decay after its warm-up (0.99 in MMT-PSM).
        eval_network: ``student`` or ``teacher`` at validation / test / predict.
        warmup_steps: supervised-only steps (MMT-PSM: 1000).
        consistency_weight: final weight of the unlabeled losses (MMT-PSM's lambda, 5).
        rampup_steps: sigmoid ramp-up length after warm-up (MMT-PSM: 250).
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
        rampup_steps: int = 250,
        pseudo_label_score: float = 0.5,
        perturbation: StrongPerturbation = default_perturbation(),
        erase_prob: float = 0.9,
        erase_area: tuple[float, float] = (0.02, 0.2),
        unlabeled_updates_bn_statistics: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if warmup_steps < 0 or rampup_steps < 0:
            raise ValueError("warmup_steps and rampup_steps must be >= 0")
        self.warmup_steps = warmup_steps
        self.consistency_weight = consistency_weight
        self.rampup_steps = rampup_steps
        self.pseudo_label_score = pseudo_label_score
        self.perturbation = perturbation
        self.erase_prob = erase_prob
        self.erase_area = tuple(erase_area)
        self.unlabeled_updates_bn_statistics = unlabeled_updates_bn_statistics
        self.add_heads(self.student)
        self.init_ema_teacher(ema_decay, eval_network)

    def add_heads(self, detector: nn.Module) -> None:
        """Hook: register the method's extra modules on the student (the teacher copies them).
        ``self.hparams`` already holds every constructor argument here."""

    def unlabeled_weight(self, step: int) -> float:
        """``w(t)``: 0 during warm-up, then the sigmoid ramp-up to ``consistency_weight``."""
        if step < self.warmup_steps:
            return 0.0
        return self.consistency_weight * sigmoid_rampup(step - self.warmup_steps, self.rampup_steps)

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

    @torch.no_grad()
    def teacher_targets(self, images: Sequence[Tensor]) -> TeacherTargets:
        """Pseudo-labels, shared RoIs and the foreground from the teacher on the clean view."""
        teacher = self.ema_teacher
        image_list, _ = preprocess(teacher, images)
        features = teacher.backbone(image_list.tensors)
        kept, proposals = detect_in_input_frame(
            teacher, image_list, features, min_score=self.pseudo_label_score, with_masks=self.needs_foreground
        )
        rois, roi_labels = sample_shared_rois(
            teacher.roi_heads, proposals, [d["boxes"] for d in kept], [d["labels"] for d in kept]
        )
        return TeacherTargets(
            image_sizes=[tuple(s) for s in image_list.image_sizes],
            padded_size=tuple(image_list.tensors.shape[-2:]),
            pseudo_labels=kept,
            rois=rois,
            roi_labels=roi_labels,
            foreground=(
                paste_foreground(kept, image_list) if self.needs_foreground
                else torch.zeros_like(image_list.tensors[:, 0], dtype=torch.bool)
            ),
        )

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
            logs["train/unlabeled"] = term.detach()
        logs.update(
            {"train/loss": loss.detach(), "train/supervised": supervised.detach(), "train/unlabeled_weight": weight}
        )
        self.log_train(logs, batch_size=len(labeled))
        return loss
