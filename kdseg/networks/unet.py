"""The segmentation network every method trains: an smp U-Net that also exposes its decoder scales.

Methods need more than the final logits: multi-scale KD (ScribSD+) needs a prediction at every
decoder scale, contrastive methods (ACTION, ScribSD+) need pixel embeddings and the encoder
bottleneck. ``segmentation_models_pytorch.Unet.forward`` returns only the logits, so
:class:`SegmentationNetwork` runs the same encoder, decoder blocks and head itself and returns all
intermediate maps in a :class:`NetworkOutput`. A test checks that its logits equal smp's own
forward, so an smp upgrade that changes the decoder is caught.

Extra heads (deep-supervision heads, projection heads, predictors) are declared by the method with
:meth:`SegmentationNetwork.add_head`: they live inside the network, so the EMA teacher (a deep copy
of the student) has them too and the EMA callback updates them with everything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import segmentation_models_pytorch as smp
import torch
from torch import Tensor, nn

from kdseg.networks import plain_encoder


@dataclass
class NetworkOutput:
    """What one forward pass returns.

    Attributes:
        logits: ``(B, C, H, W)`` class scores at input resolution.
        decoder_features: decoder block outputs, coarsest first, finest (input resolution) last;
            ``decoder_features[-k]`` is at ``1 / 2**(k-1)`` of the input size (``plain_unet``:
            ``1 / 2**(k-2)`` for k >= 2, its last two blocks both at input size).
        encoder_features: encoder stage outputs, finest first; ``encoder_features[-1]`` is the
            bottleneck.
    """

    logits: Tensor
    decoder_features: list[Tensor] = field(default_factory=list)
    encoder_features: list[Tensor] = field(default_factory=list)


class SegmentationNetwork(nn.Module):
    """An ``smp.Unet`` with access to its decoder scales and room for method-specific heads.

    Args:
        encoder_name: any smp / timm encoder (``resnet18``, ``tu-resnet10t``,
            ``tu-mobilenetv3_small_100``, ...), or ``plain_unet``: the classic U-Net encoder of
            WSL4MIS / SSL4MIS (:mod:`kdseg.networks.plain_encoder`; depth 5, its decoder's last two
            blocks are both at input resolution).
        encoder_weights: ``None`` (random init, works offline) or a name smp can download, or a
            path to a local ``state_dict`` file for the encoder (nothing is downloaded then).
        in_channels: image channels (1 for MRI).
        num_classes: output classes, background included.
        encoder_depth: number of encoder stages (3 to 5); the decoder has as many blocks.
        decoder_channels: channels of each decoder block, coarsest first; its length must equal
            ``encoder_depth``.
    """

    def __init__(
        self,
        encoder_name: str = "resnet18",
        encoder_weights: str | None = None,
        in_channels: int = 1,
        num_classes: int = 4,
        encoder_depth: int = 5,
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
    ) -> None:
        super().__init__()
        if len(decoder_channels) != encoder_depth:
            raise ValueError(
                f"decoder_channels has {len(decoder_channels)} entries but encoder_depth is "
                f"{encoder_depth}: give one channel count per decoder block"
            )
        if encoder_name == plain_encoder.NAME:
            plain_encoder.register()
        local_weights = None
        if encoder_weights is not None and (
            encoder_weights.endswith((".pt", ".pth", ".bin", ".safetensors"))
        ):
            local_weights, encoder_weights = encoder_weights, None
        self.unet = smp.Unet(
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=num_classes,
            encoder_depth=encoder_depth,
            decoder_channels=list(decoder_channels),
        )
        self._drop_unused_encoder_stages(in_channels)
        if local_weights is not None:
            self._load_encoder_weights(local_weights)
        self.num_classes = num_classes
        self.decoder_channels = tuple(decoder_channels)
        self.encoder_channels = tuple(self.unet.encoder.out_channels)
        self.heads = nn.ModuleDict()

    def _load_encoder_weights(self, path: str) -> None:
        """Loads a local encoder ``state_dict``; stages this depth does not use may be in it."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{path}: cannot read encoder weights ({error})") from error
        # nn.Module.load_state_dict: smp encoders override it and return nothing.
        result = nn.Module.load_state_dict(self.unet.encoder, state, strict=False)
        if result.missing_keys:
            raise ValueError(
                f"{path}: encoder weights lack {len(result.missing_keys)} tensors of "
                f"{type(self.unet.encoder).__name__}, e.g. {result.missing_keys[:3]}"
            )

    @torch.no_grad()
    def _drop_unused_encoder_stages(self, in_channels: int) -> None:
        """Removes encoder stages that a shallow ``encoder_depth`` never runs.

        smp keeps e.g. ResNet's ``layer3``/``layer4`` when ``encoder_depth=3``: their parameters
        would never get a gradient, which DDP rejects, and they waste memory. A probe forward pass
        finds the encoder's child modules that are never called; they become ``nn.Identity``.
        """
        encoder = self.unet.encoder
        called: set[int] = set()
        hooks = [m.register_forward_hook(lambda mod, i, o: called.add(id(mod))) for m in encoder.children()]
        was_training = encoder.training
        encoder.eval()
        size = int(encoder.output_stride) * 2
        try:
            encoder(torch.zeros(1, in_channels, size, size))
        finally:
            for hook in hooks:
                hook.remove()
            encoder.train(was_training)
        for name, child in list(encoder.named_children()):
            if id(child) not in called and any(True for _ in child.parameters()):
                setattr(encoder, name, nn.Identity())

    @property
    def output_stride(self) -> int:
        return int(self.unet.encoder.output_stride)

    def add_head(self, name: str, head: nn.Module) -> None:
        """Registers a method's extra head so that it is saved, copied to the teacher and EMA'd."""
        if name in self.heads:
            raise ValueError(f"a head named {name!r} is already registered")
        self.heads[name] = head

    def forward(self, image: Tensor) -> NetworkOutput:
        """Runs encoder, every decoder block and the segmentation head.

        Args:
            image: ``(B, in_channels, H, W)``; H and W divisible by :attr:`output_stride`.
        """
        self.unet.check_input_shape(image)
        encoder_features = self.unet.encoder(image)
        decoder_features = run_unet_decoder(self.unet.decoder, encoder_features)
        x = decoder_features[-1]
        logits = self.unet.segmentation_head(x)
        return NetworkOutput(
            logits=logits,
            decoder_features=decoder_features,
            encoder_features=list(encoder_features),
        )


def run_unet_decoder(decoder: nn.Module, encoder_features: list[Tensor]) -> list[Tensor]:
    """Runs an smp ``UnetDecoder`` on encoder features, returning every block's output
    (coarsest first). The same steps as ``UnetDecoder.forward``, which keeps only the last one;
    also used for extra decoders that share the encoder (e.g. DMPLS's auxiliary branch)."""
    spatial_shapes = [feature.shape[2:] for feature in encoder_features][::-1]
    deep_to_shallow = encoder_features[1:][::-1]
    x = decoder.center(deep_to_shallow[0])
    skips = deep_to_shallow[1:]
    outputs = []
    for i, block in enumerate(decoder.blocks):
        height, width = spatial_shapes[i + 1]
        x = block(x, height, width, skip_connection=skips[i] if i < len(skips) else None)
        outputs.append(x)
    return outputs
