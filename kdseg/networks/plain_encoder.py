"""``plain_unet``: the encoder of the classic 2D U-Net that WSL4MIS / SSL4MIS train, for the smp U-Net.

The baselines of HiLab-git/WSL4MIS and SSL4MIS (``code/networks/unet.py``, ``UNet``) use a plain
encoder: five blocks of two 3x3 convolutions with BatchNorm and LeakyReLU (dropout between them),
max-pooling between blocks, 16-32-64-128-256 channels, the first block at full resolution. Its
full-resolution skip is what smp's own encoders lack (their finest skip is at 1/2): with it, thin
structures such as the myocardium keep a full-resolution path. Registered under the smp encoder
name ``plain_unet`` so that ``SegmentationNetwork(encoder_name="plain_unet")`` builds it with
smp's decoder; its decoder then has one block more at full resolution, without skip.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.encoders._base import EncoderMixin
from torch import Tensor, nn

NAME = "plain_unet"
CHANNELS = (16, 32, 64, 128, 256)  # WSL4MIS code/networks/unet.py, UNet params feature_chns
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)  # ... and its encoder dropout per block


def conv_block(in_channels: int, out_channels: int, dropout: float) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by BatchNorm and LeakyReLU; dropout between them."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(),
        nn.Dropout(dropout),
        nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(),
    )


class PlainUNetEncoder(nn.Module, EncoderMixin):
    """Features ``[input, block1 (1/1), block2 (1/2), block3 (1/4), block4 (1/8), block5 (1/16)]``.

    smp's decoder drops its first feature (the input) and skips from the others, so every block of
    this encoder feeds a skip connection, the full-resolution one included. ``depth`` must be 5.
    """

    def __init__(self, depth: int = 5, output_stride: int = 16, in_channels: int = 1, **_: object) -> None:
        nn.Module.__init__(self)
        EncoderMixin.__init__(self)
        if depth != 5:
            raise ValueError(f"the {NAME} encoder has 5 blocks; set encoder_depth: 5 (got {depth})")
        self._depth = 5
        self._in_channels = in_channels
        self._out_channels = [in_channels, *CHANNELS]
        self._output_stride = 16  # four poolings
        # Blocks are direct children (not a ModuleList) because SegmentationNetwork drops children
        # that a probe forward pass never calls.
        self.block1, self.block2, self.block3, self.block4, self.block5 = (
            conv_block(i, o, d) for i, o, d in zip((in_channels, *CHANNELS[:-1]), CHANNELS, DROPOUT)
        )
        self.pool = nn.MaxPool2d(2)

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        if in_channels != self._in_channels:
            first = self.block1[0]
            self.block1[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
            self._in_channels = in_channels
            self._out_channels[0] = in_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        features = [x]
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            x = block(x if i == 0 else self.pool(x))
            features.append(x)
        return features


def register() -> None:
    """Makes ``plain_unet`` an smp encoder name (idempotent); no pretrained weights exist for it."""
    smp.encoders.encoders.setdefault(NAME, {"encoder": PlainUNetEncoder, "pretrained_settings": {}, "params": {}})
