"""The matrix, a budget profile laid over it, and the papers' numbers: read with OmegaConf
(``${vars.steps}``, ``--set`` as a dotlist) and checked before any run starts, each problem one
:class:`SpecError` naming file and entry (a typo found after an hour of training costs the hour).

Matrix (``experiments/reproduce/matrix.yaml``)::

    seeds: [0, 1, 2]
    settings:
      <setting>:
        title: ...  task: semantic | instance  data: acdc | isbi2014  label_budget: ...
        overrides: [--key=value, ...]          # every run of the setting
        methods:
          <method>:
            label: ...                         # the table row
            overrides: [...]                   # every stage of the method
            stages:                            # in order; each starts from the previous one's checkpoint
              - stack: acdc/pce                    # a run of experiments/stacks.yaml, or
                config: [file, ...]                # config files (one or a stack)
                overrides: [...]
                hand_on: best | last           # the checkpoint handed to the next stage (default best)
                name: ...                      # run-folder prefix (default: the first config's stem)

Profile (``experiments/reproduce/profiles/<name>.yaml``), laid over the matrix::

    description: ...   device: ...   seeds: [0, 1]
    vars: {steps: 1000}                        # the budget; ${vars.steps} anywhere in the profile
    data: {acdc: {...}, isbi2014: {...}}       # kdseg.reproduce.data
    overrides: [...]                           # every run, after the matrix's
    settings: {<setting>: {configs: [...], overrides: [...], seeds: [...]}}
    per_config: {<config file>: [...]}         # every stage whose stack holds this file
    slurm: {partition: gpu, timeout_min: 720, gpus_per_node: 1, cpus_per_task: 8}   # --launcher slurm

Papers' numbers (``experiments/reproduce/paper_numbers.yaml``): ``sources`` (citation, short,
read_at, note), ``reported.<setting>`` rows (method, label, source, where, metrics, note) and
``not_recorded`` (source, setting, what, why). Paths are relative to the working directory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kdseg.data.datamodule import ACDC_CLASS_NAMES
from kdseg.data.instances import CLASS_NAMES as CELL_CLASS_NAMES

#: The metric ids of ``test_metrics.json`` (``dice_RV``, ``hd95_mean``, ``aji_mean``) that the tables and
#: ``paper_numbers.yaml`` share.
TASKS = ("semantic", "instance")


@dataclass(frozen=True)
class Column:

    metric: str
    header: str
    distance: bool = False


#: The columns of each task's table, in order. Per-class ASD beside per-class Dice: a method can gain
#: Dice on the large LV while its RV boundaries stray far; per-class HD95 stays in table.csv.
COLUMNS: dict[str, tuple[Column, ...]] = {
    "semantic": (*(Column(f"dice_{n}", f"Dice {n}") for n in ACDC_CLASS_NAMES.values()), Column("dice_mean", "Dice mean"),
                 Column("hd95_mean", "HD95 mean", True), *(Column(f"asd_{n}", f"ASD {n}", True)
                 for n in ACDC_CLASS_NAMES.values()), Column("asd_mean", "ASD mean", True)),
    "instance": (Column("aji_mean", "AJI"), Column("map_mean", "mAP"), Column("ap50_mean", "AP50"),
                 Column("f1_mean", "F1@0.5"), *(Column(f"dice_{n}", f"Dice {n}") for n in CELL_CLASS_NAMES.values()),
                 Column("dice_mean", "Dice mean")),
}

#: Metric ids a task can report (the table's columns plus the per-class values behind them).
KNOWN_METRICS: dict[str, frozenset[str]] = {
    "semantic": frozenset(f"{m}_{n}" for m in ("dice", "hd95", "asd") for n in [*ACDC_CLASS_NAMES.values(), "mean"]),
    "instance": frozenset(f"{m}_{n}" for m in ("aji", "aji_gated", "f1", "dice", "map", "ap50", "ap75")
                          for n in [*CELL_CLASS_NAMES.values(), "mean"]),
}

#: The metric in each run's progress line and the headline of its figures.
HEADLINE: dict[str, tuple[str, str]] = {"semantic": ("dice_mean", "Dice"), "instance": ("aji_mean", "AJI")}


def flatten_test_metrics(task: str, content: Mapping[str, Any]) -> dict[str, float]:
    """``{metric id: value}`` from a ``test_metrics.json`` of ``task`` (NaN stays NaN); ValueError
    naming the missing key when it is not a summary of that task."""
    out: dict[str, float] = {}
    if task == "semantic":
        if "per_class" not in content or "mean" not in content:
            raise ValueError("a semantic test_metrics.json needs 'per_class' and 'mean'")
        for name, values in content["per_class"].items():
            for metric in ("dice", "hd95", "asd"):
                out[f"{metric}_{name}"] = _number(values.get(f"{metric}_mean"))
        for metric, value in content["mean"].items():
            out[f"{metric}_mean"] = _number(value)
    elif task == "instance":
        if "metrics" not in content:
            raise ValueError("an instance test_metrics.json needs 'metrics'")
        out = {k: _number(v) for k, v in content["metrics"].items()}
    else:
        raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    return out


def distance_unit(task: str, content: Mapping[str, Any]) -> str | None:
    """The unit of the distance columns (``mm`` or ``pixel``), None for tasks without any."""
    return str(content.get("distance_unit", "pixel")) if task == "semantic" else None


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


DATA_KINDS = ("acdc", "isbi2014")
HAND_ON = ("best", "last")


class SpecError(ValueError):
    """A matrix, profile or paper-numbers file is malformed: the message names file and entry."""


@dataclass(frozen=True)
class Stage:
    """One ``kdseg fit``."""

    configs: tuple[Path, ...]
    overrides: tuple[str, ...] = ()
    hand_on: str = "best"
    name: str = ""


@dataclass(frozen=True)
class Method:
    """A table row: stages run in order."""

    name: str
    label: str
    stages: tuple[Stage, ...]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Setting:
    """One table."""

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

    name: str
    path: Path
    description: str
    device: str
    seeds: tuple[int, ...] | None
    data: dict[str, dict[str, Any]]
    overrides: tuple[str, ...] = ()
    settings: dict[str, ProfileSetting] = field(default_factory=dict)
    per_config: dict[Path, tuple[str, ...]] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)

    def seeds_for(self, setting: str, matrix: Matrix) -> tuple[int, ...]:
        own = self.settings.get(setting, ProfileSetting()).seeds
        return own if own is not None else (self.seeds if self.seeds is not None else matrix.seeds)


@dataclass(frozen=True)
class ReportedRow:

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


class _Reader:
    """Checks of one file; every message starts with its path."""

    def __init__(self, path: str | Path, what: str, dotlist: list[str] = ()) -> None:
        self.path = Path(path).resolve()
        if not self.path.is_file():
            self.fail(f"the {what} file does not exist")
        try:
            config = OmegaConf.merge(OmegaConf.load(self.path), OmegaConf.from_dotlist(list(dotlist)))
            self.content = OmegaConf.to_container(config, resolve=True)
        except OmegaConfBaseException as error:
            key = getattr(error, "full_key", None)
            self.fail(f"{key + ': ' if key else ''}{str(error).splitlines()[0]}")
        except Exception as error:  # YAML syntax
            self.fail(f"not valid YAML ({' '.join(str(error).split())})")
        if not isinstance(self.content, dict):
            self.fail(f"the {what} must be a mapping at the top level")

    def fail(self, message: str) -> None:
        raise SpecError(f"{self.path}: {message}")

    def mapping(self, value: Any, where: str, allowed: set[str] | None = None, required: set[str] = frozenset()) -> dict:
        value = {} if value is None else value
        if not isinstance(value, dict):
            self.fail(f"{where} must be a mapping, got {type(value).__name__}")
        if allowed is not None and set(value) - allowed:
            self.fail(f"{where}: unknown key(s) {sorted(set(value) - allowed)} (allowed: {sorted(allowed)})")
        if required - set(value):
            self.fail(f"{where}: missing key(s) {sorted(required - set(value))}")
        return value

    def overrides(self, value: Any, where: str) -> tuple[str, ...]:
        """A flat tuple of ``--key=value`` strings from a (possibly nested) list."""
        if value is not None and not isinstance(value, list):
            self.fail(f"{where} must be a list of '--key=value' strings")
        out: list[str] = []
        for item in value or ():
            if isinstance(item, list):
                out += self.overrides(item, where)
            elif not (isinstance(item, str) and item.startswith("--") and "=" in item):
                self.fail(f"{where}: {item!r} is not a '--key=value' override")
            else:
                out.append(item)
        return tuple(out)

    def seeds(self, value: Any, where: str) -> tuple[int, ...]:
        if not isinstance(value, list) or not value or not all(type(s) is int for s in value) \
                or len(set(value)) != len(value):
            self.fail(f"{where} must be a non-empty list of distinct integers, got {value!r}")
        return tuple(value)

    def files(self, value: Any, where: str) -> tuple[Path, ...]:
        """One config file or a stack of them, made absolute (relative to the working directory)."""
        out = []
        for item in value if isinstance(value, list) and value else [value]:
            if not isinstance(item, str) or not item:
                self.fail(f"{where} must be a file path or a list of them")
            if not (file := Path.cwd() / Path(item).expanduser()).is_file():
                self.fail(f"{where}: {item} does not exist (paths are relative to {Path.cwd()})")
            out.append(file.resolve())
        return tuple(out)

    def stack(self, value: Any, where: str) -> tuple[tuple[Path, ...], str]:
        """The layers of a run of experiments/stacks.yaml and its run-folder prefix (``acdc/pce`` -> ``pce``)."""
        from kdseg.cli import STACKS_FILE, stack_layers

        if not isinstance(value, str) or not value:
            self.fail(f"{where} must be the name of a run of {STACKS_FILE}")
        try:
            layers = stack_layers(value)
        except Exception as error:  # noqa: BLE001 - one line naming the matrix entry
            self.fail(f"{where}: {error}")
        return self.files([str(layer) for layer in layers], where), value.rsplit("/", 1)[-1]

    def text(self, value: Any, where: str, default: str | None = None) -> str:
        if value is None and default is not None:
            return default
        if not isinstance(value, str) or not value.strip():
            self.fail(f"{where} must be a non-empty string")
        return value.strip()


def load_matrix(path: str | Path) -> Matrix:
    """Reads and checks the experiment matrix (format: the module docstring)."""
    r = _Reader(path, "matrix")
    content = r.mapping(r.content, "top level", {"seeds", "settings"}, {"settings"})
    settings = {}
    for name, raw in r.mapping(content["settings"], "settings").items():
        where = f"settings.{name}"
        raw = r.mapping(raw, where, {"title", "task", "data", "label_budget", "overrides", "methods"},
                        {"task", "data", "methods"})
        for key, allowed in (("task", TASKS), ("data", DATA_KINDS)):
            if raw[key] not in allowed:
                r.fail(f"{where}.{key} must be one of {list(allowed)}, got {raw[key]!r}")
        methods = {}
        for mname, mraw in r.mapping(raw["methods"], f"{where}.methods").items():
            mwhere = f"{where}.methods.{mname}"
            mraw = r.mapping(mraw, mwhere, {"label", "overrides", "stages"}, {"stages"})
            if not isinstance(mraw["stages"], list) or not mraw["stages"]:
                r.fail(f"{mwhere}.stages must be a non-empty list of {{config: ...}}")
            stages = []
            for i, sraw in enumerate(mraw["stages"], start=1):
                swhere = f"{mwhere}: stage {i}"
                sraw = r.mapping(sraw, swhere, {"stack", "config", "overrides", "hand_on", "name"})
                if sraw.get("hand_on", "best") not in HAND_ON:
                    r.fail(f"{swhere}: hand_on must be one of {list(HAND_ON)}, got {sraw['hand_on']!r}")
                if ("stack" in sraw) == ("config" in sraw):
                    r.fail(f"{swhere}: give either stack (a run of experiments/stacks.yaml) or config (files)")
                if "stack" in sraw:
                    configs, default_name = r.stack(sraw["stack"], f"{swhere}: stack")
                else:
                    configs = r.files(sraw["config"], f"{swhere}: config")
                    default_name = configs[0].stem
                stages.append(Stage(configs, r.overrides(sraw.get("overrides"), f"{swhere}: overrides"),
                                    sraw.get("hand_on", "best"), str(sraw.get("name") or default_name)))
            methods[mname] = Method(mname, r.text(mraw.get("label"), f"{mwhere}.label", mname), tuple(stages),
                                    r.overrides(mraw.get("overrides"), f"{mwhere}.overrides"))
        if not methods:
            r.fail(f"{where}.methods is empty")
        settings[name] = Setting(name, r.text(raw.get("title"), f"{where}.title", name), raw["task"], raw["data"],
                                 r.text(raw.get("label_budget"), f"{where}.label_budget", ""), methods,
                                 r.overrides(raw.get("overrides"), f"{where}.overrides"))
    if not settings:
        r.fail("settings is empty")
    return Matrix(r.path, r.seeds(content.get("seeds", [0]), "seeds"), settings)


def profile_path(name_or_path: str, profiles_dir: str | Path = "experiments/reproduce/profiles") -> Path:
    """``smoke`` -> ``experiments/reproduce/profiles/smoke.yaml``; a path is returned as is."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate.resolve()
    return (Path(profiles_dir) / f"{name_or_path}.yaml").resolve()


