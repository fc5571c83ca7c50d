"""Where a reproduction's data comes from, and the split files that make ACDC's evaluation honest.

A profile's ``data`` section names, per data kind of the matrix (``acdc``, ``isbi2014``), either
real files or the built-in phantoms:

``acdc``::

    acdc:
      root: ../shared/data/acdc        # or phantom: {train_patients: 12, test_patients: 2, slices: 4,
                                       #              size: [40, 36], seed: 7}
      val_patients: 5                  # the last N of the train split, held out for checkpoint selection
      train_split: <root>/splits/train.txt   # (defaults)
      test_split: <root>/splits/val.txt

The shared ACDC release has no test patients (its 20 test patients are withheld), so its
``splits/val.txt`` (10 patients) is the **test** set here, and the last ``val_patients`` patients
of ``splits/train.txt`` are removed from training and used as the **validation** set that picks
the checkpoint. Selecting the checkpoint on the test patients would bias the table upwards. The
three lists are written as split files (``train.txt``, ``val.txt``, ``test.txt``) and passed to
``ACDCDataModule`` as ``train_split`` / ``val_split`` / ``test_split``; ``labeled_patients: N``
keeps meaning "the first N patients of the train split", so the semi-supervised settings stay
those of SSL4MIS. The phantom variant writes phantom volumes in the same HDF5 layout first
(:func:`kdseg.data.phantom.write_acdc_like`), so the smoke profile runs exactly the code path of
the real data.

``isbi2014``::

    isbi2014:
      root: ../shared/data/isbi2014    # or phantom: true (CervicalCellDataModule with root: null)
      edf_root: ../shared/data/isbi2014/edf

ISBI 2014 needs no split files: :class:`~kdseg.data.instance_datamodule.CervicalCellDataModule`
holds out ``num_val_images`` (checkpoint selection) and ``num_test_images`` (test) annotated
images by ``split_seed`` before choosing the labeled ones; the caption states the numbers from the
resolved config.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdseg.reproduce.spec import SpecError

SPLIT_NAMES = ("train", "val", "test")


class DataUnavailable(SpecError):
    """The profile reads data that is not there (the message says what to do instead)."""


@dataclass(frozen=True)
class PreparedData:
    """What every run of one data kind gets: CLI overrides, split files, and a caption text."""

    kind: str
    overrides: tuple[str, ...]
    description: str
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    split_files: dict[str, Path] = field(default_factory=dict)

    def split_overrides(self, files: dict[str, Path] | None = None) -> tuple[str, ...]:
        """``--data.init_args.<name>_split=<file>`` for the given (or the shared) split files."""
        files = files if files is not None else self.split_files
        return tuple(f"--data.init_args.{name}_split={files[name]}" for name in SPLIT_NAMES if name in files)


def write_split_files(splits: dict[str, tuple[str, ...]], folder: Path) -> dict[str, Path]:
    """Writes one ``<name>.txt`` per split (one patient id a line) into ``folder``; an existing
    file with other content is an error (a run folder's splits never change under it)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, patients in splits.items():
        target = folder / f"{name}.txt"
        text = "".join(f"{p}\n" for p in patients)
        if target.exists():
            if target.read_text() != text:
                raise FileExistsError(f"{target} exists with other patients: refusing to change a run's split")
        else:
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(target)
        files[name] = target
    return files


def prepare_data(kind: str, spec: dict[str, Any], out: Path, where: str) -> PreparedData:
    """The data of ``kind`` as the profile's ``spec`` describes it (``where`` names the profile)."""
    if kind == "acdc":
        return _prepare_acdc(spec, out, where)
    if kind == "isbi2014":
        return _prepare_isbi(spec, where)
    raise SpecError(f"{where}: unknown data kind {kind!r}")


def _absolute(value: str) -> Path:
    path = Path(value).expanduser()
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


def _prepare_acdc(spec: dict[str, Any], out: Path, where: str) -> PreparedData:
    from kdseg.data.readers import read_split_file
    from kdseg.data.volume import DataError

    allowed = {"root", "phantom", "val_patients", "train_split", "test_split"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SpecError(f"{where}: data.acdc: unknown key(s) {unknown} (allowed: {sorted(allowed)})")
    if ("root" in spec) == ("phantom" in spec):
        raise SpecError(f"{where}: data.acdc needs exactly one of 'root' (real data) and 'phantom'")
    if "phantom" in spec:
        root, description = _write_acdc_phantom(spec["phantom"] or {}, out, where)
    else:
        root = _absolute(str(spec["root"]))
        if not (root / "volumes").is_dir() and not any(root.glob("patient*")) and not (root / "data").is_dir():
            raise DataUnavailable(
                f"{where}: data.acdc.root {root} holds no ACDC data (this profile trains on the real "
                "data; PROFILE=smoke runs everything on the built-in phantom)"
            )
        description = f"ACDC ({root})"
    train_split = _absolute(spec["train_split"]) if "train_split" in spec else root / "splits" / "train.txt"
    test_split = _absolute(spec["test_split"]) if "test_split" in spec else root / "splits" / "val.txt"
    val_patients = spec.get("val_patients", 5)
    if not isinstance(val_patients, int) or isinstance(val_patients, bool) or val_patients < 1:
        raise SpecError(f"{where}: data.acdc.val_patients must be a positive integer, got {val_patients!r}")
    try:
        train_all = read_split_file(train_split)
        test = read_split_file(test_split)
    except DataError as error:
        raise DataUnavailable(f"{where}: data.acdc: {error}") from None
    if val_patients >= len(train_all):
        raise SpecError(
            f"{where}: data.acdc.val_patients={val_patients} leaves no training patient "
            f"({train_split} lists {len(train_all)})"
        )
    overlap = sorted(set(train_all) & set(test))
    if overlap:
        raise SpecError(f"{where}: data.acdc: {train_split} and {test_split} share patients {overlap[:3]}")
    splits = {
        "train": tuple(train_all[:-val_patients]),
        "val": tuple(train_all[-val_patients:]),
        "test": tuple(test),
    }
    digest = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()[:12]
    files = write_split_files(splits, out / "splits" / f"acdc-{digest}")
    description += (
        f": train {len(splits['train'])} patients ({train_split.name} without its last {val_patients}), "
        f"validation for checkpoint selection {val_patients} patients (the last {val_patients} of "
        f"{train_split.name}), test {len(test)} patients ({test_split.name})"
    )
    return PreparedData(
        kind="acdc",
        overrides=(f"--data.init_args.root={root}",),
        description=description,
        splits=splits,
        split_files=files,
    )


def _write_acdc_phantom(spec: Any, out: Path, where: str) -> tuple[Path, str]:
    from kdseg.data.phantom import make_phantom_volumes, write_acdc_like

    if not isinstance(spec, dict):
        raise SpecError(f"{where}: data.acdc.phantom must be a mapping")
    params = {"train_patients": 12, "test_patients": 2, "slices": 4, "size": [40, 36], "seed": 7}
    unknown = sorted(set(spec) - set(params))
    if unknown:
        raise SpecError(f"{where}: data.acdc.phantom: unknown key(s) {unknown} (allowed: {sorted(params)})")
    params.update(spec)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = out / "data" / f"acdc_phantom-{digest}"
    if not (root / "phantom.json").is_file():  # written last: a complete folder
        n_train, n_test = int(params["train_patients"]), int(params["test_patients"])
        volumes = make_phantom_volumes(
            n_train + n_test, seed=int(params["seed"]), num_slices=int(params["slices"]),
            size=tuple(int(s) for s in params["size"]),
        )
        ids = sorted({v.patient_id for v in volumes})
        write_acdc_like(root, volumes, {"train": ids[:n_train], "val": ids[n_train:]})
        (root / "phantom.json").write_text(json.dumps(params, indent=2))
    h, w = params["size"]
    description = (
        f"the built-in cardiac phantom in the ACDC layout ({params['train_patients']} + "
        f"{params['test_patients']} patients, {params['slices']} slices of {h}x{w}, seed {params['seed']})"
    )
    return root, description


def _prepare_isbi(spec: dict[str, Any], where: str) -> PreparedData:
    allowed = {"root", "edf_root", "phantom"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SpecError(f"{where}: data.isbi2014: unknown key(s) {unknown} (allowed: {sorted(allowed)})")
    if spec.get("phantom"):
        if "root" in spec:
            raise SpecError(f"{where}: data.isbi2014 needs either 'root' or 'phantom: true', not both")
        return PreparedData(
            kind="isbi2014",
            overrides=("--data.init_args.root=null", "--data.init_args.edf_root=null"),
            description="the built-in cytology phantom (overlapping translucent cells and nuclei)",
        )
    if "root" not in spec:
        raise SpecError(f"{where}: data.isbi2014 needs 'root' (real data) or 'phantom: true'")
    root = _absolute(str(spec["root"]))
    if not (root / "train").is_dir():
        raise DataUnavailable(
            f"{where}: data.isbi2014.root {root} holds no ISBI 2014 training set (train/); "
            "PROFILE=smoke runs everything on the built-in phantom"
        )
    overrides = [f"--data.init_args.root={root}"]
    description = f"ISBI 2014 training release ({root})"
    if spec.get("edf_root"):
        edf = _absolute(str(spec["edf_root"]))
        if not edf.is_dir():
            raise DataUnavailable(f"{where}: data.isbi2014.edf_root {edf} does not exist")
        overrides.append(f"--data.init_args.edf_root={edf}")
        description += f", EDF images of {edf} as extra unlabeled images where a method uses them"
    return PreparedData(kind="isbi2014", overrides=tuple(overrides), description=description)
