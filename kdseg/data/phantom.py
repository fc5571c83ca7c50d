"""A synthetic cardiac short-axis cine-MRI phantom with ACDC classes.

Classes as in ACDC: 0 background, 1 right ventricle (RV), 2 myocardium (Myo), 3 left-ventricle
blood pool (LV). The phantom lets the whole pipeline (readers, training, metrics) run and be
tested without the real data, and exercises the hard cases real data has: structures missing
at the apex, bright background tissue (fat, vessels) that looks like blood, a bias field and
noise.

Anatomy of one volume (all drawn from the random generator):

* LV: a bright, roughly elliptical blood pool whose radius is perturbed by a low-order Fourier
  series; a few dark papillary muscles inside it (labelled LV, as in ACDC).
* Myo: a dark ring of varying thickness around the LV; it always encloses the LV.
* RV: a bright (slightly dimmer than LV) crescent hugging the septal side of the myocardium,
  tapering at its ends; it touches the Myo but never overlaps it.
* Background: soft tissue with a smooth texture, dark lung, a mid-grey liver, a chest wall with
  bright subcutaneous fat and air beyond it, bright pericardial fat and vessels.

Along the slices (base -> apex) the structures shrink: the RV ends first, then the LV cavity
(leaving a Myo cap), and the last slice can be beyond the apex (background only). The image is
blurred (partial volume), multiplied by a smooth bias field, given Rician noise and scaled to
[0, 1] per volume like the ACDC preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage as ndi

from kdseg.data.scribbles import scribbles_from_label
from kdseg.data.volume import DataError, Volume

__all__ = [
    "generate_cardiac_volume",
    "generate_cardiac_slice",
    "make_phantom_volumes",
    "write_acdc_like",
    "BACKGROUND",
    "RV",
    "MYO",
    "LV",
    "SCRIBBLE_IGNORE_INDEX",
]

BACKGROUND, RV, MYO, LV = 0, 1, 2, 3
NUM_CLASSES = 4
#: Value of unannotated pixels in scribbles (as in the ACDC scribble files).
SCRIBBLE_IGNORE_INDEX = 4

_FOURIER_ORDERS = np.arange(2, 5)  # orders 2..4: smooth wobbles, no jagged edges


@dataclass(frozen=True)
class _Fourier:
    """Relative radius perturbation ``sum_k a_k cos(k theta + phi_k)``."""

    amps: np.ndarray
    phases: np.ndarray

    @staticmethod
    def sample(rng: np.random.Generator, scale: float) -> _Fourier:
        # Amplitude falls with the order so the outline stays smooth.
        amps = rng.normal(0.0, scale, size=_FOURIER_ORDERS.size) / _FOURIER_ORDERS
        return _Fourier(np.clip(amps, -2 * scale, 2 * scale),
                        rng.uniform(0, 2 * np.pi, size=_FOURIER_ORDERS.size))

    def __call__(self, theta: np.ndarray) -> np.ndarray:
        """Perturbation at angles ``theta`` (any 2D shape, e.g. ``(H, W)``), same shape."""
        k = _FOURIER_ORDERS[:, None, None]
        amps, phases = self.amps[:, None, None], self.phases[:, None, None]
        return np.sum(amps * np.cos(k * theta[None] + phases), axis=0)


@dataclass(frozen=True)
class _Anatomy:
    """Geometry of one patient's heart and surroundings, in pixels of the (H, W) grid."""

    size: tuple[int, int]
    cy: float
    cx: float
    drift: tuple[float, float]  # centre shift (dy, dx) per unit of z: the long axis is tilted
    r_lv: float  # mean LV radius at the base
    ellipticity: float  # axis ratio factor (area-preserving)
    orientation: float  # ellipse orientation (rad)
    thick: float  # mean Myo thickness at the base
    lv_shape: _Fourier
    thick_shape: _Fourier
    rv_dir: float  # direction of the RV from the LV centre, image frame (rad)
    rv_half_angle: float  # angular half-extent of the RV crescent
    rv_width: float  # maximal radial width of the RV crescent at the base
    rv_shape: _Fourier
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
    wall_wobble: _Fourier
    wall_muscle: float
    wall_fat: float
    vessels: tuple[tuple[float, float, float], ...]  # (cy, cx, radius)
    # Other organs/muscles around the heart: (ellipse, intensity as a share of lung..fat).
    blobs: tuple[tuple[tuple[float, float, float, float, float], float], ...]
    texture_seed: int


