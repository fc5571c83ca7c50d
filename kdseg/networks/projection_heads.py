"""Projection and representation heads of ACTION (You et al., IPMI 2023), registered on a
:class:`~kdseg.networks.unet.SegmentationNetwork` by :mod:`kdseg.methods.action`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdseg.networks.pointwise import RowSparseGradConv1x1
from kdseg.networks.resize import bilinear_upsample

__all__ = ["GlobalProjectionHead", "PixelProjectionHead", "RepresentationHead"]


class GlobalProjectionHead(nn.Module):
    """Image embedding: global average pool of a feature map, then ``Linear-ReLU-Linear``.

    Args:
        in_channels: channels of the pooled map (the bottleneck).
        dim: embedding size.
        hidden: hidden width (default ``in_channels``).
    """

    def __init__(self, in_channels: int, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_channels
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def forward(self, feature: Tensor) -> Tensor:
        return self.mlp(feature.mean(dim=(2, 3)))


class PixelProjectionHead(nn.Module):
    """Per-pixel embedding: ``Conv1x1-ReLU-Conv1x1`` (an MLP applied to every pixel).

    Args:
        in_channels: channels of the input map.
        dim: embedding size.
        hidden: hidden width (default ``dim``).
    """

    def __init__(self, in_channels: int, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, dim, 1)
        )

    def forward(self, feature: Tensor) -> Tensor:
        return self.mlp(feature)


class RepresentationHead(nn.Module):
    """AnCo's pixel embeddings from multi-level decoder features.

    Defined as ``Conv1x1(concat_i(upsample_i(f_i))) -> BN -> ReLU -> Conv1x1``: every decoder
    feature is bilinearly upsampled to the finest one's size, all are concatenated and projected.
    Computed equivalently as ``sum_i upsample_i(Conv1x1_i(f_i))``: a 1x1 convolution and bilinear
    interpolation are both linear and act on different axes (channels / space), so they commute,
    and a 1x1 convolution of a concatenation is the sum of per-part convolutions. Projecting each
    level at its own resolution first costs 1/16 of the first convolution's multiply-adds for the
    default U-Net (decoder channels 256..16 at 1/16..1 resolution: 31 instead of 496 input
    channels per full-resolution pixel) and never materialises the ``sum(decoder_channels)``-channel
    full-resolution map; a level with fewer channels than ``dim`` is upsampled before its
    projection instead (the same value, less to interpolate). Upsampling is
    :func:`~kdseg.networks.resize.bilinear_upsample` (matrix products; a faster backward on CPU
    than ``F.interpolate``'s, equal to float rounding). (The first convolution has no bias:
    the BatchNorm after it has one.)

    Args:
        in_channels: channels of each decoder feature, coarse to fine.
        dim: embedding size.
    """

    def __init__(self, in_channels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.level_projections = nn.ModuleList(nn.Conv2d(c, dim, 1, bias=False) for c in in_channels)
        # Only AnCo's query pixels get a gradient: the last 1x1 conv's backward skips the others.
        self.out = nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(inplace=True), RowSparseGradConv1x1(dim, dim))

    def fused(self, features: Sequence[Tensor]) -> Tensor:
        """``Conv1x1(concat(upsampled features))`` before BN, computed level by level."""
        if len(features) != len(self.level_projections):
            raise ValueError(f"expected {len(self.level_projections)} decoder features, got {len(features)}")
        size = tuple(features[-1].shape[-2:])
        total: Tensor | None = None
        for projection, feature in zip(self.level_projections, features):
            if feature.shape[-2:] == size:
                x = projection(feature)
            elif feature.shape[1] < projection.out_channels:  # upsample the thinner tensor
                x = projection(bilinear_upsample(feature, size))
            else:
                x = bilinear_upsample(projection(feature), size)
            total = x if total is None else total + x
        assert total is not None
        return total

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.out(self.fused(features))
