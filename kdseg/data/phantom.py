"""A synthetic cardiac short-axis cine-MRI phantom with ACDC classes.

The phantom lets the whole pipeline (readers, training, metrics) run and be tested without the
real data, and exercises the hard cases real data has: structures missing at the apex, bright
background tissue (fat, vessels) that looks like blood, a bias field and noise. The heart and its
surroundings are drawn by :mod:`kdseg.data.cardiac_anatomy` and rendered by
:mod:`kdseg.data.cardiac_rendering`; this module makes volumes, patients and their scribbles, and
writes them in the ACDC HDF5 layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from kdseg.data.cardiac_anatomy import NUM_CLASSES, at_phase, sample_anatomy, sample_appearance, slice_positions
from kdseg.data.cardiac_rendering import render_volume
from kdseg.data.scribbles import scribbles_from_label
from kdseg.data.volume import DataError, Volume

__all__ = [
    "generate_cardiac_volume",
    "generate_cardiac_slice",
    "make_phantom_volumes",
    "write_acdc_like",
    "SCRIBBLE_IGNORE_INDEX",
]

#: Value of unannotated pixels in scribbles (as in the ACDC scribble files).
SCRIBBLE_IGNORE_INDEX = 4


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
    anatomy = sample_anatomy(rng, size)
    look = sample_appearance(rng)
    anatomy = at_phase(anatomy, phase, rng)
    return render_volume(anatomy, look, slice_positions(anatomy, num_slices), rng)


def generate_cardiac_slice(rng: np.random.Generator, size: tuple[int, int]
                           ) -> tuple[np.ndarray, np.ndarray]:
    """One mid-ventricular 2D slice with all four classes present.

    Returns:
        ``(image, label)``: image float32 ``(H, W)`` in [0, 1]; label uint8 ``(H, W)``.
    """
    size = _check_size(1, size)
    anatomy = sample_anatomy(rng, size)
    look = sample_appearance(rng)
    # Mid-ventricular: well before the RV ends (z_rv_end >= 0.68), so RV, Myo and LV are large.
    z = rng.uniform(0.2, 0.4)
    image, label = render_volume(anatomy, look, np.array([z]), rng)
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
        anatomy = sample_anatomy(patient_rng, size)
        look = sample_appearance(patient_rng)
        contraction_seed = np.random.SeedSequence([seed, p, 2**20])
        patient_id = f"phantom{p:03d}"
        for f, frame in enumerate(frames):
            phase = f / (len(frames) - 1) if len(frames) > 1 else 0.0
            # The same contraction strength for every frame of the patient.
            frame_anatomy = at_phase(anatomy, phase, np.random.default_rng(contraction_seed))
            noise_ss, scribble_ss = np.random.SeedSequence([seed, p, f]).spawn(2)
            zs = slice_positions(anatomy, num_slices)  # same slice planes in every frame
            image, label = render_volume(frame_anatomy, look, zs, np.random.default_rng(noise_ss))
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
