"""``action``: ACTION, You, Dai, Min, Staib, Duncan, "Bootstrapping Semi-supervised Medical Image
Segmentation with Anatomical-Aware Contrastive Distillation", IPMI 2023 (arXiv 2206.02307).

Three stages, one class each; each stage is its own ``kdseg fit`` run that starts from the previous
stage's checkpoint (``model.init_args.init_weights_from``; ``experiments/reproduce/matrix.yaml``
chains them)::

    stage 1 (ActionGlobalDistillation)  L = L_global
    stage 2 (ActionLocalDistillation)   L = L_sup + w_local * L_local (+ w_global * L_global)
    stage 3 (ActionAnatomicalContrast)  L = L_sup + w_unsup * L_unsup + w_anco * L_anco

- ``L_global``, ``L_local``: ``mean_i KL(p_t(i) || p_s(i))``, ``p = softmax(cos(z_i, a_k) / tau)``
  over a FIFO bank ``a_k`` of past teacher embeddings (of images, of pixels).
- ``L_sup = (CE + Dice) / 2`` on the labeled images.
- ``L_unsup``: cross-entropy to the teacher's pseudo-labels on a CutMix + colour view,
  weighted by the teacher's confidence.
- ``L_anco``: InfoNCE of hard pixel queries against their class prototype and sampled negatives.

Departures from the released code (each with its reason; all are arguments or noted in the class):

- Stage 1 ignores the labeled slices: it is pre-training on unlabeled images.
- The teacher is the EMA of the student *including* its projection head (BYOL-style), not a separate untrained key head.
- The student gets the strong view, the teacher the weak one: the usual distillation direction.
- Projection MLPs are ``Linear-ReLU-Linear``: the released code's two linear layers collapse into one linear map.
- The memory banks start empty (the first step's loss is 0): anchors are then always real teacher embeddings.
- Stage 2 distils pixel embeddings against a bank of pixels (released: pooled logit patches) and
  leaves ``L_global`` out (``global_weight: 0``; released ``k1 = 1``).
- One student forward pass over labeled and unlabeled slices: shared BatchNorm statistics, as SSL4MIS.
- ``L_unsup`` averages over all pixels (released: pixels with a non-zero loss): equal up to exact zeros.
- AnCo's head starts with a 1x1 (not 3x3) convolution, 256 dimensions (ReCo's; released 512): see
  :class:`RepresentationHead`.
- The data module's weak rotation / flip stays on in every stage: one data module for all stages.

Heads keep the same names (``HEAD_*``) in every stage, so ``init_weights_from`` carries them over;
the loss terms are logged as ``train/L_global`` ... Details and history:
``experiments/results/notes/action.md``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdseg.data.augment import StrongPerturbation, cutmix, random_erasing
from kdseg.losses.anatomical_contrast import anatomical_contrast_loss
from kdseg.losses.confidence_weighted_ce import confidence_weighted_cross_entropy
from kdseg.losses.contrastive_distillation import (
    FeatureMemoryBank,
    contrastive_distillation_loss,
    dense_contrastive_distillation_loss,
)
from kdseg.losses.hard_negative_sampling import HardNegativeSampler
from kdseg.losses.segmentation import ce_dice_loss
from kdseg.methods.base import TeacherStudentMethod
from kdseg.networks.projection_heads import GlobalProjectionHead, PixelProjectionHead, RepresentationHead
from kdseg.networks.unet import SegmentationNetwork

__all__ = [
    "ActionAnatomicalContrast",
    "ActionGlobalDistillation",
    "ActionLocalDistillation",
]

#: head names, shared across stages (``network.heads[...]``, ``student.heads.<name>.*`` in checkpoints).
HEAD_GLOBAL_PROJECTION = "global_projection"
HEAD_GLOBAL_PREDICTOR = "global_predictor"
HEAD_LOCAL_PROJECTION = "local_projection"
HEAD_LOCAL_PREDICTOR = "local_predictor"
HEAD_REPRESENTATION = "representation"


def _random_pixels(embeddings: Tensor, per_image: int) -> Tensor:
    """``per_image`` random pixel vectors of each image of ``(B, D, H, W)`` -> ``(B * per_image, D)``."""
    b, d, h, w = embeddings.shape
    idx = torch.randint(0, h * w, (b, per_image), device=embeddings.device)
    flat = embeddings.flatten(2)  # (B, D, HW)
    return flat.gather(2, idx[:, None, :].expand(b, d, per_image)).permute(0, 2, 1).reshape(-1, d)


class _ContrastiveDistillation(TeacherStudentMethod):
    """Shared by stages 1 and 2: the global heads and bank, the temperatures and the student's
    strong view. See :class:`ActionGlobalDistillation` for the arguments."""

    uses_unlabeled = True

    def __init__(
        self,
        global_embedding_dim: int = 512,
        bank_size: int = 36,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.01,
        cutout_probability: float = 0.5,
        perturbation: StrongPerturbation = StrongPerturbation(),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= cutout_probability <= 1.0:
            raise ValueError(f"cutout_probability must be in [0, 1], got {cutout_probability}")
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.cutout_probability = cutout_probability
        self.perturbation = perturbation
        self.global_bank = FeatureMemoryBank(global_embedding_dim, bank_size)

    def configure_heads(self, network: SegmentationNetwork) -> None:
        dim = self.hparams.global_embedding_dim
        network.add_head(HEAD_GLOBAL_PROJECTION, GlobalProjectionHead(network.encoder_channels[-1], dim))
        network.add_head(
            HEAD_GLOBAL_PREDICTOR,
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)),
        )

    def strong_view(self, image: Tensor) -> Tensor:
        """The student's view: photometric strong perturbation, then cut-out."""
        view = self.perturbation(image)
        if self.cutout_probability > 0:
            view = random_erasing(view, p=self.cutout_probability)
        return view

    def global_distillation(self, student_bottleneck: Tensor, teacher_bottleneck: Tensor) -> Tensor:
        """``L_global`` = mean_i KL(p_t(i) || p_s(i)) over the bank's anchors; then the teacher's
        embeddings are enqueued (the loss used the bank as it was before this step)."""
        heads = self.student.heads
        student = heads[HEAD_GLOBAL_PREDICTOR](heads[HEAD_GLOBAL_PROJECTION](student_bottleneck))
        with torch.no_grad():
            teacher = self.ema_teacher.heads[HEAD_GLOBAL_PROJECTION](teacher_bottleneck)
        anchors = self.global_bank.get().clone()
        loss = contrastive_distillation_loss(
            student, teacher, anchors, self.student_temperature, self.teacher_temperature
        )
        self.global_bank.enqueue(teacher)
        return loss


