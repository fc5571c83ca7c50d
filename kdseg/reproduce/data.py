"""Where a reproduction's data comes from: a profile's ``data`` section names, per data kind,
real files or the built-in phantoms::

    acdc:      {root: ../shared/data/acdc, val_patients: 5, train_split: ..., test_split: ...}
               or {phantom: {train_patients: 12, test_patients: 2, slices: 4, size: [40, 36], seed: 7}, ...}
    isbi2014:  {root: ../shared/data/isbi2014, edf_root: ...}  or  {phantom: true}

The ACDC splits are ``ACDCDataModule``'s (:mod:`kdseg.data.protocol`): ``val_patients`` is passed on
and the protocol resolved once for captions and figures. The phantom is written in the real layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdseg.data.protocol import resolve_protocol
from kdseg.data.volume import DataError
from kdseg.reproduce.spec import SpecError


class DataUnavailable(SpecError):
    """The profile reads data that is not there (the message says what to do instead)."""


@dataclass(frozen=True)
class PreparedData:
    """Every run's CLI overrides and caption text of one data kind; ACDC: each split's patients, protocol."""

    kind: str
    overrides: tuple[str, ...]
    description: str
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    protocol: str | None = None


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


def _known_keys(spec: dict[str, Any], allowed: Any, where: str) -> None:
    if unknown := sorted(set(spec) - set(allowed)):
        raise SpecError(f"{where}: unknown key(s) {unknown} (allowed: {sorted(allowed)})")


def _prepare_acdc(spec: dict[str, Any], out: Path, where: str) -> PreparedData:
    _known_keys(spec, {"root", "phantom", "val_patients", "train_split", "test_split"}, f"{where}: data.acdc")
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
    val_patients = spec.get("val_patients", 5)
    if not isinstance(val_patients, int) or isinstance(val_patients, bool) or val_patients < 1:
        raise SpecError(f"{where}: data.acdc.val_patients must be a positive integer, got {val_patients!r}")
    given = {name: _absolute(str(spec[f"{name}_split"])) for name in ("train", "test") if f"{name}_split" in spec}
    try:
        protocol = resolve_protocol(root, given.get("train"), None, given.get("test"), holdout=val_patients)
    except DataError as error:
        raise DataUnavailable(f"{where}: data.acdc: {error}") from None
    overrides = [f"--data.init_args.root={root}", f"--data.init_args.fallback_val_patients={val_patients}"]
    overrides += [f"--data.init_args.{name}_split={path}" for name, path in given.items()]
    return PreparedData(
        kind="acdc",
        overrides=tuple(overrides),
        description=f"{description}; {protocol.describe(file_names=True)}",
        splits={name: protocol.split(name).patients for name in ("train", "val", "test")},
        protocol=protocol.name,
    )


def _write_acdc_phantom(spec: Any, out: Path, where: str) -> tuple[Path, str]:
    from kdseg.data.phantom import make_phantom_volumes, write_acdc_like

    if not isinstance(spec, dict):
        raise SpecError(f"{where}: data.acdc.phantom must be a mapping")
    params = {"train_patients": 12, "test_patients": 2, "slices": 4, "size": [40, 36], "seed": 7}
    _known_keys(spec, params, f"{where}: data.acdc.phantom")
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
    _known_keys(spec, {"root", "edf_root", "phantom"}, f"{where}: data.isbi2014")
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
