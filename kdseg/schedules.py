"""Schedules over training steps: loss-weight ramps, UA-MT's threshold ramp and the learning rate.

Each is a pure function of the step, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math

__all__ = ["sigmoid_rampup", "uncertainty_threshold", "warmup_poly"]


def sigmoid_rampup(step: float, rampup_length: float) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = clip(step / rampup_length, 0, 1)`` (Laine & Aila 2017).

    ``rampup_length == 0`` means no ramp-up (weight 1 from the start).
    """
    if rampup_length <= 0:
        return 1.0
    t = min(max(step, 0.0), rampup_length) / rampup_length
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def uncertainty_threshold(step: int, rampup_steps: int, max_entropy: float = math.log(2)) -> float:
    """UA-MT's ramped threshold ``(0.75 + 0.25 * sigmoid_rampup(step, rampup_steps)) * max_entropy``:
    only the most certain pixels count early, nearly all later."""
    return (0.75 + 0.25 * sigmoid_rampup(step, rampup_steps)) * max_entropy


def warmup_poly(step: int, total_steps: int, power: float, warmup_steps: int = 0, warmup_factor: float = 1.0) -> float:
    """Learning-rate factor: linear from ``warmup_factor`` to 1 over ``warmup_steps``, then
    ``(1 - step / total_steps) ** power`` (the SSL4MIS / WSL4MIS poly decay), never below 0."""
    if step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * step / warmup_steps
    return max(1.0 - step / total_steps, 0.0) ** power
