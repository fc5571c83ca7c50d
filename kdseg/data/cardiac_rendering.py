"""Drawing the cardiac phantom: the label and the MR-like image of each slice of a heart.

A slice's label comes from the geometry of :class:`~kdseg.data.cardiac_anatomy.Anatomy` at its
position ``z``; the image paints the tissues of :class:`~kdseg.data.cardiac_anatomy.Appearance`
on it, then blurs it (partial volume), multiplies it by a smooth bias field, gives it Rician noise
and scales the volume to [0, 1] like the ACDC preprocessing.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from kdseg.data.cardiac_anatomy import BACKGROUND, LV, MYO, RV, Anatomy, Appearance

__all__ = ["render_slice", "render_volume"]


def _angle_diff(a: np.ndarray, b: float) -> np.ndarray:
    """``a - b`` wrapped to [-pi, pi)."""
    return (a - b + np.pi) % (2 * np.pi) - np.pi


def render_slice(anatomy: Anatomy, z: float) -> tuple[np.ndarray, dict]:
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


def _tissue_slice(anatomy: Anatomy, look: Appearance, label: np.ndarray, g: dict,
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


def _bias_field(look: Appearance, size: tuple[int, int]) -> np.ndarray:
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


def render_volume(anatomy: Anatomy, look: Appearance, zs: np.ndarray,
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
        label, geometry = render_slice(anatomy, float(z))
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
