"""``action``: ACTION, You, Dai, Min, Staib & Duncan, "Bootstrapping Semi-supervised Medical Image
Segmentation with Anatomical-Aware Contrastive Distillation", IPMI 2023 (arXiv 2206.02307).

Three stages, one method class each; every stage is its own ``kdseg fit`` run that starts from the
previous stage's checkpoint (``model.init_args.init_weights_from``; the chain is scripted in
``experiments/acdc/run_action_chain.sh``):

1. :class:`ActionGlobalDistillation`: ``L_global``, contrastive distillation of one embedding per
   unlabeled image (encoder bottleneck) against a memory bank of past teacher embeddings.
2. :class:`ActionLocalDistillation`: ``L_sup + L_local``, the same distillation on per-pixel
   embeddings of the finest decoder feature, plus the supervised loss.
3. :class:`ActionAnatomicalContrast`: ``L_sup + L_unsup + w * L_anco``, pseudo-label training
   with CutMix and the anatomical contrast over hard pixels of labeled and unlabeled images.

Heads are registered on the network under fixed names (``HEAD_*`` below) that are the same in
every stage that has them, so ``init_weights_from`` carries them from one stage to the next.
Equation names (``L_global``, ``L_local``, ``L_sup``, ``L_unsup``, ``L_anco``) are also the
logged metric names (``train/L_global`` ...).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdseg.data.augment import StrongPerturbation, cutmix, random_erasing
from kdseg.losses.anatomical_contrast import anatomical_contrast_loss
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
    "confidence_weighted_cross_entropy",
]

#: head names, shared across stages (``network.heads[...]``, ``student.heads.<name>.*`` in checkpoints).
HEAD_GLOBAL_PROJECTION = "global_projection"
HEAD_GLOBAL_PREDICTOR = "global_predictor"
HEAD_LOCAL_PROJECTION = "local_projection"
HEAD_LOCAL_PREDICTOR = "local_predictor"
HEAD_REPRESENTATION = "representation"


# --------------------------------------------------------------------------------------------
# losses used only here
# --------------------------------------------------------------------------------------------
def confidence_weighted_cross_entropy(
    logits: Tensor, pseudo_label: Tensor, confidence: Tensor, threshold: float, weighting: str
) -> Tensor:
    """``L_unsup``: cross-entropy against pseudo-labels, weighted by the teacher's confidence.

    Args:
        logits: ``(B, C, H, W)`` student scores on the perturbed view.
        pseudo_label: ``(B, H, W)`` long, the teacher's argmax (mixed like the images).
        confidence: ``(B, H, W)`` the teacher's max probability (mixed like the images).
        threshold: confidence a pixel needs to count as confident.
        weighting: ``confident_fraction``: every pixel of image ``b`` is weighted by the fraction
            of confident pixels of ``b`` (ReCo / the ACTION code); ``threshold``: only confident
            pixels count (FixMatch), weight 1 each.

    Returns:
        ``mean_{b, p} w_{b,p} * CE_{b,p}`` over all pixels.
    """
    ce = F.cross_entropy(logits, pseudo_label, reduction="none")
    confident = (confidence >= threshold).to(ce.dtype)
    if weighting == "confident_fraction":
        weight = confident.flatten(1).mean(dim=1)[:, None, None]
    elif weighting == "threshold":
        weight = confident
    else:
        raise ValueError(f"unsup_weighting must be 'confident_fraction' or 'threshold', got {weighting!r}")
    return (weight * ce).mean()


def _random_pixels(embeddings: Tensor, per_image: int) -> Tensor:
    """``per_image`` random pixel vectors of each image of ``(B, D, H, W)`` -> ``(B * per_image, D)``."""
    b, d, h, w = embeddings.shape
    idx = torch.randint(0, h * w, (b, per_image), device=embeddings.device)
    flat = embeddings.flatten(2)  # (B, D, HW)
    return flat.gather(2, idx[:, None, :].expand(b, d, per_image)).permute(0, 2, 1).reshape(-1, d)


# --------------------------------------------------------------------------------------------
# stages 1 and 2: contrastive distillation
# --------------------------------------------------------------------------------------------
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

    Each unlabeled image gives a weak view (as loaded, with the data module's geometric
    augmentation) to the EMA teacher and a strong view (:class:`~kdseg.data.augment.
    StrongPerturbation`, then cut-out with ``cutout_probability``) to the student. Both embed it:
    encoder bottleneck -> global average pool -> projection MLP (head ``global_projection``); the
    student adds a predictor MLP (head ``global_predictor``). With anchors ``a_k`` from the FIFO
    memory bank of past teacher embeddings (``bank_size`` = 36)::

        p_t = softmax(cos(z_t, a_k) / tau_t),  p_s = softmax(cos(z_s, a_k) / tau_s)
        L_global = mean_i KL(p_t(i) || p_s(i))      (tau_t = 0.01, tau_s = 0.1)

    and this step's teacher embeddings are enqueued after the loss is computed.

    Choices (each with its reason):

    - Only the encoder and the global heads train: the decoder and segmentation head are frozen
      (``requires_grad=False``) and never run, because ``L_global`` does not reach them (the
      released code freezes them too, ``train_decoder=0``); this also keeps DDP free of unused
      trainable parameters. The validation Dice of this stage is that of a random decoder and
      means nothing, so stage 2 starts from this run's ``last.ckpt`` (the end of pre-training,
      as the released code, which loads iteration 30000), not from its ``best-*.ckpt``.
    - The labeled stream is ignored: stage 1 is pre-training on unlabeled images (kdseg's
      choice; the released ``code/train_2D_pretrain.py`` samples labeled slices too).
    - The teacher is the EMA of the student *including* the projection head (BYOL-style, as the
      kdseg's choice); the released code instead keeps a separate, never-trained key head.
      The teacher holds an (unused) copy of the predictor because it is a deep copy.
    - Student strong / teacher weak (kdseg's choice, the usual distillation direction); the
      released code's default
      (``combinations=2``) perturbs the teacher's view instead.
    - The MLPs are ``Linear-ReLU-Linear``; the released code's two linear layers have no
      nonlinearity (they collapse into one linear map). Embedding size 512 as in the code.
    - The bank starts empty (the first step's ``L_global`` is 0), so anchors are always real
      teacher embeddings; the released code starts from random vectors.
    - Iterations: 30k per stage as in the released code's ``train_2D.sh`` (set by the configs).

    Args:
        global_embedding_dim: size of the image embeddings.
        bank_size: FIFO memory bank slots (36, ``--K 36`` in the released ``code/train_2D.sh``).
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

    ``L_sup = (CE + Dice) / 2`` on the labeled images (weak view). ``L_local`` is stage 1's
    distillation applied to pixels: the finest decoder feature of the unlabeled images goes
    through a pixel projection head (head ``local_projection``, 1x1 convolutions; the student
    adds a 1x1-conv predictor, head ``local_predictor``), the student on the strong view, the
    teacher on the weak one, and ``dense_contrastive_distillation_loss`` compares their
    similarity distributions over a second memory bank (``local_bank``, same size and
    temperatures) at ``local_num_pixels`` randomly drawn pixel positions (the same positions in
    both maps: the views differ only photometrically and by cut-out, so pixels correspond).

    Choices (each with its reason):

    - The local bank receives ``local_enqueue_per_image`` random teacher pixel embeddings per
      image per step, the pixel counterpart of stage 1's one embedding per image. (The released
      code instead distils pooled logit patches against a bank of whole patch grids; kdseg
      uses pixel-level anchors, which is what ``dense_contrastive_distillation_loss`` does.)
    - ``global_weight`` defaults to 0 (kdseg's stage 2 is the local loss only); the released code
      keeps ``L_global`` in this stage (``k1 = 1``): set ``global_weight: 1.0`` for that. At 0
      the global heads are frozen (unused, DDP-safe) but kept, so they still pass through.
    - The student sees labeled (weak) and unlabeled (strong) slices in one forward pass, so its
      BatchNorm statistics cover both, as in SSL4MIS.

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


# --------------------------------------------------------------------------------------------
# stage 3: anatomical contrast fine-tuning
# --------------------------------------------------------------------------------------------
class ActionAnatomicalContrast(TeacherStudentMethod):
    """ACTION stage 3: ``L = L_sup + unsup_weight * L_unsup + anco_weight * L_anco``.

    - ``L_sup = (CE + Dice) / 2`` on the labeled images.
    - ``L_unsup``: the EMA teacher segments the *unaugmented* unlabeled images, giving
      pseudo-labels (argmax) and confidences (max probability). The student sees a strongly
      augmented view: CutMix within the unlabeled batch (:func:`~kdseg.data.augment.cutmix`,
      pseudo-labels and confidences mixed with the same boxes), then colour / blur / noise
      (:class:`~kdseg.data.augment.StrongPerturbation`). The loss is
      :func:`confidence_weighted_cross_entropy` of the student's prediction against the mixed
      pseudo-labels.
    - ``L_anco``: a representation head (head ``representation``) turns the multi-level decoder
      features (each upsampled to the finest resolution, concatenated, 1x1 convolutions) into
      per-pixel embeddings of labeled and augmented unlabeled images alike. Valid pixels are all
      labeled pixels (ground truth) and unlabeled pixels whose mixed teacher confidence is at
      least ``anco_confidence_threshold`` (0.7; their pseudo-label is their class).
      :class:`~kdseg.losses.hard_negative_sampling.HardNegativeSampler` draws per class up to
      ``anco_num_queries`` (256) hard queries (student probability of their class below
      ``anco_hard_threshold`` = 0.97), the class prototype as positive key, and
      ``anco_num_negatives`` (512) negatives from the other classes through the class-relation
      distribution; :func:`~kdseg.losses.anatomical_contrast.anatomical_contrast_loss` is the
      InfoNCE over them (temperature 0.5).

    Ablations: ``anco_weight: 0`` (without ``L_anco``; the head is then frozen and not run) and
    ``unsup_weight: 0`` (without ``L_unsup``; unlabeled pixels still enter ``L_anco``).

    Choices (each with its reason):

    - ``anco_weight`` defaults to 0.01, the released code's weight of ``L_anco``
      (``code/train_2D_action.py``: ``--k1`` default 0.01, ``loss = k1 * reco_loss + unsup_loss
      + supervised_loss``; ``code/train_2D.sh`` does not override it).
    - ``L_unsup`` weighting: ``confident_fraction`` (default) weights each unlabeled image's
      pixels by the fraction of its pixels with teacher confidence >= ``unsup_confidence_threshold``
      (0.97), the ReCo weighting that the released code uses (it averages over pixels with a
      non-zero loss, here over all pixels: the same up to exact zeros). ``threshold`` keeps only
      the confident pixels (FixMatch). The smooth per-image weight keeps a gradient on every
      pixel early on, when few pixels pass 0.97.
    - The student sees labeled and augmented unlabeled slices in one forward pass (shared
      BatchNorm statistics, as in SSL4MIS); the released code runs two passes.
    - The hard-query probabilities are the student's (detached), as in the released code.
    - The representation head is ``Conv1x1 -> BN -> ReLU -> Conv1x1`` (ReCo's head with 1x1
      instead of 3x3 first conv; see :class:`RepresentationHead` for how it is computed), 256
      dimensions (ReCo); the released code uses a 3x3 then a 1x1 conv to 512 dimensions. AnCo is
      computed at full resolution, as in the released code.
    - No ramp-up of any weight, as in the released ``code/train_2D_action.py``.
    - The teacher: at the first step the EMA warm-up (decay ``min(1 - 1/(t+1), ema_decay)`` = 0)
      copies the student into the teacher, so whichever teacher the checkpoint held, pseudo-labels
      come from the initialised student from step 1 on (the released code loads the stage-2
      student into both).
    - Rotation / flip: the data module's weak geometric augmentation stays on for every stage
      (kdseg's choice; the released code's stage-3 loaders differ).

    Args:
        unsup_weight, anco_weight: loss weights (0 switches a term off).
        unsup_weighting: ``confident_fraction`` or ``threshold`` (see above).
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
