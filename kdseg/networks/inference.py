"""Slice-by-slice prediction of a whole volume at its original in-plane size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdseg.data.slices import resize_slice


@torch.no_grad()
def predict_volume_probabilities(
    network: nn.Module, image: Tensor, input_size: int, slice_batch_size: int = 16
) -> Tensor:
    """Class probabilities of a volume, predicted slice by slice.

    Each slice is resized to the training size ``input_size``, segmented, and its probabilities
    are resized back to the slice's own size bilinearly (resizing probabilities rather than the
    arg-max label, as SSL4MIS does with nearest zoom, avoids blocky boundaries when the original
    size is larger than ``input_size``).

    Args:
        network: returns a :class:`~kdseg.networks.unet.NetworkOutput` or logits.
        image: ``(D, H, W)`` float.
        input_size: the network's training input size.

    Returns:
        ``(C, D, H, W)`` float32 probabilities on ``image``'s device.
    """
    depth, height, width = image.shape
    chunks = []
    for start in range(0, depth, slice_batch_size):
        x = resize_slice(image[start : start + slice_batch_size], input_size, "bilinear")[:, None]
        out = network(x)
        logits = out.logits if hasattr(out, "logits") else out
        probs = torch.softmax(logits.float(), dim=1)
        if probs.shape[-2:] != (height, width):
            probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
        chunks.append(probs)
    return torch.cat(chunks, dim=0).permute(1, 0, 2, 3).contiguous()


def predict_volume(network: nn.Module, image: Tensor, input_size: int, slice_batch_size: int = 16) -> Tensor:
    """Arg-max label ``(D, H, W)`` long of :func:`predict_volume_probabilities`."""
    return predict_volume_probabilities(network, image, input_size, slice_batch_size).argmax(dim=0)