@dataclass(frozen=True)
class _Appearance:
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


def _sample_anatomy(rng: np.random.Generator, size: tuple[int, int]) -> _Anatomy:
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
    return _Anatomy(
        size=(h, w), cy=cy, cx=cx,
        drift=(float(rng.normal(0, 0.04 * s)), float(rng.normal(0, 0.04 * s))),
        r_lv=r_lv, ellipticity=rng.uniform(0.87, 1.15), orientation=rng.uniform(0, np.pi),
        thick=thick, lv_shape=_Fourier.sample(rng, 0.06), thick_shape=_Fourier.sample(rng, 0.25),
        rv_dir=rv_dir, rv_half_angle=rng.uniform(0.9, 1.4), rv_width=rng.uniform(0.1, 0.16) * s,
        rv_shape=_Fourier.sample(rng, 0.15),
        z_first=z_first, z_last=z_last, z_rv_end=z_rv_end, z_apex=z_apex, z_end=z_end,
        papillary=papillary, fat_angles=fat_angles, fat_width=rng.uniform(0.03, 0.06) * s,
        lung=lung, liver=liver,
        wall_angle=-np.pi / 2 + rng.uniform(-0.7, 0.5), wall_dist=rng.uniform(0.36, 0.48) * s,
        wall_wobble=_Fourier.sample(rng, 0.1), wall_muscle=rng.uniform(0.03, 0.06) * s,
        wall_fat=rng.uniform(0.03, 0.06) * s, vessels=tuple(vessels), blobs=tuple(blobs),
        texture_seed=int(rng.integers(0, 2**31)),
    )


def _sample_appearance(rng: np.random.Generator) -> _Appearance:
    """Random tissue contrast, noise level, blur and bias field of one scan."""
    lv = rng.uniform(0.75, 0.95)
    myo = rng.uniform(0.18, 0.3)
    return _Appearance(
        lv=lv, rv=lv * rng.uniform(0.8, 0.95), myo=myo, papillary=myo * rng.uniform(1.3, 1.8),
        soft=rng.uniform(0.22, 0.38), fat=rng.uniform(0.75, 1.0), liver=rng.uniform(0.3, 0.45),
        lung=rng.uniform(0.02, 0.08), air=rng.uniform(0.0, 0.02),
        vessel=lv * rng.uniform(0.85, 1.05), texture=rng.uniform(0.1, 0.25),
        noise=rng.uniform(0.01, 0.04), blur=rng.uniform(0.4, 0.9),
        bias=rng.normal(0.0, 0.12, size=5),
    )


def _at_phase(anatomy: _Anatomy, phase: float, rng: np.random.Generator) -> _Anatomy:
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


def _slice_positions(anatomy: _Anatomy, num_slices: int) -> np.ndarray:
    """Positions z ``(D,)`` of the slices, base first."""
    if num_slices == 1:
        return np.array([anatomy.z_first])
    return np.linspace(anatomy.z_first, anatomy.z_last, num_slices)


def _angle_diff(a: np.ndarray, b: float) -> np.ndarray:
    """``a - b`` wrapped to [-pi, pi)."""
    return (a - b + np.pi) % (2 * np.pi) - np.pi


