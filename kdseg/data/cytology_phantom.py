"""Synthetic Pap-smear-like images with overlapping cells, for fast tests and smoke runs.

The image is formed like a bright-field micrograph: a light background transmits light and each
object absorbs some of it, ``I = background * exp(-sum of absorbances)``. Cytoplasm is
translucent (low absorbance, with a slightly darker rim and a faint texture), so where two cells
overlap the absorbances add and the overlap looks darker, as in the ISBI 2014 images. Each cell
has one dark nucleus inside its cytoplasm. Small dark debris blobs (not annotated), blur and
noise are added.

Annotations follow ISBI 2014: one cytoplasm mask per cell covering the whole cell (nucleus
included), label 1, and one nucleus mask per cell, label 2.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from kdseg.data.instances import CYTOPLASM, NUCLEUS, InstanceSample


def _cell_outline(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
    wobble: float,
) -> np.ndarray:
    """Mask of a smoothly perturbed ellipse: polar radius = ellipse(theta) * (1 + sum_k a_k cos)."""
    aspect = rng.uniform(0.7, 1.0)
    a, b = r, r * aspect
    rot = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    rho = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    phi = theta - rot
    radius = a * b / np.sqrt((b * np.cos(phi)) ** 2 + (a * np.sin(phi)) ** 2)
    pert = np.ones_like(theta)
    for k in range(2, 8):
        pert += rng.uniform(-wobble, wobble) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return rho <= radius * pert


def _place_centres(
    rng: np.random.Generator, n: int, radii: np.ndarray, size: int, overlap: float
) -> list[tuple[float, float]]:
    """Cell centres: with probability ``overlap`` a cell is put overlapping an earlier one."""
    lo, hi = 0.12 * size, 0.88 * size
    centres: list[tuple[float, float]] = []
    for i in range(n):
        if centres and rng.random() < overlap:
            j = int(rng.integers(len(centres)))
            d = (radii[i] + radii[j]) * rng.uniform(0.35, 0.8)
            ang = rng.uniform(0, 2 * np.pi)
            cy = float(np.clip(centres[j][0] + d * np.sin(ang), lo, hi))
            cx = float(np.clip(centres[j][1] + d * np.cos(ang), lo, hi))
        else:  # try to land apart from the others
            best, best_gap = None, -np.inf
            for _ in range(20):
                cy, cx = rng.uniform(lo, hi, size=2)
                gap = min(
                    (np.hypot(cy - py, cx - px) - radii[i] - radii[k] for k, (py, px) in enumerate(centres)),
                    default=np.inf,
                )
                if gap > best_gap:
                    best, best_gap = (float(cy), float(cx)), gap
                if gap > 0:
                    break
            cy, cx = best  # type: ignore[misc]
        centres.append((cy, cx))
    return centres


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-8)


def make_cytology_phantom(
    num_images: int,
    seed: int,
    size: int = 128,
    cells_per_image: tuple[int, int] = (2, 6),
    overlap: float = 0.3,
) -> list[InstanceSample]:
    """Generate Pap-smear-like images with overlapping cells and their instance masks.

    Args:
        num_images: how many images.
        seed: image ``i`` is drawn from ``np.random.default_rng([seed, i])``, so it does not
            depend on ``num_images``.
        size: images are ``size x size``; cell and nucleus sizes scale with it (at 512 they are
            roughly ISBI-sized: cells of radius ~50-80 px, nuclei ~6-12 px).
        cells_per_image: inclusive range of the number of cells per image.
        overlap: probability that a cell is placed overlapping an earlier one (0 = cells placed
            apart when there is room, 1 = every cell after the first overlaps another).

    Returns:
        Samples ``phantom_<seed>_<i>`` with float32 images in [0, 1], the cytoplasm masks
        (label 1, whole cell) first, then the nuclei (label 2), nucleus ``k`` inside cell ``k``.
    """
    lo_c, hi_c = (int(v) for v in cells_per_image)
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if not 1 <= lo_c <= hi_c:
        raise ValueError(f"cells_per_image must be (lo, hi) with 1 <= lo <= hi, got {cells_per_image}")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be in [0, 1], got {overlap}")

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    samples = []
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        n = int(rng.integers(lo_c, hi_c + 1))
        radii = size * rng.uniform(0.10, 0.16, size=n)
        centres = _place_centres(rng, n, radii, size, overlap)

        absorb = np.zeros((size, size))
        cyto_masks, nuc_masks = [], []
        for (cy, cx), r in zip(centres, radii):
            cell = _cell_outline(rng, yy, xx, cy, cx, r, wobble=0.16)
            # nucleus: small ellipse near the centre, kept inside the cell
            rn = max(2.0, r * rng.uniform(0.11, 0.17))
            off = r * rng.uniform(0, 0.25)
            ang = rng.uniform(0, 2 * np.pi)
            nuc = _cell_outline(rng, yy, xx, cy + off * np.sin(ang), cx + off * np.cos(ang), rn, wobble=0.03)
            nuc &= ndimage.binary_erosion(cell, iterations=2)
            if not nuc.any():  # cannot happen with the radii above; keep the invariant anyway
                nuc = np.zeros_like(cell)
                nuc[int(cy), int(cx)] = True
            cyto_masks.append(cell)
            nuc_masks.append(nuc)

            soft = ndimage.gaussian_filter(cell.astype(np.float64), 0.8)
            rim = soft * (1.0 - ndimage.gaussian_filter(ndimage.binary_erosion(cell, iterations=2).astype(float), 1.0))
            texture = 1.0 + 0.15 * _smooth_noise(rng, (size, size), size / 64)
            absorb += rng.uniform(0.12, 0.35) * soft * texture + rng.uniform(0.1, 0.25) * rim
            absorb += rng.uniform(1.2, 1.9) * ndimage.gaussian_filter(nuc.astype(np.float64), 0.6)

        # debris: small dark specks, not annotated
        n_debris = int(rng.poisson(size * size / 1500))
        for _ in range(n_debris):
            dy, dx = rng.uniform(0, size, size=2)
            rd = rng.uniform(0.4, 1.0) * max(1.0, size / 384)
            absorb += rng.uniform(0.2, 0.8) * np.exp(-((yy - dy) ** 2 + (xx - dx) ** 2) / (2 * rd**2))

        background = rng.uniform(0.88, 0.95) + 0.03 * (
            (yy / size - 0.5) * rng.uniform(-1, 1) + (xx / size - 0.5) * rng.uniform(-1, 1)
        )
        image = background * np.exp(-absorb)
        image = ndimage.gaussian_filter(image, rng.uniform(0.5, 0.9))
        image = image + rng.uniform(0.005, 0.015) * rng.standard_normal(image.shape)
        image = np.clip(image, 0.0, 1.0).astype(np.float32)

        masks = np.stack(cyto_masks + nuc_masks).astype(bool)
        labels = np.array([CYTOPLASM] * n + [NUCLEUS] * n, dtype=np.int64)
        samples.append(InstanceSample(f"phantom_{seed}_{index:03d}", image, masks, labels, source=None))
    return samples
