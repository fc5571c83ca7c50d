"""The matrix expanded into runs: every (setting, method, seed) with each stage's ``kdseg fit``
arguments (later winning: the stack's and the profile's ``--config`` files; the matrix's, the
profile's and the data's overrides; ``--seed_everything``) and key. A handed-on checkpoint does not
exist while planning: it is named ``handed-on:<previous key>:<best|last>``, so a later stage's key
changes whenever an earlier stage's does.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from kdseg.reproduce.data import DataUnavailable, PreparedData, prepare_data
from kdseg.reproduce.spec import Matrix, Method, Profile, ProfileSetting, Setting, SpecError

INIT_WEIGHTS_ARG = "--model.init_args.init_weights_from"

#: Config fields that do not change what a run computes: left out of the key (split files count by content).
IGNORED_FIELDS = ("trainer.logger", "trainer.default_root_dir", "trainer.enable_progress_bar",
                  "trainer.enable_model_summary", "trainer.log_every_n_steps", "checkpoint.dirpath",
                  "checkpoint.verbose", "prediction_writer", "ckpt_path")
KEY_LENGTH = 12


class ConfigError(ValueError):
    """``kdseg`` refused the arguments (unknown key, bad value): the message is its error."""


def resolve_config(args: Sequence[str]) -> str:
    """``kdseg fit <args> --print_config``, parsed in this process (a subprocess would spend seconds
    importing torch); ConfigError with the end of the CLI's error output if it refuses."""
    from kdseg.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(["fit", *args, "--print_config"])
    except SystemExit as exit_info:
        code = exit_info.code
    except Exception as error:  # a config that breaks the parser in another way
        raise ConfigError(f"{type(error).__name__}: {error}") from None
    if code not in (0, None) or not out.getvalue().strip():
        tail = "\n".join(err.getvalue().strip().splitlines()[-8:])
        raise ConfigError(tail or f"kdseg fit --print_config exited with {code}")
    return out.getvalue()


def normalized_config(resolved: str) -> dict[str, Any]:
    """The resolved config without :data:`IGNORED_FIELDS`, split files replaced by their content hash."""
    config = yaml.safe_load(resolved)
    for dotted in IGNORED_FIELDS:
        *parents, last = dotted.split(".")
        node: Any = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    _alias_split_files(config)
    return config


def config_key(resolved: str) -> str:
    """A short hex hash of :func:`normalized_config` (the same config gives the same key)."""
    text = json.dumps(normalized_config(resolved), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def _alias_split_files(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("_split") and isinstance(value, str) and Path(value).is_file():
                node[key] = {"split_sha256": hashlib.sha256(Path(value).read_bytes()).hexdigest()}
            else:
                _alias_split_files(value)
    elif isinstance(node, list):
        for item in node:
            _alias_split_files(item)


@dataclass
class StagePlan:
    """One stage of one run: its arguments, resolved config and key (or why it has none)."""

    index: int
    count: int
    name: str
    args: tuple[str, ...]
    hand_on: str
    key: str | None = None
    resolved: dict[str, Any] = field(default_factory=dict)
    resolved_text: str = ""
    error: str | None = None

    @property
    def folder_name(self) -> str:
        return f"{self.name}-{self.key}"

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
        """Why this run cannot start, else None."""
        bad = next((s for s in self.stages if s.error), None)
        return self.unavailable or (bad and f"stage {bad.index}/{bad.count} ({bad.name}): {bad.error}")

    @property
    def final(self) -> StagePlan:
        return self.stages[-1]

    @property
    def iterations(self) -> list[int | None]:
        return [s.get("trainer.max_steps") for s in self.stages]


def parse_selection(only: Sequence[str], matrix: Matrix) -> set[tuple[str, str]]:
    """The (setting, method) pairs ``--only`` names (``setting[/method]``, wildcards, commas); all if empty."""
    pairs = {(s, m) for s, setting in matrix.settings.items() for m in setting.methods}
    chosen = set()
    for item in (i.strip() for pattern in only for i in pattern.split(",") if i.strip()):
        spat, _, mpat = item.partition("/")
        hits = {(s, m) for s, m in pairs if fnmatch.fnmatchcase(s, spat) and fnmatch.fnmatchcase(m, mpat or "*")}
        if not hits:
            raise SpecError(f"--only {item}: matches no entry of {matrix.path} "
                            f"({', '.join(f'{s}/{m}' for s, m in sorted(pairs))})")
        chosen |= hits
    return chosen if only else pairs


def stage_args(setting: Setting, method: Method, index: int, profile: Profile, data: PreparedData,
               seed: int) -> tuple[str, ...]:
    """The ``kdseg fit`` arguments of a stage, without the handed-on checkpoint."""
    stage = method.stages[index]
    psetting = profile.settings.get(setting.name, ProfileSetting())
    return (*(f"--config={c}" for c in (*stage.configs, *psetting.configs)),
            *setting.overrides, *method.overrides, *stage.overrides, *profile.overrides, *psetting.overrides,
            *(o for c in stage.configs for o in profile.per_config.get(c, ())),
            *data.overrides, f"--seed_everything={seed}")


def plan_runs(matrix: Matrix, profile: Profile, out: Path, selection: set[tuple[str, str]],
              seeds: Sequence[int] | None = None) -> list[RunPlan]:
    """Every run of the matrix under ``profile`` in matrix order, with keys; ``selection`` marks the
    runs to execute. Raises SpecError (no data entry) or DataUnavailable (a selected setting's data)."""
    prepared: dict[str, PreparedData | DataUnavailable] = {}
    for kind in sorted({s.data for s in matrix.settings.values()}):
        if kind not in profile.data:
            raise SpecError(f"{profile.path}: data.{kind} is missing (the matrix has settings on {kind} data)")
        try:
            prepared[kind] = prepare_data(kind, profile.data[kind], out, str(profile.path))
        except DataUnavailable as error:
            prepared[kind] = error
    runs, cache = [], {}
    for setting in matrix.settings.values():
        data = prepared[setting.data]
        if isinstance(data, DataUnavailable) and any(s == setting.name for s, _ in selection):
            raise data
        for method in setting.methods.values():
            for seed in (tuple(seeds) if seeds else profile.seeds_for(setting.name, matrix)):
                selected = (setting.name, method.name) in selection
                if isinstance(data, DataUnavailable):
                    runs.append(RunPlan(setting, method, seed, None, [], selected, str(data)))
                    continue
                stages = [StagePlan(i + 1, len(method.stages), st.name,
                                    stage_args(setting, method, i, profile, data, seed), st.hand_on)
                          for i, st in enumerate(method.stages)]
                _resolve(stages, cache)
                runs.append(RunPlan(setting, method, seed, data, stages, selected))
    return runs


def _resolve(stages: list[StagePlan], cache: dict[tuple[str, ...], tuple[str, str, dict]]) -> None:
    """Fills each stage's resolved config and key (or its error) in order."""
    for previous, plan in zip([None, *stages], stages):
        full = plan.args
        if previous is not None and previous.key is None:
            plan.error = f"stage {previous.index} could not be planned"
            continue
        if previous is not None:
            full += (f"{INIT_WEIGHTS_ARG}=handed-on:{previous.key}:{previous.hand_on}",)
        if full not in cache:
            try:
                text = resolve_config(full)
                cache[full] = (text, config_key(text), yaml.safe_load(text))
            except ConfigError as error:
                plan.error = f"kdseg rejected the arguments: {error}"
                continue
        plan.resolved_text, plan.key, plan.resolved = cache[full]
