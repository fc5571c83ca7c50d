"""Where the cases of a dataset folder are: which on-disk layout it holds and the index of its cases.

The layouts (:data:`LAYOUTS`) are described in :mod:`kdseg.data.readers`, which reads the files
this index points to. Case ids look like ``patient001_frame01``; the patient id is the part before
``_frame``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kdseg.data.volume import DataError

__all__ = ["LAYOUTS", "CaseEntry", "check_root", "detect_layout", "index_cases", "list_cases", "patient_of"]

#: The layouts :func:`detect_layout` can return.
LAYOUTS: tuple[str, ...] = ("h5_volumes", "h5_slices", "nifti")

_LAYOUT_DESCRIPTIONS = (
    "h5_volumes (root/volumes/<case>.h5)",
    "h5_slices (root/data/slices/<case>_slice_<K>.h5 or root/data/<case>.h5)",
    "nifti (root[/<one or two folders>]/<patient>/<case>.nii.gz, e.g. raw ACDC)",
)
_SLICE_RE = re.compile(r"^(?P<case>.+)_slice_(?P<k>\d+)\.h5$")
_NIFTI_RE = re.compile(r"^(?P<case>.+?)(?P<gt>_gt)?\.nii(?:\.gz)?$")
_PATIENT_RE = re.compile(r"^(?P<patient>.+?)_frame\d+$")


@dataclass
class CaseEntry:
    """Where one case lives on disk."""

    case_id: str
    kind: str  # "h5" (one 3D file), "h5_slices" or "nifti"
    path: Path | None = None  # 3D h5 file or NIfTI image
    gt_path: Path | None = None  # NIfTI ground truth
    slices: list[tuple[int, Path]] = field(default_factory=list)  # (K, file), sorted by K


def patient_of(case_id: str) -> str:
    """The patient id of a case id: ``patient001_frame01`` -> ``patient001``.

    Case ids without a ``_frameNN`` suffix are their own patient.
    """
    m = _PATIENT_RE.match(case_id)
    return m.group("patient") if m else case_id


# --------------------------------------------------------------------------- layout


def check_root(root: Path) -> Path:
    """``root`` as a Path; DataError when it does not exist or is not a folder."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data root {root} does not exist (expected a folder with one of the "
                        f"layouts: {'; '.join(_LAYOUT_DESCRIPTIONS)})")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder")
    return root


def _nifti_files(root: Path) -> list[Path]:
    """NIfTI files in patient folders 1 to 3 levels below root (root/p, root/a/p, root/a/b/p)."""
    found: list[Path] = []
    for depth in (1, 2, 3):
        pattern = "/".join(["*"] * depth)
        for ext in ("nii.gz", "nii"):
            found.extend(p for p in root.glob(f"{pattern}/*.{ext}") if p.is_file())
    return sorted(set(found))


def detect_layout(root: Path) -> str:
    """Tell which supported layout the folder ``root`` holds.

    Args:
        root: the dataset folder.

    Returns:
        ``"h5_volumes"``, ``"h5_slices"`` or ``"nifti"`` (checked in that order).

    Raises:
        DataError: when ``root`` does not exist or holds none of the three layouts.
    """
    root = check_root(root)
    if any((root / "volumes").glob("*.h5")):
        return "h5_volumes"
    data = root / "data"
    if any((data / "slices").glob("*.h5")) or any(data.glob("*.h5")):
        return "h5_slices"
    if any(_NIFTI_RE.match(p.name) and not p.name.endswith(("_4d.nii.gz", "_4d.nii"))
           for p in _nifti_files(root)):
        return "nifti"
    raise DataError(f"no supported data layout found in {root}: looked for "
                    f"{'; '.join(_LAYOUT_DESCRIPTIONS)}")


def index_cases(root: Path, layout: str) -> dict[str, CaseEntry]:
    """Map case id -> where it is stored, for one layout."""
    root = check_root(root)
    entries: dict[str, CaseEntry] = {}
    if layout == "h5_volumes":
        for p in sorted((root / "volumes").glob("*.h5")):
            entries[p.stem] = CaseEntry(p.stem, "h5", path=p)
    elif layout == "h5_slices":
        data = root / "data"
        for p in sorted((data / "slices").glob("*.h5")):
            m = _SLICE_RE.match(p.name)
            if m is None:
                raise DataError(f"{p}: slice file name does not match "
                                f"'<case>_slice_<K>.h5' (e.g. patient001_frame01_slice_0.h5)")
            case = m.group("case")
            entry = entries.setdefault(case, CaseEntry(case, "h5_slices"))
            entry.slices.append((int(m.group("k")), p))
        for entry in entries.values():
            entry.slices.sort(key=lambda kp: kp[0])
            for a, b in zip(entry.slices, entry.slices[1:]):
                if a[0] == b[0]:
                    raise DataError(f"{b[1]}: slice index {b[0]} of case {entry.case_id} "
                                    f"appears twice (also {a[1].name})")
        for p in sorted(data.glob("*.h5")):  # 3D files win over slices
            entries[p.stem] = CaseEntry(p.stem, "h5", path=p)
    elif layout == "nifti":
        images: dict[str, Path] = {}
        gts: dict[str, Path] = {}
        for p in _nifti_files(root):
            m = _NIFTI_RE.match(p.name)
            if m is None or m.group("case").endswith("_4d"):
                continue
            case = m.group("case")
            target = gts if m.group("gt") else images
            if case in target and target[case] != p:
                raise DataError(f"case {case} is found twice under {root}: {target[case]} "
                                f"and {p}; keep one copy")
            target[case] = p
        for case, img in images.items():
            entries[case] = CaseEntry(case, "nifti", path=img, gt_path=gts.get(case))
        for case, gt in gts.items():
            if case not in images:
                raise DataError(f"{gt}: ground truth without its image "
                                f"(expected {case}.nii.gz beside it)")
    else:
        raise DataError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return dict(sorted(entries.items()))


def list_cases(root: Path, layout: str) -> dict[str, list[str]]:
    """The cases available in ``root``, grouped by patient.

    Args:
        root: the dataset folder.
        layout: one of :data:`LAYOUTS` (see :func:`detect_layout`).

    Returns:
        patient id -> sorted case ids, patients in sorted order.
    """
    out: dict[str, list[str]] = {}
    for case in index_cases(root, layout):
        out.setdefault(patient_of(case), []).append(case)
    return {p: sorted(c) for p, c in sorted(out.items())}