def _render_slice(anatomy: _Anatomy, z: float) -> tuple[np.ndarray, dict]:
    """Label ``(H, W)`` uint8 of the slice at position ``z`` and geometry for the image."""
    h, w = anatomy.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy = anatomy.cy + anatomy.drift[0] * (z - 0.5)
    cx = anatomy.cx + anatomy.drift[1] * (z - 0.5)
    dy, dx = yy - cy, xx - cx
    # Elliptic frame: rotate, then stretch one axis and squeeze the other (area kept).
    co, si = np.cos(anatomy.orientation), np.sin(anatomy.orientation)
    u = (dx * co + dy * si) / anatomy.ellipticity
    v = (-dx * si + dy * co) * anatomy.ellipticity
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    theta_img = np.arctan2(dy, dx)

    # Radii shrink towards the apex like a half-ellipsoid; the cavity closes before the wall.
    f_lv = np.sqrt(np.clip(1.0 - (z / anatomy.z_apex) ** 2, 0.0, 1.0))
    f_epi = np.sqrt(np.clip(1.0 - (z / anatomy.z_end) ** 2, 0.0, 1.0))
    r_endo = anatomy.r_lv * f_lv * (1.0 + anatomy.lv_shape(theta))
    thick = anatomy.thick * np.sqrt(f_epi) * np.clip(1.0 + anatomy.thick_shape(theta), 0.5, 1.6)
    r_epi = r_endo + thick
    lv = r < r_endo
    epi = r < r_epi

    f_rv = np.sqrt(np.clip(1.0 - z / anatomy.z_rv_end, 0.0, 1.0))
    delta = _angle_diff(theta_img, anatomy.rv_dir)
    bump = np.clip(1.0 - (delta / anatomy.rv_half_angle) ** 2, 0.0, 1.0) ** 0.6
    rv_w = anatomy.rv_width * f_rv * bump * (1.0 + anatomy.rv_shape(theta_img))
    rv = (r >= r_epi) & (r < r_epi + rv_w) & (rv_w > 0.5) & (f_epi > 0)

    label = np.zeros((h, w), dtype=np.uint8)
    label[rv] = RV
    label[epi & (f_epi > 0)] = MYO
    if lv.any():
        label[lv] = LV
        # A one-pixel Myo ring around the LV whatever the sampled thickness: the Myo always
        # encloses the LV, and the RV never touches the LV.
        ring = ndi.binary_dilation(lv, np.ones((3, 3), bool)) & ~lv
        label[ring] = MYO
    # Discretisation can cut off the tapering RV tips: keep one crescent.
    rv_now = label == RV
    if rv_now.any():
        comp, n = ndi.label(rv_now, structure=np.ones((3, 3), bool))
        if n > 1:
            keep = int(np.argmax(np.bincount(comp.ravel())[1:])) + 1
            label[rv_now & (comp != keep)] = BACKGROUND
    geometry = dict(yy=yy, xx=xx, cy=cy, cx=cx, r=r, theta=theta, theta_img=theta_img,
                    r_endo=r_endo, r_epi=r_epi)
    return label, geometry


def _ellipse(yy: np.ndarray, xx: np.ndarray,
             e: tuple[float, float, float, float, float]) -> np.ndarray:
    """Bool ``(H, W)`` mask of the ellipse ``(cy, cx, ry, rx, angle)``."""
    cy, cx, ry, rx, a = e
    dy, dx = yy - cy, xx - cx
    co, si = np.cos(a), np.sin(a)
    return ((dx * co + dy * si) / rx) ** 2 + ((-dx * si + dy * co) / ry) ** 2 < 1.0


