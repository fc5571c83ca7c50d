"""The strong perturbation pipeline methods ask for, applied to a batch on its device.

Weak augmentation (geometry) happens per slice in the data loader (:mod:`kdseg.data.slices`);
strong perturbations are photometric and mixing operations that semi-supervised methods apply to
the *student's* view only (FixMatch-style), so they live here as batch functions that a method
calls in ``training_step`` on the GPU, with the teacher seeing the unperturbed batch.

- :class:`StrongPerturbation`: random brightness, contrast, gamma, Gaussian blur and Gaussian
  noise per image (each with its own probability), intensities kept in [0, 1].
- :func:`cutmix`: pastes a random box of a permuted batch into each image, returning the mixed
  images and the box mask so targets / pseudo-labels can be mixed the same way.
- :func:`random_erasing`: blanks random boxes (cut-out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_image(shape: tuple[int, ...], low: float, high: float, device: torch.device,
               generator: torch.Generator | None) -> Tensor:
    return torch.empty(shape[0], 1, 1, 1, device=device).uniform_(low, high, generator=generator)


def _apply(prob: float, n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    return (torch.rand(n, 1, 1, 1, device=device, generator=generator) < prob).float()


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Blurs each image of ``(B, C, H, W)`` with its own ``sigma`` ``(B,)`` (pixels)."""
    radius = max(int(torch.ceil(3 * sigma.max()).item()), 1)
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)  # (B, K)
    b, c, h, w = images.shape
    flat = images.reshape(1, b * c, h, w)
    k = kernels.repeat_interleave(c, dim=0)  # (B*C, K)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


@dataclass
class StrongPerturbation:
    """Photometric strong augmentation of a batch ``(B, C, H, W)`` with values in [0, 1].

    Each transform is applied to each image independently with probability ``p``.

    Args:
        brightness: additive shift range ``[-brightness, brightness]``.
        contrast: multiplicative range ``[1 - contrast, 1 + contrast]`` around the image mean.
        gamma: exponent range ``[1 - gamma, 1 + gamma]``.
        blur_sigma: range of the Gaussian blur sigma in pixels.
        noise_std: standard deviation of additive Gaussian noise.
        p: probability of each transform.
    """

    brightness: float = 0.2
    contrast: float = 0.3
    gamma: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_std: float = 0.05
    p: float = 0.5

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n, device = images.shape[0], images.device
        x = images.clamp(0, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        factor = _per_image(x.shape, 1 - self.contrast, 1 + self.contrast, device, generator)
        use = _apply(self.p, n, device, generator)
        x = use * ((x - mean) * factor + mean) + (1 - use) * x
        shift = _per_image(x.shape, -self.brightness, self.brightness, device, generator)
        x = x + _apply(self.p, n, device, generator) * shift
        x = x.clamp(0, 1)
        exponent = _per_image(x.shape, 1 - self.gamma, 1 + self.gamma, device, generator)
        use = _apply(self.p, n, device, generator)
        x = use * x.clamp_min(1e-6) ** exponent + (1 - use) * x
        sigma = torch.empty(n, device=device).uniform_(*self.blur_sigma, generator=generator)
        use = _apply(self.p, n, device, generator)
        x = use * gaussian_blur(x, sigma) + (1 - use) * x
        noise = torch.randn(x.shape, device=device, generator=generator) * self.noise_std
        x = x + _apply(self.p, n, device, generator) * noise
        return x.clamp(0, 1)


def random_boxes(n: int, height: int, width: int, area_range: tuple[float, float], device: torch.device,
                 generator: torch.Generator | None = None) -> Tensor:
    """``(n, H, W)`` bool masks, each one random axis-aligned box covering a fraction of the
    image drawn from ``area_range`` (aspect ratio between 1/2 and 2)."""
    masks = torch.zeros(n, height, width, dtype=torch.bool, device=device)
    for i in range(n):
        area = float(torch.empty(1).uniform_(*area_range, generator=generator)) * height * width
        ratio = float(torch.exp(torch.empty(1).uniform_(-0.693, 0.693, generator=generator)))
        h = max(1, min(height, int(round((area * ratio) ** 0.5))))
        w = max(1, min(width, int(round((area / ratio) ** 0.5))))
        top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
        masks[i, top : top + h, left : left + w] = True
    return masks


def cutmix(images: Tensor, area_range: tuple[float, float] = (0.25, 0.5),
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """CutMix (Yun et al. 2019) within a batch.

    Args:
        images: ``(B, C, H, W)``.

    Returns:
        ``(mixed, box, permutation)``: ``mixed[i] = images[i]`` outside ``box[i]`` and
        ``images[permutation[i]]`` inside; mix a dense target the same way with
        ``torch.where(box, target[permutation], target)``.
    """
    n, _, h, w = images.shape
    permutation = torch.randperm(n, generator=generator).to(images.device)
    box = random_boxes(n, h, w, area_range, images.device, generator)
    mixed = torch.where(box[:, None], images[permutation], images)
    return mixed, box, permutation


def random_erasing(images: Tensor, p: float = 0.5, area_range: tuple[float, float] = (0.02, 0.2),
                   value: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Blanks one random box per image with probability ``p`` (Zhong et al. 2020)."""
    n, _, h, w = images.shape
    box = random_boxes(n, h, w, area_range, images.device, generator)
    use = torch.rand(n, device=images.device, generator=generator) < p
    box = box & use[:, None, None]
    return images.masked_fill(box[:, None], value)


def clipped_gaussian_noise(images: Tensor, std: float, clip: float) -> Tensor:
    """``images + clamp(N(0, std^2), -clip, clip)``: the mean-teacher input perturbation of
    SSL4MIS (std 0.1, clip 0.2), shared by Mean Teacher, UA-MT's MC passes and ScribSD+.

    Args:
        images: ``(B, C, H, W)`` (any shape); returned unchanged when ``std <= 0``.
    """
    if std <= 0:
        return images
    return images + (torch.randn_like(images) * std).clamp(-clip, clip)
