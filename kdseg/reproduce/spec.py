"""The matrix (``experiments/reproduce/matrix.yaml``: settings x methods x seeds), a budget profile
laid over it (``experiments/reproduce/profiles/<name>.yaml``) and the papers' numbers
(``experiments/reproduce/paper_numbers.yaml``). Each file's keys are the fields of its classes below
(those marked DERIVED excepted). The files are read with OmegaConf (``${vars.steps}``, ``--set`` as a
dotlist) and checked against those classes as structured configs (unknown or missing keys, types,
Literal choices) and a few rules before any run starts; each problem is one :class:`SpecError`
naming file and key. Paths are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdseg.evaluation.metric_ids import KNOWN_METRICS, TASKS

DATA_KINDS = ("acdc", "isbi2014")


class SpecError(ValueError):
    """A matrix, profile or paper-numbers file is malformed: the message names file and key."""


# Fields marked DERIVED are filled in by the loader, not read from the file. Nested entries are
# checked one by one: inside a typed list OmegaConf's errors lose the key path.
DERIVED = {"derived": True}


@dataclass
class Stage:
    """One ``kdseg fit``, started from the previous stage's checkpoint."""

    stack: Optional[str] = None  # a run of experiments/stacks.yaml (acdc/pce), or
    config: Any = None  # config files (one or a stack)
    overrides: List[Any] = field(default_factory=list)  # [--key=value, ...]
    hand_on: Literal["best", "last"] = "best"  # the checkpoint handed to the next stage
    name: Optional[str] = None  # run-folder prefix (default: the stack's run name or the first config's stem)
    configs: Any = field(default=(), metadata=DERIVED)


@dataclass
class Method:
    """A table row: stages run in order."""

    stages: List[Any] = MISSING
    label: Optional[str] = None  # the table row (default: the method's key)
    overrides: List[Any] = field(default_factory=list)  # every stage of the method
    name: str = field(default="", metadata=DERIVED)


@dataclass
class Setting:
    """One table."""

    task: Literal[TASKS] = MISSING
    data: Literal[DATA_KINDS] = MISSING
    methods: Dict[str, Any] = MISSING
    title: Optional[str] = None
    label_budget: str = ""
    overrides: List[Any] = field(default_factory=list)  # every run of the setting
    name: str = field(default="", metadata=DERIVED)


@dataclass
class Matrix:
    settings: Dict[str, Any] = MISSING
    seeds: List[int] = field(default_factory=lambda: [0])
    path: Any = field(default=None, metadata=DERIVED)


@dataclass
class ProfileSetting:
    configs: Any = ()  # config files after each stage's
    overrides: List[Any] = field(default_factory=list)
    seeds: Optional[List[int]] = None  # instead of the profile's


@dataclass
class Profile:
    description: str = MISSING
    device: str = MISSING
    data: Dict[str, Dict[str, Any]] = MISSING  # {acdc: {...}, isbi2014: {...}}: kdseg.reproduce.data
    seeds: Optional[List[int]] = None  # instead of the matrix's
    vars: Dict[str, Any] = field(default_factory=dict)  # the budget: ${vars.steps} anywhere in the profile
    overrides: List[Any] = field(default_factory=list)  # every run, after the matrix's
    settings: Dict[str, Any] = field(default_factory=dict)  # {setting: ProfileSetting}
    per_config: Dict[str, Any] = field(default_factory=dict)  # {config file: overrides of every stage using it}
    slurm: Dict[str, Any] = field(default_factory=dict)  # submitit parameters of --launcher slurm
    name: str = field(default="", metadata=DERIVED)
    path: Any = field(default=None, metadata=DERIVED)

    def seeds_for(self, setting: str, matrix: Matrix) -> tuple[int, ...]:
        own = self.settings.get(setting, ProfileSetting()).seeds
        return own if own is not None else (self.seeds if self.seeds is not None else matrix.seeds)


@dataclass
class Source:
    citation: str = MISSING
    short: str = ""
    read_at: str = ""
    note: str = ""


@dataclass
class ReportedRow:
    """A paper's numbers beside a method (``citation`` / ``short``: its source's)."""

    method: str = MISSING
    source: str = MISSING
    where: str = MISSING
    metrics: Dict[str, float] = MISSING
    label: Optional[str] = None
    note: str = ""
    setting: str = field(default="", metadata=DERIVED)
    citation: str = field(default="", metadata=DERIVED)
    short: str = field(default="", metadata=DERIVED)


@dataclass
class NotRecorded:
    what: str = MISSING
    why: str = MISSING
    source: str = ""
    setting: str = ""


@dataclass
class PaperNumbers:
    sources: Dict[str, Any] = MISSING
    reported: Dict[str, List[Any]] = field(default_factory=dict)
    not_recorded: List[Any] = field(default_factory=list)
    rows: Any = field(default=(), metadata=DERIVED)
    path: Any = field(default=None, metadata=DERIVED)


