"""The noisy input view that ScribSD and ScribSD+ share: clipped Gaussian noise on the input of
one network, the student's or the teacher's, named by ``noise_on``."""

from __future__ import annotations

from torch import Tensor

from kdseg.data.augment import clipped_gaussian_noise

NOISE_SIDES = ("teacher", "student", "none")


class NoisyViewMixin:
    """``perturb(image, side)``: ``image + clamp(N(0, s^2), -2s, 2s)`` when ``side`` is the
    network named by ``noise_on``, else ``image`` unchanged (``s`` = ``noise_std``)."""

    noise_std: float
    noise_on: str

    def init_noisy_view(self, noise_std: float, noise_on: str) -> None:
        if noise_on not in NOISE_SIDES:
            raise ValueError(f"noise_on must be 'teacher', 'student' or 'none', got {noise_on!r}")
        self.noise_std = noise_std
        self.noise_on = noise_on

    def perturb(self, image: Tensor, side: str) -> Tensor:
        if side != self.noise_on:
            return image
        return clipped_gaussian_noise(image, self.noise_std, 2 * self.noise_std)
