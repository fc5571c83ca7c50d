"""The matrix expanded into runs: every (setting, method, seed) with the exact ``kdseg fit``
arguments of each of its stages and each stage's key.

Arguments of a stage, in the order they are given (later ones win, as in any ``kdseg`` command):

1. ``--config=<stage config>`` then the profile's extra config files of the setting;
2. the matrix's overrides: setting, method, stage;
3. the profile's overrides: every run, the setting, the stage's method config (``per_config``),
   with ``${vars}`` expanded;
4. the data: root (for ACDC also ``fallback_val_patients`` and any split file the profile names;
   the data module picks the protocol, :mod:`kdseg.data.protocol`), ``--seed_everything=<seed>``, and from the
   second stage on ``--model.init_args.init_weights_from=<checkpoint of the previous stage>``.

Keys are computed here, for every run of the matrix (not only the selected ones: the table shows
every entry), from the resolved config (:func:`kdseg.reproduce.config_key.resolve_config`). The
checkpoint a stage starts from does not exist before its previous stage ran, so while planning it
is named by the previous stage's key and the checkpoint kind (``handed-on:<key>:best``): a later
stage's key thus changes whenever an earlier stage's does.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from kdseg.reproduce.config_key import ConfigError, config_key, resolve_config
from kdseg.reproduce.data import DataUnavailable, PreparedData, prepare_data
from kdseg.reproduce.spec import Matrix, Method, Profile, ProfileSetting, Setting, SpecError

INIT_WEIGHTS_ARG = "--model.init_args.init_weights_from"


@dataclass
class StagePlan:
    """One stage of one run: its arguments, resolved config and key (or why it has none)."""

    index: int
    count: int
    config: Path
    args: tuple[str, ...]
    hand_on: str
    key: str | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    resolved_text: str = ""
    error: str | None = None

    @property
    def folder_name(self) -> str:
        return f"{self.config.stem}-{self.key}"

    @property
    def is_last(self) -> bool:
        return self.index == self.count

    def get(self, dotted: str, default: Any = None) -> Any:
        """A value of the resolved config by dotted path (``trainer.max_steps``)."""
        node: Any = self.resolved
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


@dataclass
class RunPlan:
    """One table cell's worth of work: a method's stages for one seed in one setting."""

    index: int
    setting: Setting
    method: Method
    seed: int
    data: PreparedData | None
    stages: list[StagePlan]
    selected: bool
    unavailable: str | None = None

    @property
    def label(self) -> str:
        return f"{self.setting.name} {self.method.name} seed {self.seed}"

    @property
    def error(self) -> str | None:
        """Why this run cannot start (data missing, a stage rejected by the CLI), else None."""
        if self.unavailable:
            return self.unavailable
        for stage in self.stages:
            if stage.error:
                return f"stage {stage.index}/{stage.count} ({stage.config.name}): {stage.error}"
        return None

    @property
    def final(self) -> StagePlan:
        return self.stages[-1]

    @property
    def iterations(self) -> list[int | None]:
        return [s.get("trainer.max_steps") for s in self.stages]


def parse_selection(only: Sequence[str], matrix: Matrix) -> set[tuple[str, str]]:
    """The (setting, method) pairs named by ``--only`` patterns (``setting`` or
    ``setting/method``, shell wildcards allowed); all pairs when ``only`` is empty."""
    pairs = {(s, m) for s, setting in matrix.settings.items() for m in setting.methods}
    if not only:
        return pairs
    chosen: set[tuple[str, str]] = set()
    for pattern in only:
        for item in pattern.split(","):
            item = item.strip()
            if not item:
                continue
            spat, _, mpat = item.partition("/")
            hits = {(s, m) for s, m in pairs if fnmatch.fnmatchcase(s, spat) and fnmatch.fnmatchcase(m, mpat or "*")}
            if not hits:
                names = ", ".join(f"{s}/{m}" for s, m in sorted(pairs))
                raise SpecError(f"--only {item}: matches no entry of {matrix.path} ({names})")
            chosen |= hits
    return chosen


def stage_args(setting: Setting, method: Method, stage_index: int, profile: Profile, data: PreparedData,
               seed: int) -> tuple[str, ...]:
    """The ``kdseg fit`` arguments of a stage, without the handed-on checkpoint."""
    stage = method.stages[stage_index]
    psetting = profile.settings.get(setting.name, ProfileSetting())
    where = f"{setting.name}/{method.name} stage {stage_index + 1}"
    return (
        f"--config={stage.config}",
        *(f"--config={c}" for c in psetting.configs),
        *setting.overrides,
        *method.overrides,
        *stage.overrides,
        *(profile.expand(o, where) for o in profile.overrides),
        *(profile.expand(o, where) for o in psetting.overrides),
        *(profile.expand(o, where) for o in profile.per_config.get(stage.config, ())),
        *data.overrides,
        f"--seed_everything={seed}",
    )


def handed_on_placeholder(key: str, kind: str) -> str:
    return f"handed-on:{key}:{kind}"


def plan_runs(matrix: Matrix, profile: Profile, out: Path, selection: set[tuple[str, str]],
              seeds: Sequence[int] | None = None) -> list[RunPlan]:
    """Every run of the matrix under ``profile``, in matrix order (setting, method, seed), with
    keys; ``selection`` marks the runs to execute.

    Raises:
        SpecError: the profile has no data entry for a data kind the matrix uses.
        DataUnavailable: a selected setting's data is missing.
    """
    prepared: dict[str, PreparedData | DataUnavailable] = {}
    for kind in sorted({s.data for s in matrix.settings.values()}):
        if kind not in profile.data:
            raise SpecError(f"{profile.path}: data.{kind} is missing (the matrix has settings on {kind} data)")
        try:
            prepared[kind] = prepare_data(kind, profile.data[kind], out, str(profile.path))
        except DataUnavailable as error:
            prepared[kind] = error
    for setting in matrix.settings.values():
        problem = prepared[setting.data]
        if isinstance(problem, DataUnavailable) and any(s == setting.name for s, _ in selection):
            raise problem

    runs: list[RunPlan] = []
    cache: dict[tuple[str, ...], tuple[str, str, dict[str, Any]]] = {}
    for setting in matrix.settings.values():
        data = prepared[setting.data]
        for method in setting.methods.values():
            for seed in (tuple(seeds) if seeds else profile.seeds_for(setting.name, matrix)):
                selected = (setting.name, method.name) in selection
                if isinstance(data, DataUnavailable):
                    runs.append(RunPlan(len(runs) + 1, setting, method, seed, None, [], selected, str(data)))
                    continue
                stages = _plan_stages(setting, method, profile, data, seed, cache)
                runs.append(RunPlan(len(runs) + 1, setting, method, seed, data, stages, selected))
    return runs


def _plan_stages(setting: Setting, method: Method, profile: Profile, data: PreparedData, seed: int,
                 cache: dict[tuple[str, ...], tuple[str, str, dict[str, Any]]]) -> list[StagePlan]:
    stages: list[StagePlan] = []
    previous: StagePlan | None = None
    for i, stage in enumerate(method.stages):
        plan = StagePlan(
            index=i + 1, count=len(method.stages), config=stage.config,
            args=stage_args(setting, method, i, profile, data, seed), hand_on=stage.hand_on,
        )
        stages.append(plan)
        if previous is not None and previous.key is None:
            plan.error = f"stage {previous.index} could not be planned"
            previous = plan
            continue
        full = list(plan.args)
        if previous is not None:
            full.append(f"{INIT_WEIGHTS_ARG}={handed_on_placeholder(str(previous.key), previous.hand_on)}")
        cached = cache.get(tuple(full))
        if cached is None:
            try:
                text = resolve_config(full)
                cached = (text, config_key(text), yaml.safe_load(text))
            except ConfigError as error:
                plan.error = f"kdseg rejected the arguments: {error}"
                previous = plan
                continue
            cache[tuple(full)] = cached
        plan.resolved_text, plan.key, plan.resolved = cached
        previous = plan
    return stages
