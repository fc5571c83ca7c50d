"""Mask R-CNN: the builder of kdseg's ResNet-FPN detector and helpers that run parts of it by hand.

- :class:`DetectorConfig` / :func:`build_mask_rcnn`: a ResNet-FPN Mask R-CNN built from scratch
  or from *local* weight files (nothing is ever downloaded). ``resnet50`` is the public MMT-PSM
  code's backbone (its maskrcnn-benchmark config, R-50-FPN); ``resnet18`` with narrow heads is the light one for CPUs.
- Helpers for methods that need RoI logits of given RoIs or FPN features: :func:`to_rgb`,
  :func:`preprocess`, :func:`detect_in_input_frame`, :func:`sample_shared_rois`,
  :func:`roi_class_logits` (also for flipped views), :func:`hflip_boxes`, :func:`paste_foreground`,
  :func:`teacher_targets` (pseudo-labels and shared RoIs of a teacher), :func:`perturbed_view`,
  :func:`backbone_features` and :func:`frozen_batchnorm_statistics`.

Grayscale input: images are ``(1, H, W)`` in [0, 1] and are repeated to 3 channels
(:func:`to_rgb`) with ImageNet mean / std in the detector's transform. This keeps the standard
3-channel stem, so a locally stored ImageNet or COCO checkpoint loads unchanged; from scratch the
repetition costs nothing measurable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from kdseg.checkpoints import load_checkpoint

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
#: FPN outputs of the ResNet-FPN built here: layer1..layer4 and the max-pooled extra level.
NUM_FPN_LEVELS = 5


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


@dataclass
class TeacherTargets:
    """What a teacher derives from the clean (unperturbed) view of an unlabeled batch.

    Attributes:
        image_sizes: per image ``(h, w)`` in the input frame; ``padded_size``: the batch tensor's.
        pseudo_labels: per image kept detections (``boxes``, ``labels``, ``scores``; ``masks``
            when the foreground was asked for).
        rois, roi_labels: per image shared RoIs and their labels against the pseudo-labels.
        foreground: bool ``(B, H_p, W_p)`` union of the pseudo-label masks (all False when the
            foreground was not asked for).
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


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module, images: Sequence[Tensor], min_score: float, with_foreground: bool
) -> TeacherTargets:
    """Pseudo-labels (detections with score >= ``min_score``), shared RoIs sampled against them
    and, when ``with_foreground``, the union of their masks, from ``teacher`` (eval mode) on
    ``images`` as given (the clean view)."""
    image_list, _ = preprocess(teacher, images)
    features = teacher.backbone(image_list.tensors)
    kept, proposals = detect_in_input_frame(
        teacher, image_list, features, min_score=min_score, with_masks=with_foreground
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
            paste_foreground(kept, image_list) if with_foreground
            else torch.zeros_like(image_list.tensors[:, 0], dtype=torch.bool)
        ),
    )


def perturbed_view(model: nn.Module, images: Sequence[Tensor], targets: TeacherTargets,
                   perturb: Callable[[Tensor], Tensor]) -> Any:
    """``images``, each through ``perturb``, through ``model``'s transform: the ``ImageList`` of a
    perturbed view, in the frame of the clean view that gave ``targets``."""
    image_list, _ = preprocess(model, [perturb(image) for image in images])
    if tuple(image_list.tensors.shape[-2:]) != targets.padded_size:
        raise RuntimeError("perturbed views must have the clean view's input frame (use one detector.min_size)")
    return image_list


def backbone_features(model: nn.Module, image_list: Any, update_bn_statistics: bool) -> dict[str, Tensor]:
    """``model``'s FPN features of ``image_list`` (with gradients); BatchNorm running statistics are
    left untouched unless ``update_bn_statistics`` (see :func:`frozen_batchnorm_statistics`)."""
    if update_bn_statistics:
        return model.backbone(image_list.tensors)
    with frozen_batchnorm_statistics(model):
        return model.backbone(image_list.tensors)