class _Invalid(Exception):
    """A problem at a key of the file being read (the caller puts the file's path in front)."""


def _joined(where: str, key: str) -> str:
    return f"{where}{'' if not where or not key or key.startswith('[') else '.'}{key}"


def _typed(schema: type, value: Any, where: str = "") -> Any:
    """``value`` (resolved) checked against ``schema`` and made a ``schema`` object, defaults filled in."""
    own = [f.name for f in dataclasses.fields(schema) if not f.metadata.get("derived")]
    unknown = [k for k in value if k not in own] if isinstance(value, dict) else []
    if unknown:
        raise _Invalid(f"{_joined(where, str(unknown[0]))}: unknown key (allowed: {', '.join(own)})")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))
    except (OmegaConfBaseException, ValueError, TypeError) as error:  # TypeError: a list where a mapping goes
        key = _joined(where, str(getattr(error, "full_key", "") or ""))
        raise _Invalid(f"{key or 'top level'}: {str(error).splitlines()[0]}") from None


def _read(path: str | Path, what: str, check: Callable[[Path, dict], Any], dotlist: list[str] = ()) -> Any:
    """``check(path, content)`` of the file resolved with OmegaConf; every problem a SpecError."""
    path = Path(path).resolve()
    try:
        if not path.is_file():
            raise _Invalid(f"the {what} file does not exist")
        try:
            raw = OmegaConf.load(path)
        except OmegaConfBaseException:
            raise
        except Exception as error:  # YAML syntax
            raise _Invalid(f"not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(raw, DictConfig):
            raise _Invalid(f"the {what} must be a mapping at the top level")
        merged = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(dotlist)))
        return check(path, OmegaConf.to_container(merged, resolve=True))
    except OmegaConfBaseException as error:  # interpolations
        key = getattr(error, "full_key", None)
        raise SpecError(f"{path}: {key + ': ' if key else ''}{str(error).splitlines()[0]}") from None
    except _Invalid as error:
        raise SpecError(f"{path}: {error}") from None


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    """A flat tuple of ``--key=value`` strings from a (possibly nested) list."""
    out: list[str] = []
    for item in value or ():
        if isinstance(item, list):
            out += _overrides(item, where)
        elif not (isinstance(item, str) and item.startswith("--") and "=" in item):
            raise _Invalid(f"{where}: {item!r} is not a '--key=value' override")
        else:
            out.append(item)
    return tuple(out)


def _seeds(value: Any, where: str) -> tuple[int, ...] | None:
    if value is not None and (not value or len(set(value)) != len(value)):
        raise _Invalid(f"{where} must be a non-empty list of distinct integers, got {value!r}")
    return None if value is None else tuple(value)


def _files(value: Any, where: str) -> tuple[Path, ...]:
    """One config file or a stack of them, made absolute (relative to the working directory)."""
    out = []
    for item in value if isinstance(value, (list, tuple)) and value else [value]:
        if not isinstance(item, str) or not item:
            raise _Invalid(f"{where} must be a file path or a list of them")
        if not (file := Path.cwd() / Path(item).expanduser()).is_file():
            raise _Invalid(f"{where}: {item} does not exist (paths are relative to {Path.cwd()})")
        out.append(file.resolve())
    return tuple(out)