class ActionGlobalDistillation(_ContrastiveDistillation):
    """ACTION stage 1: ``L = L_global`` on unlabeled images only.

    The EMA teacher embeds the weak view (as loaded), the student the strong one
    (:class:`~kdseg.data.augment.StrongPerturbation`, then cut-out): encoder bottleneck, global
    average pool, projection MLP (head ``global_projection``), plus a predictor MLP on the
    student (head ``global_predictor``). The teacher's embeddings are enqueued after the loss.

    Only the encoder and the global heads train (the released code's ``train_decoder=0``); the
    decoder never runs, so this stage's validation Dice means nothing and stage 2 starts from its
    ``last.ckpt``.

    Args:
        global_embedding_dim: size of the image embeddings (512).
        bank_size: FIFO memory bank slots (36, the released ``--K 36``).
        student_temperature, teacher_temperature: tau_s, tau_t (0.1 / 0.01).
        cutout_probability: probability of one cut-out box on the student's view (0 = none).
        perturbation: the student's photometric perturbation.
        (other arguments: see :class:`~kdseg.methods.base.TeacherStudentMethod`)
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.student.unet.decoder.requires_grad_(False)
        self.student.unet.segmentation_head.requires_grad_(False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image = batch["unlabeled"]["image"]
        student_bottleneck = self.student.unet.encoder(self.strong_view(image))[-1]
        with torch.no_grad():
            teacher_bottleneck = self.ema_teacher.unet.encoder(image)[-1]
        L_global = self.global_distillation(student_bottleneck, teacher_bottleneck)
        loss = L_global
        self.log_dict(
            {"train/loss": loss, "train/L_global": L_global, "train/bank_filled": float(len(self.global_bank))}
        )
        return loss


class ActionLocalDistillation(_ContrastiveDistillation):
    """ACTION stage 2: ``L = L_sup + local_weight * L_local + global_weight * L_global``.

    ``L_local`` is stage 1's distillation on pixels: the finest decoder feature of the unlabeled
    images through a pixel projection head (``local_projection``; the student adds the predictor
    ``local_predictor``), student on the strong view, teacher on the weak one, compared at
    ``local_num_pixels`` random positions (the same in both maps: the views differ only
    photometrically and by cut-out) against a second bank of teacher pixel embeddings.
    At ``global_weight: 0`` the global heads are frozen (unused, DDP-safe) but carried over.

    Args:
        local_embedding_dim: size of the pixel embeddings.
        local_num_pixels: pixels drawn per step for ``L_local`` (None = all).
        local_enqueue_per_image: teacher pixel embeddings enqueued per unlabeled image and step.
        local_weight, global_weight: loss weights.
        (other arguments: see :class:`ActionGlobalDistillation`)
    """

    required_supervision = "dense"

    def __init__(
        self,
        local_embedding_dim: int = 64,
        local_num_pixels: int | None = 4096,
        local_enqueue_per_image: int = 1,
        local_weight: float = 1.0,
        global_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if local_enqueue_per_image < 1:
            raise ValueError(f"local_enqueue_per_image must be >= 1, got {local_enqueue_per_image}")
        self.local_num_pixels = local_num_pixels
        self.local_enqueue_per_image = local_enqueue_per_image
        self.local_weight = local_weight
        self.global_weight = global_weight
        # As many slots as stage 1's bank (bank_size).
        self.local_bank = FeatureMemoryBank(local_embedding_dim, self.global_bank.size)
        if global_weight == 0:
            for name in (HEAD_GLOBAL_PROJECTION, HEAD_GLOBAL_PREDICTOR):
                self.student.heads[name].requires_grad_(False)

    def configure_heads(self, network: SegmentationNetwork) -> None:
        super().configure_heads(network)
        dim = self.hparams.local_embedding_dim
        network.add_head(HEAD_LOCAL_PROJECTION, PixelProjectionHead(network.decoder_channels[-1], dim))
        network.add_head(HEAD_LOCAL_PREDICTOR, PixelProjectionHead(dim, dim))

    def local_distillation(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        """``L_local`` on the finest decoder features; then teacher pixels are enqueued."""
        heads = self.student.heads
        student = heads[HEAD_LOCAL_PREDICTOR](heads[HEAD_LOCAL_PROJECTION](student_feature))
        with torch.no_grad():
            teacher = self.ema_teacher.heads[HEAD_LOCAL_PROJECTION](teacher_feature)
        anchors = self.local_bank.get().clone()
        loss = dense_contrastive_distillation_loss(
            student, teacher, anchors, self.student_temperature, self.teacher_temperature,
            num_samples=self.local_num_pixels,
        )
        self.local_bank.enqueue(_random_pixels(teacher, self.local_enqueue_per_image))
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        n_labeled = labeled["image"].shape[0]
        out = self.student(torch.cat([labeled["image"], self.strong_view(unlabeled["image"])]))
        teacher = self.teacher_forward(unlabeled["image"])

        L_sup = ce_dice_loss(out.logits[:n_labeled], labeled["target"])
        L_local = self.local_distillation(out.decoder_features[-1][n_labeled:], teacher.decoder_features[-1])
        loss = L_sup + self.local_weight * L_local
        metrics = {"train/L_sup": L_sup, "train/L_local": L_local}
        if self.global_weight != 0:
            L_global = self.global_distillation(out.encoder_features[-1][n_labeled:], teacher.encoder_features[-1])
            loss = loss + self.global_weight * L_global
            metrics["train/L_global"] = L_global
        self.log_dict({"train/loss": loss, **metrics})
        return loss


class ActionAnatomicalContrast(TeacherStudentMethod):
    """ACTION stage 3: ``L = L_sup + unsup_weight * L_unsup + anco_weight * L_anco``, no ramp-up.

    The EMA teacher labels the unaugmented unlabeled images (argmax, max probability); the
    student sees them CutMixed within the batch (labels and confidences mixed alike), then
    perturbed (:class:`~kdseg.data.augment.StrongPerturbation`). ``L_unsup`` is
    :func:`~kdseg.losses.confidence_weighted_ce.confidence_weighted_cross_entropy`. ``L_anco`` embeds every pixel of the labeled and
    mixed unlabeled images (head ``representation``); labeled pixels and unlabeled pixels with
    confidence >= ``anco_confidence_threshold`` take part, and
    :class:`~kdseg.losses.hard_negative_sampling.HardNegativeSampler` draws hard queries (student
    probability of their class below ``anco_hard_threshold``, detached), prototypes and negatives.
    At the first step the EMA warm-up copies the student into the teacher, so pseudo-labels come
    from the initialised student whatever teacher the checkpoint held.

    Ablations: ``anco_weight: 0`` (the head is then frozen and not run), ``unsup_weight: 0``
    (unlabeled pixels still enter ``L_anco``).

    Args:
        unsup_weight, anco_weight: loss weights (0 switches a term off; ``anco_weight`` 0.01 is
            the released ``--k1``).
        unsup_weighting: ``confident_fraction`` (each image weighted by its fraction of confident
            pixels, ReCo's and the released code's) or ``threshold`` (confident pixels only, FixMatch).
        unsup_confidence_threshold: "confident" teacher probability for ``L_unsup`` (0.97).
        anco_confidence_threshold: teacher confidence for an unlabeled pixel to enter AnCo (0.7).
        anco_num_queries, anco_num_negatives, anco_hard_threshold, anco_temperature: AnCo
            sampling and loss (256, 512, 0.97, 0.5).
        anco_memory_size_per_class: per-class FIFO of past pixel embeddings for negatives
            (0 = the batch only, as the released ``compute_reco_loss``).
        representation_dim: size of AnCo's pixel embeddings.
        cutmix_area: range of the CutMix box area (fraction of the image).
        perturbation: the colour / blur / noise perturbation after CutMix.
        (other arguments: see :class:`~kdseg.methods.base.TeacherStudentMethod`)
    """

    uses_unlabeled = True
    required_supervision = "dense"

    def __init__(
        self,
        unsup_weight: float = 1.0,
        anco_weight: float = 0.01,
        unsup_weighting: str = "confident_fraction",
        unsup_confidence_threshold: float = 0.97,
        anco_confidence_threshold: float = 0.7,
        anco_num_queries: int = 256,
        anco_num_negatives: int = 512,
        anco_hard_threshold: float = 0.97,
        anco_temperature: float = 0.5,
        anco_memory_size_per_class: int = 0,
        representation_dim: int = 256,
        cutmix_area: tuple[float, float] = (0.25, 0.5),
        perturbation: StrongPerturbation = StrongPerturbation(),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if unsup_weighting not in ("confident_fraction", "threshold"):
            raise ValueError(
                f"unsup_weighting must be 'confident_fraction' or 'threshold', got {unsup_weighting!r}"
            )
        self.unsup_weight = unsup_weight
        self.anco_weight = anco_weight
        self.unsup_weighting = unsup_weighting
        self.unsup_confidence_threshold = unsup_confidence_threshold
        self.anco_confidence_threshold = anco_confidence_threshold
        self.anco_temperature = anco_temperature
        self.cutmix_area = tuple(cutmix_area)
        self.perturbation = perturbation
        self.anco_sampler = HardNegativeSampler(
            num_queries=anco_num_queries,
            num_negatives=anco_num_negatives,
            hard_threshold=anco_hard_threshold,
            temperature=anco_temperature,
            memory_size_per_class=anco_memory_size_per_class,
            num_classes=self.num_classes,
            embedding_dim=representation_dim,
        )
        if anco_weight == 0:
            self.student.heads[HEAD_REPRESENTATION].requires_grad_(False)

    def configure_heads(self, network: SegmentationNetwork) -> None:
        network.add_head(
            HEAD_REPRESENTATION, RepresentationHead(network.decoder_channels, self.hparams.representation_dim)
        )

    @torch.no_grad()
    def pseudo_labels(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's ``(pseudo_label, confidence)`` on unaugmented images, ``(B, H, W)`` each."""
        probs = torch.softmax(self.teacher_forward(image).logits.float(), dim=1)
        confidence, label = probs.max(dim=1)
        return label, confidence

    @torch.no_grad()
    def strong_view(self, image: Tensor, label: Tensor, confidence: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """CutMix (labels and confidences mixed the same way), then colour / blur / noise."""
        mixed, box, permutation = cutmix(image, self.cutmix_area)
        label = torch.where(box, label[permutation], label)
        confidence = torch.where(box, confidence[permutation], confidence)
        return self.perturbation(mixed), label, confidence

    def anatomical_contrast(
        self, decoder_features: list[Tensor], logits: Tensor, labels: Tensor, valid: Tensor
    ) -> Tensor:
        """``L_anco`` over the pixels of the whole (labeled + unlabeled) batch."""
        embeddings = self.student.heads[HEAD_REPRESENTATION](decoder_features)
        probs = torch.softmax(logits.detach().float(), dim=1)
        samples = self.anco_sampler(embeddings, labels, probs, valid)
        return anatomical_contrast_loss(samples, self.anco_temperature, reference=embeddings)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled, unlabeled = batch["labeled"], batch["unlabeled"]
        n_labeled = labeled["image"].shape[0]
        pseudo, confidence = self.pseudo_labels(unlabeled["image"])
        view, pseudo, confidence = self.strong_view(unlabeled["image"], pseudo, confidence)
        out = self.student(torch.cat([labeled["image"], view]))

        L_sup = ce_dice_loss(out.logits[:n_labeled], labeled["target"])
        loss = L_sup
        zero = L_sup.new_zeros(())
        L_unsup, L_anco = zero, zero
        if self.unsup_weight != 0:
            L_unsup = confidence_weighted_cross_entropy(
                out.logits[n_labeled:], pseudo, confidence, self.unsup_confidence_threshold, self.unsup_weighting
            )
            loss = loss + self.unsup_weight * L_unsup
        if self.anco_weight != 0:
            labels = torch.cat([labeled["target"], pseudo])
            valid = torch.cat([torch.ones_like(labeled["target"], dtype=torch.bool),
                               confidence >= self.anco_confidence_threshold])
            L_anco = self.anatomical_contrast(out.decoder_features, out.logits, labels, valid)
            loss = loss + self.anco_weight * L_anco
        self.log_dict({
            "train/loss": loss, "train/L_sup": L_sup, "train/L_unsup": L_unsup, "train/L_anco": L_anco,
            "train/confident_fraction": (confidence >= self.unsup_confidence_threshold).float().mean(),
        })
        return loss