def _tissue_slice(anatomy: _Anatomy, look: _Appearance, label: np.ndarray, g: dict,
                  texture: np.ndarray) -> np.ndarray:
    """Noise-free intensities ``(H, W)`` of one slice."""
    yy, xx = g["yy"], g["xx"]
    img = np.full(label.shape, look.soft) * (1.0 + texture)
    img[_ellipse(yy, xx, anatomy.liver)] = look.liver
    for ellipse, share in anatomy.blobs:
        img[_ellipse(yy, xx, ellipse)] = look.lung + share * (look.fat - look.lung)
    img[_ellipse(yy, xx, anatomy.lung)] = look.lung
    for vy, vx, vr in anatomy.vessels:
        img[np.hypot(yy - vy, xx - vx) < vr] = look.vessel
    # Chest wall: muscle, then bright subcutaneous fat, then air, along a wobbly line.
    nrm = anatomy.wall_angle
    along = -(xx - anatomy.cx) * np.sin(nrm) + (yy - anatomy.cy) * np.cos(nrm)
    out = (xx - anatomy.cx) * np.cos(nrm) + (yy - anatomy.cy) * np.sin(nrm)
    out = out - anatomy.wall_dist * (1.0 + anatomy.wall_wobble(along / max(label.shape) * np.pi))
    img[(out > 0) & (out <= anatomy.wall_muscle)] = look.soft * 0.8
    fat = (out > anatomy.wall_muscle) & (out <= anatomy.wall_muscle + anatomy.wall_fat)
    img[fat] = look.fat
    img[out > anatomy.wall_muscle + anatomy.wall_fat] = look.air
    # Pericardial fat: bright patches just outside the epicardium, away from the RV. It is
    # background in the label, so bright does not mean blood.
    r, r_epi, th = g["r"], g["r_epi"], g["theta_img"]
    shell = (r >= r_epi) & (r < r_epi + anatomy.fat_width) & (label == BACKGROUND)
    for centre, half in anatomy.fat_angles:
        img[shell & (np.abs(_angle_diff(th, centre)) < half)] = look.fat
    img[label == RV] = look.rv
    img[label == MYO] = look.myo
    lv = label == LV
    img[lv] = look.lv
    # Papillary muscles: dark spots in the cavity near the wall, labelled LV as in ACDC.
    for ang, depth, rad in anatomy.papillary:
        rr = float(np.mean(g["r_endo"])) * depth
        py = g["cy"] + rr * np.sin(ang)
        px = g["cx"] + rr * np.cos(ang)
        img[lv & (np.hypot(yy - py, xx - px) < rad)] = look.papillary
    return img


def _bias_field(look: _Appearance, size: tuple[int, int]) -> np.ndarray:
    """Smooth multiplicative coil-sensitivity field ``(H, W)``."""
    h, w = size
    y = np.linspace(-1.0, 1.0, h)[:, None]
    x = np.linspace(-1.0, 1.0, w)[None, :]
    c = look.bias
    # Second-order polynomial in log space: a smooth multiplicative field of roughly +-30 %
    # (centred terms so the mean gain stays near 1).
    log_bias = (c[0] * x + c[1] * y + c[2] * x * y + c[3] * (x**2 - 1 / 3)
                + c[4] * (y**2 - 1 / 3))
    return np.exp(log_bias)