def _text(value: str | None, where: str, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not value or not value.strip():
        raise _Invalid(f"{where} must be a non-empty string")
    return value.strip()


def _stage(raw: Any, where: str) -> Stage:
    from kdseg.cli import stack_layers

    stage = _typed(Stage, raw, where)
    if (stage.stack is None) == (stage.config is None):
        raise _Invalid(f"{where}: give either stack (a run of experiments/stacks.yaml) or config (files)")
    if stage.stack is not None:
        try:
            layers = [str(layer) for layer in stack_layers(stage.stack)]
        except Exception as error:  # noqa: BLE001 - one line naming the matrix entry
            raise _Invalid(f"{where}.stack: {error}") from None
        stage.configs, default_name = _files(layers, f"{where}.stack"), stage.stack.rsplit("/", 1)[-1]
    else:
        stage.configs = _files(stage.config, f"{where}.config")
        default_name = stage.configs[0].stem
    stage.overrides, stage.name = _overrides(stage.overrides, f"{where}.overrides"), str(stage.name or default_name)
    return stage


def _matrix(path: Path, content: dict) -> Matrix:
    matrix = _typed(Matrix, content)
    if not matrix.settings:
        raise _Invalid("settings is empty")
    for name, raw in matrix.settings.items():
        where = f"settings.{name}"
        setting = matrix.settings[name] = _typed(Setting, raw, where)
        if not setting.methods:
            raise _Invalid(f"{where}.methods is empty")
        for mname, mraw in setting.methods.items():
            mwhere = f"{where}.methods.{mname}"
            method = setting.methods[mname] = _typed(Method, mraw, mwhere)
            if not method.stages:
                raise _Invalid(f"{mwhere}.stages must be a non-empty list of stages")
            method.name, method.label = mname, _text(method.label, f"{mwhere}.label", mname)
            method.stages = tuple(_stage(s, f"{mwhere}.stages[{i}]") for i, s in enumerate(method.stages))
            method.overrides = _overrides(method.overrides, f"{mwhere}.overrides")
        setting.name, setting.title = name, _text(setting.title, f"{where}.title", name)
        setting.label_budget = setting.label_budget.strip()
        setting.overrides = _overrides(setting.overrides, f"{where}.overrides")
    matrix.path, matrix.seeds = path, _seeds(matrix.seeds, "seeds")
    return matrix


def load_matrix(path: str | Path) -> Matrix:
    """Reads and checks the experiment matrix (format: the module docstring)."""
    return _read(path, "matrix", _matrix)


def profile_path(name_or_path: str, profiles_dir: str | Path = "experiments/reproduce/profiles") -> Path:
    """``smoke`` -> ``experiments/reproduce/profiles/smoke.yaml``; a path is returned as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate.resolve()
    return (Path(profiles_dir) / f"{name_or_path}.yaml").resolve()


def load_profile(path: str | Path, matrix: Matrix, extra_vars: dict[str, str] | None = None) -> Profile:
    """Reads a profile, ``extra_vars`` (``--set``) merged into its ``vars``, checked against the matrix."""
    def check(path: Path, content: dict) -> Profile:
        profile = _typed(Profile, content)
        if unknown := [kind for kind in profile.data if kind not in DATA_KINDS]:
            raise _Invalid(f"data.{unknown[0]}: unknown data kind (allowed: {', '.join(DATA_KINDS)})")
        for name, raw in profile.settings.items():
            where = f"settings.{name}"
            if name not in matrix.settings:
                raise _Invalid(f"{where}: no such setting in {matrix.path} ({sorted(matrix.settings)})")
            own = profile.settings[name] = _typed(ProfileSetting, raw, where)
            own.configs = _files(own.configs, f"{where}.configs") if own.configs else ()
            own.overrides = _overrides(own.overrides, f"{where}.overrides")
            own.seeds = _seeds(own.seeds, f"{where}.seeds")
        used = {c for s in matrix.settings.values() for m in s.methods.values() for st in m.stages for c in st.configs}
        per_config = {}
        for config, overrides in profile.per_config.items():
            (file,) = _files(config, f"per_config.{config}")
            if file not in used:
                raise _Invalid(f"per_config.{config}: no stage of {matrix.path} uses this config")
            per_config[file] = _overrides(overrides, f"per_config.{config}")
        profile.name, profile.path, profile.per_config = path.stem, path, per_config
        profile.description, profile.device = _text(profile.description, "description"), _text(profile.device, "device")
        profile.seeds, profile.overrides = _seeds(profile.seeds, "seeds"), _overrides(profile.overrides, "overrides")
        return profile

    return _read(path, "profile", check, [f"vars.{k}={v}" for k, v in (extra_vars or {}).items()])


def load_paper_numbers(path: str | Path, matrix: Matrix) -> PaperNumbers:
    """Reads the papers' numbers: each row names a known source, a setting and its task's metric ids."""
    def check(path: Path, content: dict) -> PaperNumbers:
        papers, rows = _typed(PaperNumbers, content), []
        papers.sources = {sid: vars(_typed(Source, raw, f"sources.{sid}")) for sid, raw in papers.sources.items()}
        for setting, entries in papers.reported.items():
            if setting not in matrix.settings:
                raise _Invalid(f"reported.{setting}: no such setting in {matrix.path}")
            task = matrix.settings[setting].task
            for i, raw in enumerate(entries):
                where = f"reported.{setting}[{i}]"
                row = _typed(ReportedRow, raw, where)
                if row.source not in papers.sources:
                    raise _Invalid(f"{where}.source: unknown source {row.source!r} (sources: {sorted(papers.sources)})")
                unknown = sorted(set(row.metrics) - KNOWN_METRICS[task])
                if unknown or not row.metrics:
                    raise _Invalid(f"{where}.metrics: unknown or no metric ids {unknown} for task {task}")
                source = papers.sources[row.source]
                row.setting, row.citation, row.short = setting, source["citation"], source["short"] or row.source
                row.label = _text(row.label, f"{where}.label", row.method)
                row.where = _text(row.where, f"{where}.where")
                rows.append(row)
        papers.not_recorded = tuple(vars(_typed(NotRecorded, item, f"not_recorded[{i}]"))
                                    for i, item in enumerate(papers.not_recorded))
        papers.rows, papers.path = tuple(rows), path
        return papers

    return _read(path, "paper numbers", check)
