"""Teacher uncertainty by Monte-Carlo passes (input noise, optionally encoder dropout), shared by
UA-MT and USTM."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kdseg.data.augment import clipped_gaussian_noise
from kdseg.networks.unet import SegmentationNetwork, run_unet_decoder

#: Encoder dropout of the SSL4MIS / WSL4MIS 2D ``UNet`` (``code/networks/unet.py``: ``'dropout':
#: [0.05, 0.1, 0.2, 0.3, 0.5]``), finest level first.
SSL4MIS_ENCODER_DROPOUT: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)


def encoder_dropout_logits(
    network: SegmentationNetwork, image: Tensor, rates: tuple[float, ...] = SSL4MIS_ENCODER_DROPOUT
) -> Tensor:
    """Logits of ``network`` with element-wise dropout, always active, on its encoder outputs.

    SSL4MIS's UA-MT and WSL4MIS's USTM run their EMA teacher in train mode, so the dropout
    inside its encoder blocks makes the T passes differ; kdseg's smp encoders have no dropout, so
    it is applied to each encoder stage's output (skip connections and bottleneck) before the
    decoder. Departure: there the dropout inside stage ``i`` also reaches the deeper stages; here
    only through the skip. The coarsest stage always takes the last rate (0.5), so an encoder of
    depth ``d`` uses ``rates[-d:]``. BatchNorm stays as the network's mode has it (kdseg's
    teacher: eval, running statistics; SSL4MIS: batch statistics).

    Args:
        network: the (teacher) network; its encoder depth ``d`` must be at most ``len(rates)``.
        image: ``(B, C_in, H, W)``.
        rates: dropout probabilities, finest stage first.

    Returns:
        ``(B, C, H, W)`` logits.
    """
    unet = network.unet
    unet.check_input_shape(image)
    features = unet.encoder(image)
    depth = len(features) - 1  # features[0] is the input itself
    if depth > len(rates):
        raise ValueError(f"encoder depth {depth} needs {depth} dropout rates, got {len(rates)}")
    dropped = [features[0]] + [F.dropout(f, p, training=True) for f, p in zip(features[1:], rates[-depth:])]
    return unet.segmentation_head(run_unet_decoder(unet.decoder, dropped)[-1])


def predictive_entropy(mc_probs: Tensor, eps: float = 1e-6) -> Tensor:
    """Entropy of the mean of Monte-Carlo predictions.

    Args:
        mc_probs: ``(T, B, C, H, W)`` softmax probabilities of ``T`` stochastic passes.
        eps: inside the log, as in SSL4MIS (``log(p + 1e-6)``).

    Returns:
        ``(B, 1, H, W)``: ``-sum_c mean_t(p) * log(mean_t(p) + eps)``; 0 for a certain pixel,
        ``ln(C)`` for a uniform one.
    """
    mean = mc_probs.mean(dim=0)
    return -(mean * torch.log(mean + eps)).sum(dim=1, keepdim=True)


@torch.no_grad()
def noisy_teacher_passes(
    predict: Callable[[Tensor], Tensor], image: Tensor, passes: int = 8, noise_std: float = 0.1,
    noise_clip: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """``passes + 1`` noisy copies of ``image`` through the teacher in one batched forward.

    The first copy's logits are the consistency target (as in SSL4MIS / WSL4MIS, one further
    noisy pass); the predictive entropy of the other ``passes`` is the uncertainty. Noise is
    ``clamp(N(0, noise_std^2), -noise_clip, noise_clip)``.

    Args:
        predict: maps ``(N, C_in, H, W)`` images to ``(N, C, H, W)`` logits.
        image: ``(B, C_in, H, W)``.

    Returns:
        ``(target_logits (B, C, H, W), uncertainty (B, 1, H, W))``.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    b = image.shape[0]
    copies = image.repeat(passes + 1, 1, 1, 1)
    logits = predict(clipped_gaussian_noise(copies, noise_std, noise_clip))
    mc_probs = torch.softmax(logits[b:].float(), dim=1)
    return logits[:b], predictive_entropy(mc_probs.reshape(passes, b, *mc_probs.shape[1:]))


def masked_softmax_mse(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor) -> Tensor:
    """SSL4MIS's UA-MT consistency: ``sum(mask * (softmax(s) - softmax(t))^2) / (2 sum(mask) + 1e-16)``.

    Args:
        student_logits, teacher_logits: ``(B, C, H, W)``; the teacher side is detached.
        mask: ``(B, 1, H, W)`` float, 1 where the teacher is certain enough.

    The squared difference is summed over classes and divided by twice the number of kept pixels
    (the factor 2 comes from SSL4MIS, whose 3D binary original had 2 channels); a fully masked
    batch gives 0.
    """
    dist = (torch.softmax(student_logits, dim=1) - torch.softmax(teacher_logits.detach(), dim=1)) ** 2
    return (mask * dist).sum() / (2 * mask.sum() + 1e-16)