def _generate(anatomy: _Anatomy, look: _Appearance, zs: np.ndarray,
              noise_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Image float32 ``(D, H, W)`` in [0, 1] and label uint8 ``(D, H, W)``."""
    h, w = anatomy.size
    tex_rng = np.random.default_rng(anatomy.texture_seed)
    # Smooth tissue texture (same for every frame of the patient: it is anatomy, not noise).
    texture = ndi.gaussian_filter(tex_rng.normal(size=(h, w)), sigma=max(1.5, min(h, w) / 24))
    texture *= look.texture / max(float(np.abs(texture).max()), 1e-8)
    bias = _bias_field(look, (h, w))
    labels = np.zeros((len(zs), h, w), dtype=np.uint8)
    images = np.zeros((len(zs), h, w), dtype=np.float64)
    for i, z in enumerate(zs):
        label, geometry = _render_slice(anatomy, float(z))
        tissue = _tissue_slice(anatomy, look, label, geometry, texture)
        tissue = ndi.gaussian_filter(tissue, sigma=look.blur)  # partial-volume blur
        tissue *= bias * noise_rng.uniform(0.95, 1.05)  # per-slice gain, as in cine stacks
        # Magnitude images have Rician noise: dark areas get a positive noise floor.
        re = tissue + noise_rng.normal(0.0, look.noise, size=(h, w))
        im = noise_rng.normal(0.0, look.noise, size=(h, w))
        images[i] = np.hypot(re, im)
        labels[i] = label
    # Per-volume scaling to [0, 1] (ACDC preprocessing), robust to a few bright noise pixels.
    lo = float(images.min())
    hi = float(np.percentile(images, 99.8))
    image = np.clip((images - lo) / max(hi - lo, 1e-8), 0.0, 1.0).astype(np.float32)
    return image, labels


def _check_size(num_slices: int, size: tuple[int, int]) -> tuple[int, int]:
    """``size`` as ints; ValueError for sizes the anatomy cannot be drawn at."""
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"size must be (H, W) with H, W >= 16, got {size}")
    return int(size[0]), int(size[1])


def generate_cardiac_volume(rng: np.random.Generator, num_slices: int,
                            size: tuple[int, int], *, phase: float = 0.0
                            ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic short-axis stack from base to apex.

    Args:
        rng: draws the anatomy, the appearance and the noise.
        num_slices: D, number of slices spread from the base to (or past) the apex; the last
            slice never has an RV and may have no LV cavity or no heart at all. With
            ``num_slices == 1`` the single slice is basal with all structures present.
        size: ``(H, W)`` in pixels (>= 16 each).
        phase: cardiac phase, 0 = end-diastole, 1 = end-systole (smaller LV, thicker Myo).

    Returns:
        ``(image, label)``: image float32 ``(D, H, W)`` in [0, 1]; label uint8 ``(D, H, W)``
        with 0 background, 1 RV, 2 Myo, 3 LV.
    """
    size = _check_size(num_slices, size)
    anatomy = _sample_anatomy(rng, size)
    look = _sample_appearance(rng)
    anatomy = _at_phase(anatomy, phase, rng)
    return _generate(anatomy, look, _slice_positions(anatomy, num_slices), rng)


def generate_cardiac_slice(rng: np.random.Generator, size: tuple[int, int]
                           ) -> tuple[np.ndarray, np.ndarray]:
    """One mid-ventricular 2D slice with all four classes present.

    Returns:
        ``(image, label)``: image float32 ``(H, W)`` in [0, 1]; label uint8 ``(H, W)``.
    """
    size = _check_size(1, size)
    anatomy = _sample_anatomy(rng, size)
    look = _sample_appearance(rng)
    # Mid-ventricular: well before the RV ends (z_rv_end >= 0.68), so RV, Myo and LV are large.
    z = rng.uniform(0.2, 0.4)
    image, label = _generate(anatomy, look, np.array([z]), rng)
    return image[0], label[0]


def make_phantom_volumes(num_patients: int, seed: int, num_slices: int = 8,
                         size: tuple[int, int] = (64, 64),
                         frames: tuple[str, ...] = ("frame01", "frame12"),
                         with_scribbles: bool = True,
                         spacing: tuple[float, float, float] = (10.0, 1.5, 1.5),
                         patient_indices: Sequence[int] | None = None) -> list[Volume]:
    """Phantom patients, each with one volume per frame, as :class:`Volume` records.

    Deterministic: patient ``p`` depends only on ``(seed, p)`` (not on ``num_patients``), and
    frame ``f`` of it only on ``(seed, p, f)``. All frames of a patient share its anatomy and
    tissue contrast; frame 0 is end-diastole and the last is end-systole (frames between are
    interpolated), each with its own noise.

    Args:
        num_patients: number of patients (ids ``phantom000``, ``phantom001``, ...).
        seed: base seed.
        num_slices: D of every volume.
        size: ``(H, W)``.
        frames: frame names; case ids are ``<patient>_<frame>``.
        with_scribbles: add scribbles from :func:`scribbles_from_label` (4 = not annotated).
        spacing: ``(z, y, x)`` voxel size in mm.
        patient_indices: generate only these patients (``num_patients`` is then ignored): a
            split's patients without generating the others.

    Returns:
        ``num_patients * len(frames)`` volumes, patient-major, with ``source=None`` and
        ``source_format="phantom"``.
    """
    if num_patients < 0:
        raise ValueError(f"num_patients must be >= 0, got {num_patients}")
    if not frames or len(set(frames)) != len(frames):
        raise ValueError(f"frames must be non-empty and unique, got {frames}")
    size = _check_size(num_slices, size)
    volumes: list[Volume] = []
    for p in patient_indices if patient_indices is not None else range(num_patients):
        patient_rng = np.random.default_rng([seed, p])
        anatomy = _sample_anatomy(patient_rng, size)
        look = _sample_appearance(patient_rng)
        contraction_seed = np.random.SeedSequence([seed, p, 2**20])
        patient_id = f"phantom{p:03d}"
        for f, frame in enumerate(frames):
            phase = f / (len(frames) - 1) if len(frames) > 1 else 0.0
            # The same contraction strength for every frame of the patient.
            frame_anatomy = _at_phase(anatomy, phase, np.random.default_rng(contraction_seed))
            noise_ss, scribble_ss = np.random.SeedSequence([seed, p, f]).spawn(2)
            zs = _slice_positions(anatomy, num_slices)  # same slice planes in every frame
            image, label = _generate(frame_anatomy, look, zs, np.random.default_rng(noise_ss))
            scribble = None
            if with_scribbles:
                scribble = scribbles_from_label(label, num_classes=NUM_CLASSES,
                                                ignore_index=SCRIBBLE_IGNORE_INDEX,
                                                rng=np.random.default_rng(scribble_ss))
            volumes.append(Volume(case_id=f"{patient_id}_{frame}", patient_id=patient_id,
                                  image=image, label=label, scribble=scribble,
                                  spacing=tuple(float(v) for v in spacing), source=None,
                                  source_format="phantom"))
    return volumes


def write_acdc_like(root: Path, volumes: list[Volume], splits: dict[str, list[str]]) -> Path:
    """Write volumes in the layout of the shared ACDC folder, for testing the readers.

    Layout: ``root/volumes/<case_id>.h5`` with gzip datasets ``image`` float32 ``(D, H, W)``,
    ``label`` uint8 and ``scribble`` uint16 (as in the real files; a None label or scribble is
    not written), and ``root/splits/<name>.txt`` with one patient id per line. Split contents
    are written as given (not checked against the volumes) so tests can also build broken
    folders.

    Returns:
        ``root``.
    """
    root = Path(root)
    vol_dir = root / "volumes"
    split_dir = root / "splits"
    vol_dir.mkdir(parents=True, exist_ok=True)
    split_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for vol in volumes:
        if vol.case_id in seen:
            raise DataError(f"write_acdc_like: duplicate case id {vol.case_id!r}")
        seen.add(vol.case_id)
        with h5py.File(vol_dir / f"{vol.case_id}.h5", "w") as f:
            f.create_dataset("image", data=np.asarray(vol.image, dtype=np.float32),
                             compression="gzip")
            if vol.label is not None:
                f.create_dataset("label", data=np.asarray(vol.label, dtype=np.uint8),
                                 compression="gzip")
            if vol.scribble is not None:
                f.create_dataset("scribble", data=np.asarray(vol.scribble, dtype=np.uint16),
                                 compression="gzip")
    for name, patients in splits.items():
        text = "".join(f"{pid}\n" for pid in patients)
        (split_dir / f"{name}.txt").write_text(text)
    return root
