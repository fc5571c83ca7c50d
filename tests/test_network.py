"""The U-Net wrapper returns smp's logits plus every decoder scale."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdseg.networks.unet import SegmentationNetwork


def test_logits_equal_smp_forward_and_scales() -> None:
    torch.manual_seed(0)
    net = SegmentationNetwork(encoder_depth=4, decoder_channels=(64, 32, 16, 8)).eval()
    x = torch.randn(2, 1, 64, 64)
    out = net(x)
    torch.testing.assert_close(out.logits, net.unet(x))
    assert out.logits.shape == (2, 4, 64, 64)
    assert [f.shape[-1] for f in out.decoder_features] == [8, 16, 32, 64]
    assert [f.shape[1] for f in out.decoder_features] == [64, 32, 16, 8]
    assert out.encoder_features[-1].shape[-1] == 4  # bottleneck at 1/16


def test_heads_are_registered_once_and_saved() -> None:
    net = SegmentationNetwork(encoder_depth=3, decoder_channels=(16, 8, 8))
    net.add_head("projection", nn.Conv2d(8, 4, 1))
    assert "heads.projection.weight" in net.state_dict()
    with pytest.raises(ValueError, match="already"):
        net.add_head("projection", nn.Identity())


def test_local_encoder_weights_file(tmp_path) -> None:
    source = SegmentationNetwork(encoder_depth=3, decoder_channels=(16, 8, 8))
    path = tmp_path / "encoder.pth"
    torch.save(source.unet.encoder.state_dict(), path)
    loaded = SegmentationNetwork(encoder_weights=str(path), encoder_depth=3, decoder_channels=(16, 8, 8))
    for a, b in zip(source.unet.encoder.parameters(), loaded.unet.encoder.parameters()):
        assert torch.equal(a, b)


def test_decoder_channels_must_match_depth() -> None:
    with pytest.raises(ValueError, match="decoder_channels"):
        SegmentationNetwork(encoder_depth=4, decoder_channels=(16, 8))
