"""Reading and checking the three declared files of a reproduction: the experiment matrix, a budget
profile and the papers' reported numbers.

Everything is checked when the files are read, before any run starts, and every problem is one
:class:`SpecError` naming the file and the entry (``matrix.yaml: settings.acdc_scribble.methods.pce:
stage 1: experiments/acdc/pce.yam does not exist``), because a typo found after an hour of training
costs the hour.

Paths inside the files are relative to the working directory, the repository root, like every
path in a kdseg config; they are made absolute here.

Matrix (``experiments/reproduce/matrix.yaml``)::

    seeds: [0, 1, 2]                   # default seeds (a profile may replace them)
    settings:
      <setting>:
        title: ...                     # table heading
        task: semantic | instance      # which metrics (kdseg.reproduce.metrics)
        data: acdc | isbi2014          # how data and splits are prepared (kdseg.reproduce.data)
        label_budget: ...              # in words, for the caption
        overrides: [--key=value, ...]  # every run of the setting
        methods:
          <method>:
            label: ...                 # table row
            overrides: [...]           # every stage of the method
            stages:                    # run in order; each starts from the previous one's checkpoint
              - config: experiments/acdc/pce.yaml
                overrides: [...]
                hand_on: best | last   # checkpoint handed to the next stage (default best)

Profile (``experiments/reproduce/profiles/<name>.yaml``)::

    description: ...                   # caption
    device: ...                        # caption, e.g. "CPU, 1 thread per run"
    seeds: [0, 1]                      # replaces the matrix's seeds (optional)
    vars: {steps: 1000, ...}           # the budget in one place: ${steps} in any override
    data: {acdc: {...}, isbi2014: {...}}   # see kdseg.reproduce.data
    overrides: [...]                   # every run
    settings:
      <setting>: {configs: [file, ...], overrides: [...], seeds: [...]}
    per_config:                        # every stage using this method config, in any setting
      experiments/acdc/scribsd_plus.yaml: [--model.init_args.consistency_rampup_steps=${scribsd_rampup}]

Override lists may nest (a YAML anchor of a list inside a list), and are flattened.

Papers' numbers (``experiments/reproduce/paper_numbers.yaml``)::

    sources:
      <id>: {citation: ..., short: "Qu et al. 2024", read_at: ..., note: ...}
    reported:
      <setting>:
        - {method: <matrix method>, label: ..., source: <id>, where: "Table 2", metrics: {dice_mean: 0.87}}
    not_recorded:
      - {source: <id>, what: ..., why: ...}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdseg.reproduce.metrics import KNOWN_METRICS, TASKS

DATA_KINDS = ("acdc", "isbi2014")
HAND_ON = ("best", "last")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SpecError(ValueError):
    """A matrix, profile or paper-numbers file is malformed: the message names file and entry."""


@dataclass(frozen=True)
class Stage:
    """One ``kdseg fit`` of a method: its config, overrides and the checkpoint it hands on."""

    config: Path
    overrides: tuple[str, ...] = ()
    hand_on: str = "best"


@dataclass(frozen=True)
class Method:
    """A table row: one or more stages run in order (each from the previous one's checkpoint)."""

    name: str
    label: str
    stages: tuple[Stage, ...]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Setting:
    """One table: a data set and label budget, and the methods compared on it."""

    name: str
    title: str
    task: str
    data: str
    label_budget: str
    methods: dict[str, Method]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Matrix:
    path: Path
    seeds: tuple[int, ...]
    settings: dict[str, Setting]


@dataclass(frozen=True)
class ProfileSetting:
    configs: tuple[Path, ...] = ()
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Profile:
    """A budget: what is added after each method config, seeds, and where data comes from."""

    name: str
    path: Path
    description: str
    device: str
    seeds: tuple[int, ...] | None
    vars: dict[str, str]
    data: dict[str, dict[str, Any]]
    overrides: tuple[str, ...] = ()
    settings: dict[str, ProfileSetting] = field(default_factory=dict)
    per_config: dict[Path, tuple[str, ...]] = field(default_factory=dict)

    def expand(self, text: str, where: str) -> str:
        """``text`` with every ``${var}`` replaced by the profile's value."""

        def value(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.vars:
                raise SpecError(f"{self.path}: {where}: unknown variable ${{{name}}} (vars: {sorted(self.vars)})")
            return self.vars[name]

        return _VAR.sub(value, text)

    def seeds_for(self, setting: str, matrix: Matrix) -> tuple[int, ...]:
        own = self.settings.get(setting, ProfileSetting()).seeds
        return own if own is not None else (self.seeds if self.seeds is not None else matrix.seeds)


@dataclass(frozen=True)
class ReportedRow:
    """Numbers a paper reports for one method in one setting, with where they were read."""

    setting: str
    method: str
    label: str
    source: str
    citation: str
    short: str
    where: str
    metrics: dict[str, float]
    note: str = ""


@dataclass(frozen=True)
class PaperNumbers:
    path: Path
    rows: tuple[ReportedRow, ...]
    not_recorded: tuple[dict[str, str], ...]
    sources: dict[str, dict[str, str]]


# --------------------------------------------------------------------------- helpers


def _load_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(f"{path}: the {what} file does not exist")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(content, dict):
        raise SpecError(f"{path}: the {what} must be a mapping at the top level")
    return content


def _mapping(value: Any, path: Path, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{path}: {where} must be a mapping, got {type(value).__name__}")
    return value


def _keys(value: dict[str, Any], allowed: set[str], path: Path, where: str,
          required: set[str] | frozenset[str] = frozenset()) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise SpecError(f"{path}: {where}: unknown key(s) {unknown} (allowed: {sorted(allowed)})")
    missing = sorted(required - set(value))
    if missing:
        raise SpecError(f"{path}: {where}: missing key(s) {missing}")


def _overrides(value: Any, path: Path, where: str) -> tuple[str, ...]:
    """A flat tuple of ``--key=value`` strings from a (possibly nested) list."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SpecError(f"{path}: {where} must be a list of '--key=value' strings")
    out: list[str] = []
    for item in value:
        if isinstance(item, list):
            out.extend(_overrides(item, path, where))
        elif isinstance(item, str) and item.startswith("--") and "=" in item:
            out.append(item)
        else:
            raise SpecError(f"{path}: {where}: {item!r} is not a '--key=value' override")
    return tuple(out)


def _seeds(value: Any, path: Path, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise SpecError(f"{path}: {where} must be a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise SpecError(f"{path}: {where} lists a seed twice: {value}")
    return tuple(value)


def _existing_file(value: Any, path: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{path}: {where} must be a file path")
    file = Path(value).expanduser()
    file = file if file.is_absolute() else Path.cwd() / file
    if not file.is_file():
        raise SpecError(f"{path}: {where}: {value} does not exist (paths are relative to {Path.cwd()})")
    return file.resolve()


def _text(value: Any, path: Path, where: str, default: str | None = None) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{path}: {where} must be a non-empty string")
    return value.strip()


# --------------------------------------------------------------------------- matrix


def load_matrix(path: str | Path) -> Matrix:
    """Reads and checks the experiment matrix (see the module docstring for the format)."""
    path = Path(path).resolve()
    content = _load_yaml(path, "matrix")
    _keys(content, {"seeds", "settings"}, path, "top level", required={"settings"})
    seeds = _seeds(content.get("seeds", [0]), path, "seeds")
    settings_raw = _mapping(content["settings"], path, "settings")
    if not settings_raw:
        raise SpecError(f"{path}: settings is empty")
    settings = {name: _setting(name, raw, path) for name, raw in settings_raw.items()}
    return Matrix(path=path, seeds=seeds, settings=settings)


def _setting(name: str, raw: Any, path: Path) -> Setting:
    where = f"settings.{name}"
    raw = _mapping(raw, path, where)
    _keys(raw, {"title", "task", "data", "label_budget", "overrides", "methods"}, path, where,
          required={"task", "data", "methods"})
    if raw["task"] not in TASKS:
        raise SpecError(f"{path}: {where}.task must be one of {list(TASKS)}, got {raw['task']!r}")
    if raw["data"] not in DATA_KINDS:
        raise SpecError(f"{path}: {where}.data must be one of {list(DATA_KINDS)}, got {raw['data']!r}")
    methods_raw = _mapping(raw["methods"], path, f"{where}.methods")
    if not methods_raw:
        raise SpecError(f"{path}: {where}.methods is empty")
    methods = {m: _method(m, r, path, f"{where}.methods.{m}") for m, r in methods_raw.items()}
    return Setting(
        name=name,
        title=_text(raw.get("title"), path, f"{where}.title", default=name),
        task=raw["task"],
        data=raw["data"],
        label_budget=_text(raw.get("label_budget"), path, f"{where}.label_budget", default=""),
        methods=methods,
        overrides=_overrides(raw.get("overrides"), path, f"{where}.overrides"),
    )


def _method(name: str, raw: Any, path: Path, where: str) -> Method:
    raw = _mapping(raw, path, where)
    _keys(raw, {"label", "overrides", "stages"}, path, where, required={"stages"})
    stages_raw = raw["stages"]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise SpecError(f"{path}: {where}.stages must be a non-empty list of {{config: ...}}")
    stages = []
    for i, stage in enumerate(stages_raw, start=1):
        swhere = f"{where}: stage {i}"
        stage = _mapping(stage, path, swhere)
        _keys(stage, {"config", "overrides", "hand_on"}, path, swhere, required={"config"})
        hand_on = stage.get("hand_on", "best")
        if hand_on not in HAND_ON:
            raise SpecError(f"{path}: {swhere}: hand_on must be one of {list(HAND_ON)}, got {hand_on!r}")
        stages.append(Stage(
            config=_existing_file(stage["config"], path, f"{swhere}: config"),
            overrides=_overrides(stage.get("overrides"), path, f"{swhere}: overrides"),
            hand_on=hand_on,
        ))
    return Method(
        name=name,
        label=_text(raw.get("label"), path, f"{where}.label", default=name),
        stages=tuple(stages),
        overrides=_overrides(raw.get("overrides"), path, f"{where}.overrides"),
    )


# --------------------------------------------------------------------------- profile


def profile_path(name_or_path: str, profiles_dir: str | Path = "experiments/reproduce/profiles") -> Path:
    """``smoke`` -> ``experiments/reproduce/profiles/smoke.yaml``; a path is returned as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate.resolve()
    return (Path(profiles_dir) / f"{name_or_path}.yaml").resolve()


def load_profile(path: str | Path, matrix: Matrix, extra_vars: dict[str, str] | None = None) -> Profile:
    """Reads and checks a profile against the matrix (setting names, method configs)."""
    path = Path(path).resolve()
    content = _load_yaml(path, "profile")
    _keys(content, {"description", "device", "seeds", "vars", "data", "overrides", "settings", "per_config"},
          path, "top level", required={"description", "device", "data"})
    variables = {str(k): str(v) for k, v in _mapping(content.get("vars"), path, "vars").items()}
    variables.update(extra_vars or {})
    data = _mapping(content["data"], path, "data")
    for kind, spec in data.items():
        if kind not in DATA_KINDS:
            raise SpecError(f"{path}: data.{kind}: unknown data kind (one of {list(DATA_KINDS)})")
        _mapping(spec, path, f"data.{kind}")
    settings: dict[str, ProfileSetting] = {}
    for name, raw in _mapping(content.get("settings"), path, "settings").items():
        where = f"settings.{name}"
        if name not in matrix.settings:
            raise SpecError(f"{path}: {where}: no such setting in {matrix.path} ({sorted(matrix.settings)})")
        raw = _mapping(raw, path, where)
        _keys(raw, {"configs", "overrides", "seeds"}, path, where)
        configs = raw.get("configs") or []
        if not isinstance(configs, list):
            raise SpecError(f"{path}: {where}.configs must be a list of config files")
        settings[name] = ProfileSetting(
            configs=tuple(_existing_file(c, path, f"{where}.configs") for c in configs),
            overrides=_overrides(raw.get("overrides"), path, f"{where}.overrides"),
            seeds=_seeds(raw["seeds"], path, f"{where}.seeds") if "seeds" in raw else None,
        )
    used_configs = {st.config for s in matrix.settings.values() for m in s.methods.values() for st in m.stages}
    per_config: dict[Path, tuple[str, ...]] = {}
    for config, overrides in _mapping(content.get("per_config"), path, "per_config").items():
        file = _existing_file(config, path, f"per_config.{config}")
        if file not in used_configs:
            raise SpecError(f"{path}: per_config.{config}: no stage of {matrix.path} uses this config")
        per_config[file] = _overrides(overrides, path, f"per_config.{config}")
    profile = Profile(
        name=path.stem,
        path=path,
        description=_text(content["description"], path, "description"),
        device=_text(content["device"], path, "device"),
        seeds=_seeds(content["seeds"], path, "seeds") if "seeds" in content else None,
        vars=variables,
        data={k: dict(v or {}) for k, v in data.items()},
        overrides=_overrides(content.get("overrides"), path, "overrides"),
        settings=settings,
        per_config=per_config,
    )
    # Unknown ${vars} are found now rather than when their run starts.
    for i, text in enumerate(profile.overrides):
        profile.expand(text, f"overrides[{i}]")
    for name, s in profile.settings.items():
        for text in s.overrides:
            profile.expand(text, f"settings.{name}.overrides")
    for config, overrides in profile.per_config.items():
        for text in overrides:
            profile.expand(text, f"per_config.{config}")
    return profile


# --------------------------------------------------------------------------- papers' numbers


def load_paper_numbers(path: str | Path, matrix: Matrix) -> PaperNumbers:
    """Reads the papers' reported numbers, checking that every row names a known source, a
    setting of the matrix and metric ids that setting's task reports."""
    path = Path(path).resolve()
    content = _load_yaml(path, "paper numbers")
    _keys(content, {"sources", "reported", "not_recorded"}, path, "top level", required={"sources"})
    sources: dict[str, dict[str, str]] = {}
    for sid, raw in _mapping(content["sources"], path, "sources").items():
        raw = _mapping(raw, path, f"sources.{sid}")
        _keys(raw, {"citation", "short", "note", "read_at"}, path, f"sources.{sid}", required={"citation"})
        sources[sid] = {k: str(v) for k, v in raw.items()}
    rows: list[ReportedRow] = []
    for setting, entries in _mapping(content.get("reported"), path, "reported").items():
        if setting not in matrix.settings:
            raise SpecError(f"{path}: reported.{setting}: no such setting in {matrix.path}")
        if not isinstance(entries, list):
            raise SpecError(f"{path}: reported.{setting} must be a list of rows")
        task = matrix.settings[setting].task
        for i, raw in enumerate(entries):
            where = f"reported.{setting}[{i}]"
            raw = _mapping(raw, path, where)
            _keys(raw, {"method", "label", "source", "where", "metrics", "note"}, path, where,
                  required={"method", "source", "where", "metrics"})
            if raw["source"] not in sources:
                raise SpecError(f"{path}: {where}: unknown source {raw['source']!r} (sources: {sorted(sources)})")
            metrics = _mapping(raw["metrics"], path, f"{where}.metrics")
            unknown = sorted(set(metrics) - KNOWN_METRICS[task])
            if unknown or not metrics:
                raise SpecError(f"{path}: {where}.metrics: unknown or no metric ids {unknown} for task {task}")
            for k, v in metrics.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise SpecError(f"{path}: {where}.metrics.{k} must be a number, got {v!r}")
            rows.append(ReportedRow(
                setting=setting,
                method=str(raw["method"]),
                label=_text(raw.get("label"), path, f"{where}.label", default=str(raw["method"])),
                source=raw["source"],
                citation=sources[raw["source"]]["citation"],
                short=sources[raw["source"]].get("short", raw["source"]),
                where=_text(raw["where"], path, f"{where}.where"),
                metrics={k: float(v) for k, v in metrics.items()},
                note=str(raw.get("note", "")),
            ))
    not_recorded = content.get("not_recorded") or []
    if not isinstance(not_recorded, list):
        raise SpecError(f"{path}: not_recorded must be a list")
    for i, item in enumerate(not_recorded):
        _keys(_mapping(item, path, f"not_recorded[{i}]"), {"source", "setting", "what", "why"}, path,
              f"not_recorded[{i}]", required={"what", "why"})
    return PaperNumbers(path=path, rows=tuple(rows), not_recorded=tuple(dict(x) for x in not_recorded),
                        sources=sources)
