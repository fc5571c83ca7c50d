"""The random heart of the cardiac phantom: its anatomy, tissue contrast and cardiac phase.

Classes as in ACDC: 0 background, 1 right ventricle (RV), 2 myocardium (Myo), 3 left-ventricle
blood pool (LV). Anatomy of one patient (all drawn from the random generator):

* LV: a bright, roughly elliptical blood pool whose radius is perturbed by a low-order Fourier
  series; a few dark papillary muscles inside it (labelled LV, as in ACDC).
* Myo: a dark ring of varying thickness around the LV; it always encloses the LV.
* RV: a bright (slightly dimmer than LV) crescent hugging the septal side of the myocardium,
  tapering at its ends; it touches the Myo but never overlaps it.
* Background: soft tissue with a smooth texture, dark lung, a mid-grey liver, a chest wall with
  bright subcutaneous fat and air beyond it, bright pericardial fat and vessels.

Along the slices (base -> apex) the structures shrink: the RV ends first, then the LV cavity
(leaving a Myo cap), and the last slice can be beyond the apex (background only).
:mod:`kdseg.data.cardiac_rendering` draws the label and the image of a slice from these records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BACKGROUND", "RV", "MYO", "LV", "NUM_CLASSES", "Anatomy", "Appearance", "Fourier",
    "at_phase", "sample_anatomy", "sample_appearance", "slice_positions",
]

BACKGROUND, RV, MYO, LV = 0, 1, 2, 3
NUM_CLASSES = 4

_FOURIER_ORDERS = np.arange(2, 5)  # orders 2..4: smooth wobbles, no jagged edges


@dataclass(frozen=True)
class Fourier:
    """Relative radius perturbation ``sum_k a_k cos(k theta + phi_k)``."""

    amps: np.ndarray
    phases: np.ndarray

    @staticmethod
    def sample(rng: np.random.Generator, scale: float) -> Fourier:
        # Amplitude falls with the order so the outline stays smooth.
        amps = rng.normal(0.0, scale, size=_FOURIER_ORDERS.size) / _FOURIER_ORDERS
        return Fourier(np.clip(amps, -2 * scale, 2 * scale),
                        rng.uniform(0, 2 * np.pi, size=_FOURIER_ORDERS.size))

    def __call__(self, theta: np.ndarray) -> np.ndarray:
        """Perturbation at angles ``theta`` (any 2D shape, e.g. ``(H, W)``), same shape."""
        k = _FOURIER_ORDERS[:, None, None]
        amps, phases = self.amps[:, None, None], self.phases[:, None, None]
        return np.sum(amps * np.cos(k * theta[None] + phases), axis=0)


@dataclass(frozen=True)
class Anatomy:
    """Geometry of one patient's heart and surroundings, in pixels of the (H, W) grid."""

    size: tuple[int, int]
    cy: float
    cx: float
    drift: tuple[float, float]  # centre shift (dy, dx) per unit of z: the long axis is tilted
    r_lv: float  # mean LV radius at the base
    ellipticity: float  # axis ratio factor (area-preserving)
    orientation: float  # ellipse orientation (rad)
    thick: float  # mean Myo thickness at the base
    lv_shape: Fourier
    thick_shape: Fourier
    rv_dir: float  # direction of the RV from the LV centre, image frame (rad)
    rv_half_angle: float  # angular half-extent of the RV crescent
    rv_width: float  # maximal radial width of the RV crescent at the base
    rv_shape: Fourier
    # Slice positions z in [0, 1] (0 = base): the RV ends at z_rv_end, the LV cavity at
    # z_apex, the Myo cap at z_end; slices are spread over [z_first, z_last].
    z_first: float
    z_last: float
    z_rv_end: float
    z_apex: float
    z_end: float
    papillary: tuple[tuple[float, float, float], ...]  # (angle, depth share, radius px)
    fat_angles: tuple[tuple[float, float], ...]  # pericardial fat (centre angle, half-width)
    fat_width: float
    lung: tuple[float, float, float, float, float]  # (cy, cx, ry, rx, angle)
    liver: tuple[float, float, float, float, float]
    wall_angle: float  # outward normal of the chest wall (rad)
    wall_dist: float  # distance of the chest wall from the heart centre
    wall_wobble: Fourier
    wall_muscle: float
    wall_fat: float
    vessels: tuple[tuple[float, float, float], ...]  # (cy, cx, radius)
    # Other organs/muscles around the heart: (ellipse, intensity as a share of lung..fat).
    blobs: tuple[tuple[tuple[float, float, float, float, float], float], ...]
    texture_seed: int


