"""``dmpls``: dual-branch network with dynamically mixed pseudo-label supervision (Luo, Hu, Liao,
Zhai, Song, Wang, Zhang, "Scribble-Supervised Medical Image Segmentation via Dual-Branch Network
and Dynamically Mixed Pseudo Labels Supervision", MICCAI 2022), as in WSL4MIS."""

from __future__ import annotations

import copy
from typing import Any

from segmentation_models_pytorch.base import initialization as smp_init
from torch import Tensor, nn

from kdseg.losses.pseudo_label import dmpls_loss
from kdseg.losses.segmentation import partial_cross_entropy
from kdseg.methods.base import SegmentationMethod
from kdseg.networks.unet import SegmentationNetwork, run_unet_decoder


class AuxiliaryDecoder(nn.Module):
    """A second U-Net decoder and head on the shared encoder, fed with dropout-perturbed encoder
    features (the auxiliary branch of WSL4MIS's ``UNet_CCT``-style dual-branch network).

    The dropout is channel-wise (``nn.Dropout2d``: whole feature maps are zeroed), as WSL4MIS
    ``code/networks/unet.py``: ``UNet_CCT.forward`` feeds ``aux_decoder1`` with
    ``Dropout(i) for i in feature``, where ``Dropout`` is ``torch.nn.functional.dropout2d(x, p=0.5)``.
    smp's ``encoder_features[0]`` is the input image itself, not a learned stage, so it is left
    as is (WSL4MIS's first feature is its first conv block's output, which here is
    ``encoder_features[1]``)."""

    def __init__(self, decoder: nn.Module, head: nn.Module, dropout: float) -> None:
        super().__init__()
        self.decoder = decoder
        self.head = head
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, encoder_features: list[Tensor]) -> Tensor:
        perturbed = [encoder_features[0]] + [self.dropout(f) for f in encoder_features[1:]]
        return self.head(run_unet_decoder(self.decoder, perturbed)[-1])


class DMPLS(SegmentationMethod):
    """``L = 0.5 * (L_pce(main) + L_pce(aux)) + pseudo_weight * L_pls``.

    ``L_pls = 0.5 * (Dice(p_main, y_mix) + Dice(p_aux, y_mix))`` with the hard pseudo label
    ``y_mix = argmax(beta * p_main + (1 - beta) * p_aux)``, ``beta ~ U(0, 1)`` drawn each step
    (``dmpls_loss``). Both branches share the encoder; the auxiliary decoder is a fresh copy of the
    main decoder's architecture (own weights, initialised like it), fed with encoder features
    through channel dropout (``aux_dropout``, 0.5). Evaluation uses the main branch, as WSL4MIS's
    DMPLS script (``code/train_weakly_supervised_segmentation_pCE_ours_proposed.py`` validates
    with ``code/val_2D.py`` ``test_single_volume_cct``, which keeps ``net(input)[0]``).

    Args:
        pseudo_weight: weight of ``L_pls`` (0.5 in WSL4MIS).
        aux_dropout: dropout probability on the auxiliary branch's encoder features.
    """

    required_supervision = "scribble"

    def __init__(self, pseudo_weight: float = 0.5, aux_dropout: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pseudo_weight = pseudo_weight

    def configure_heads(self, network: SegmentationNetwork) -> None:
        unet = network.unet
        aux = AuxiliaryDecoder(
            copy.deepcopy(unet.decoder), copy.deepcopy(unet.segmentation_head), self.hparams.aux_dropout
        )
        # Own weights, initialised the way smp initialises the main branch (not a copy of it).
        smp_init.initialize_decoder(aux.decoder)
        smp_init.initialize_head(aux.head)
        network.add_head("aux_decoder", aux)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        labeled = batch["labeled"]
        scribble = labeled["target"]
        output = self.student(labeled["image"])
        main_logits = output.logits
        aux_logits = self.student.heads["aux_decoder"](output.encoder_features)
        L_pce = 0.5 * (
            partial_cross_entropy(main_logits, scribble, self.scribble_ignore_index)
            + partial_cross_entropy(aux_logits, scribble, self.scribble_ignore_index)
        )
        L_pls = dmpls_loss(main_logits, aux_logits)
        loss = L_pce + self.pseudo_weight * L_pls
        self.log_dict({"train/loss": loss, "train/L_pce": L_pce, "train/L_pls": L_pls})
        return loss