def load_profile(path: str | Path, matrix: Matrix, extra_vars: dict[str, str] | None = None) -> Profile:
    """Reads a profile, ``extra_vars`` (``--set``) merged into its ``vars``, checked against the matrix."""
    r = _Reader(path, "profile", [f"vars.{k}={v}" for k, v in (extra_vars or {}).items()])
    content = r.mapping(r.content, "top level", {"description", "device", "seeds", "vars", "data", "overrides",
                                                 "settings", "per_config", "slurm"}, {"description", "device", "data"})
    data = r.mapping(content["data"], "data")
    for kind in data:
        if kind not in DATA_KINDS:
            r.fail(f"data.{kind}: unknown data kind (one of {list(DATA_KINDS)})")
        r.mapping(data[kind], f"data.{kind}")
    settings = {}
    for name, raw in r.mapping(content.get("settings"), "settings").items():
        where = f"settings.{name}"
        if name not in matrix.settings:
            r.fail(f"{where}: no such setting in {matrix.path} ({sorted(matrix.settings)})")
        raw = r.mapping(raw, where, {"configs", "overrides", "seeds"})
        settings[name] = ProfileSetting(
            r.files(raw["configs"], f"{where}.configs") if raw.get("configs") else (),
            r.overrides(raw.get("overrides"), f"{where}.overrides"),
            r.seeds(raw["seeds"], f"{where}.seeds") if "seeds" in raw else None)
    used = {c for s in matrix.settings.values() for m in s.methods.values() for st in m.stages for c in st.configs}
    per_config = {}
    for config, overrides in r.mapping(content.get("per_config"), "per_config").items():
        (file,) = r.files(config, f"per_config.{config}")
        if file not in used:
            r.fail(f"per_config.{config}: no stage of {matrix.path} uses this config")
        per_config[file] = r.overrides(overrides, f"per_config.{config}")
    return Profile(
        name=r.path.stem, path=r.path, description=r.text(content["description"], "description"),
        device=r.text(content["device"], "device"),
        seeds=r.seeds(content["seeds"], "seeds") if "seeds" in content else None,
        data={k: dict(v or {}) for k, v in data.items()}, overrides=r.overrides(content.get("overrides"), "overrides"),
        settings=settings, per_config=per_config, slurm=r.mapping(content.get("slurm"), "slurm"))