@dataclass(frozen=True)
class Appearance:
    """Tissue intensities (before bias, noise and scaling) and imaging parameters."""

    lv: float
    rv: float
    myo: float
    papillary: float
    soft: float
    fat: float
    liver: float
    lung: float
    air: float
    vessel: float
    texture: float
    noise: float
    blur: float
    bias: np.ndarray  # coefficients of a 2nd-order polynomial in log-intensity


def sample_anatomy(rng: np.random.Generator, size: tuple[int, int]) -> Anatomy:
    """A random heart (end-diastole) and its surroundings for an ``(H, W)`` grid."""
    h, w = size
    s = float(min(h, w))
    r_lv = rng.uniform(0.12, 0.17) * s
    thick = rng.uniform(0.055, 0.08) * s
    # The RV sits on the image left (patient right), as in ACDC short-axis views; the heart
    # centre is shifted right so the crescent stays in the field of view.
    rv_dir = np.pi + rng.uniform(-0.6, 0.6)
    z_rv_end = rng.uniform(0.68, 0.82)
    z_apex = rng.uniform(0.85, 0.95)
    z_end = z_apex + rng.uniform(0.06, 0.12)
    z_first = rng.uniform(0.0, 0.12)
    # The last slice is always past the RV, sometimes past the LV cavity or the whole heart,
    # so every volume has a slice with a missing structure.
    z_last = rng.uniform(max(z_rv_end + 0.04, z_apex - 0.06), z_end + 0.1)
    cy = rng.uniform(0.44, 0.56) * h
    cx = rng.uniform(0.52, 0.6) * w
    papillary = tuple((float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.6, 0.8)),
                       float(rng.uniform(0.05, 0.1) * r_lv + 0.3))
                      for _ in range(int(rng.integers(1, 4))))
    # Pericardial fat patches sit mostly opposite the RV (lateral wall).
    fat_angles = tuple((float(rv_dir + np.pi + rng.uniform(-1.5, 1.5)),
                        float(rng.uniform(0.3, 0.9)))
                       for _ in range(int(rng.integers(1, 3))))
    # Lung: dark, to the right/upper right of the heart; liver: below/left.
    a = rng.uniform(-1.2, 0.1)
    d = rng.uniform(0.45, 0.6) * s
    lung = (cy + d * np.sin(a), cx + d * np.cos(a), rng.uniform(0.2, 0.3) * s,
            rng.uniform(0.15, 0.25) * s, rng.uniform(0, np.pi))
    a = np.pi / 2 + rng.uniform(0.0, 0.8)
    d = rng.uniform(0.45, 0.6) * s
    liver = (cy + d * np.sin(a), cx + d * np.cos(a), rng.uniform(0.2, 0.3) * s,
             rng.uniform(0.3, 0.45) * s, rng.uniform(0, np.pi))
    vessels = []
    for _ in range(int(rng.integers(1, 4))):
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.42, 0.55) * s  # outside the heart (max extent ~0.4 s)
        vessels.append((cy + d * np.sin(a), cx + d * np.cos(a), rng.uniform(0.03, 0.06) * s))
    blobs = []
    for _ in range(int(rng.integers(2, 6))):
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.35, 0.65) * s
        blobs.append(((cy + d * np.sin(a), cx + d * np.cos(a), rng.uniform(0.04, 0.12) * s,
                       rng.uniform(0.04, 0.15) * s, rng.uniform(0, np.pi)),
                      float(rng.uniform(0.0, 1.0))))
    return Anatomy(
        size=(h, w), cy=cy, cx=cx,
        drift=(float(rng.normal(0, 0.04 * s)), float(rng.normal(0, 0.04 * s))),
        r_lv=r_lv, ellipticity=rng.uniform(0.87, 1.15), orientation=rng.uniform(0, np.pi),
        thick=thick, lv_shape=Fourier.sample(rng, 0.06), thick_shape=Fourier.sample(rng, 0.25),
        rv_dir=rv_dir, rv_half_angle=rng.uniform(0.9, 1.4), rv_width=rng.uniform(0.1, 0.16) * s,
        rv_shape=Fourier.sample(rng, 0.15),
        z_first=z_first, z_last=z_last, z_rv_end=z_rv_end, z_apex=z_apex, z_end=z_end,
        papillary=papillary, fat_angles=fat_angles, fat_width=rng.uniform(0.03, 0.06) * s,
        lung=lung, liver=liver,
        wall_angle=-np.pi / 2 + rng.uniform(-0.7, 0.5), wall_dist=rng.uniform(0.36, 0.48) * s,
        wall_wobble=Fourier.sample(rng, 0.1), wall_muscle=rng.uniform(0.03, 0.06) * s,
        wall_fat=rng.uniform(0.03, 0.06) * s, vessels=tuple(vessels), blobs=tuple(blobs),
        texture_seed=int(rng.integers(0, 2**31)),
    )


