"""The ``plain_unet`` encoder: WSL4MIS's U-Net encoder inside kdseg's smp U-Net."""

from __future__ import annotations

import pytest
import torch

from kdseg.networks.plain_encoder import CHANNELS, PlainUNetEncoder
from kdseg.networks.unet import SegmentationNetwork


def test_encoder_features_channels_and_strides() -> None:
    encoder = PlainUNetEncoder(in_channels=1).eval()
    features = encoder(torch.randn(2, 1, 64, 64))
    assert [f.shape[1] for f in features] == [1, *CHANNELS]
    assert [f.shape[-1] for f in features] == [64, 64, 32, 16, 8, 4]  # first block at full resolution


def test_network_has_a_full_resolution_skip() -> None:
    torch.manual_seed(0)
    net = SegmentationNetwork(encoder_name="plain_unet", decoder_channels=(128, 64, 32, 16, 16)).eval()
    x = torch.randn(2, 1, 64, 64)
    out = net(x)
    torch.testing.assert_close(out.logits, net.unet(x))
    assert out.logits.shape == (2, 4, 64, 64)
    assert [f.shape[-1] for f in out.decoder_features] == [8, 16, 32, 64, 64]
    assert net.output_stride == 16
    # the full-resolution block's output reaches the decoder's last-but-one block as a skip
    skip_channels = net.unet.decoder.blocks[3].conv1[0].in_channels
    assert skip_channels == 32 + CHANNELS[0]


def test_depth_other_than_five_is_an_error() -> None:
    with pytest.raises(ValueError, match="encoder_depth: 5"):
        SegmentationNetwork(encoder_name="plain_unet", encoder_depth=4, decoder_channels=(64, 32, 16, 8))