def load_paper_numbers(path: str | Path, matrix: Matrix) -> PaperNumbers:
    """Reads the papers' numbers: each row names a known source, a setting and its task's metric ids."""
    r = _Reader(path, "paper numbers")
    content = r.mapping(r.content, "top level", {"sources", "reported", "not_recorded"}, {"sources"})
    sources = {sid: {k: str(v) for k, v in r.mapping(raw, f"sources.{sid}", {"citation", "short", "note", "read_at"},
                                                      {"citation"}).items()}
               for sid, raw in r.mapping(content["sources"], "sources").items()}
    rows = []
    for setting, entries in r.mapping(content.get("reported"), "reported").items():
        if setting not in matrix.settings:
            r.fail(f"reported.{setting}: no such setting in {matrix.path}")
        if not isinstance(entries, list):
            r.fail(f"reported.{setting} must be a list of rows")
        task = matrix.settings[setting].task
        for i, raw in enumerate(entries):
            where = f"reported.{setting}[{i}]"
            raw = r.mapping(raw, where, {"method", "label", "source", "where", "metrics", "note"},
                            {"method", "source", "where", "metrics"})
            if raw["source"] not in sources:
                r.fail(f"{where}: unknown source {raw['source']!r} (sources: {sorted(sources)})")
            metrics = r.mapping(raw["metrics"], f"{where}.metrics")
            unknown = sorted(set(metrics) - KNOWN_METRICS[task])
            if unknown or not metrics:
                r.fail(f"{where}.metrics: unknown or no metric ids {unknown} for task {task}")
            for k, v in metrics.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    r.fail(f"{where}.metrics.{k} must be a number, got {v!r}")
            source = sources[raw["source"]]
            rows.append(ReportedRow(setting, str(raw["method"]), r.text(raw.get("label"), f"{where}.label",
                                    str(raw["method"])), raw["source"], source["citation"],
                                    source.get("short", raw["source"]), r.text(raw["where"], f"{where}.where"),
                                    {k: float(v) for k, v in metrics.items()}, str(raw.get("note", ""))))
    not_recorded = content.get("not_recorded") or []
    if not isinstance(not_recorded, list):
        r.fail("not_recorded must be a list")
    for i, item in enumerate(not_recorded):
        r.mapping(item, f"not_recorded[{i}]", {"source", "setting", "what", "why"}, {"what", "why"})
    return PaperNumbers(r.path, tuple(rows), tuple(dict(x) for x in not_recorded), sources)