def sample_appearance(rng: np.random.Generator) -> Appearance:
    """Random tissue contrast, noise level, blur and bias field of one scan."""
    lv = rng.uniform(0.75, 0.95)
    myo = rng.uniform(0.18, 0.3)
    return Appearance(
        lv=lv, rv=lv * rng.uniform(0.8, 0.95), myo=myo, papillary=myo * rng.uniform(1.3, 1.8),
        soft=rng.uniform(0.22, 0.38), fat=rng.uniform(0.75, 1.0), liver=rng.uniform(0.3, 0.45),
        lung=rng.uniform(0.02, 0.08), air=rng.uniform(0.0, 0.02),
        vessel=lv * rng.uniform(0.85, 1.05), texture=rng.uniform(0.1, 0.25),
        noise=rng.uniform(0.01, 0.04), blur=rng.uniform(0.4, 0.9),
        bias=rng.normal(0.0, 0.12, size=5),
    )


def at_phase(anatomy: Anatomy, phase: float, rng: np.random.Generator) -> Anatomy:
    """The same heart at another cardiac phase (0 = end-diastole, 1 = end-systole).

    The LV cavity shrinks by the ejection and the myocardium thickens so that its area (its
    mass) is kept; the RV empties too. ``rng`` draws how strongly this heart contracts.
    """
    if phase == 0.0:
        return anatomy
    ejection = rng.uniform(0.15, 0.35) * phase  # radius shrink; weak hearts contract less
    r_lv = anatomy.r_lv * (1.0 - ejection)
    outer = anatomy.r_lv + anatomy.thick
    thick = float(np.sqrt(outer**2 - anatomy.r_lv**2 + r_lv**2) - r_lv)
    rv_width = anatomy.rv_width * (1.0 - rng.uniform(0.2, 0.4) * phase)
    return dataclasses.replace(anatomy, r_lv=r_lv, thick=thick, rv_width=rv_width)


def slice_positions(anatomy: Anatomy, num_slices: int) -> np.ndarray:
    """Positions z ``(D,)`` of the slices, base first."""
    if num_slices == 1:
        return np.array([anatomy.z_first])
    return np.linspace(anatomy.z_first, anatomy.z_last, num_slices)
