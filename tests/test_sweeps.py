"""The W&B sweep files (experiments/sweeps/*.yaml): well formed, and the command line a
``wandb agent`` builds from them parses, reaches the model and trains.

The agent's macro expansion is wandb's own (``wandb.sdk.launch.sweeps.utils``, wandb is pinned):
``${env}`` -> ``/usr/bin/env``, ``${interpreter}`` -> ``python`` (here ``sys.executable``, the
virtualenv's; a real agent takes ``python`` from PATH), ``${program}`` -> ``program``,
``${args}`` -> ``--key=value`` for every parameter. No W&B server is contacted: runs log with
``WANDB_MODE=offline`` into a temporary folder.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, STACKS, TINY_CYTOLOGY_PHANTOM, TINY_DETECTOR, TINY_NETWORK

SWEEP_DIR = REPO / "experiments" / "sweeps"
SWEEPS = sorted(SWEEP_DIR.glob("*.yaml"))
METHODS = {
    "supervised", "mean_teacher", "ua_mt", "action_stage3",  # ACDC semi-supervised
    "pce", "pce_em", "ustm", "dmpls", "scribsd", "scribsd_plus",  # ACDC scribbles
    "mmt_psm",  # ISBI 2014 instance segmentation
}
#: Run as a real agent would in the default suite (one semi-supervised, one scribble, the
#: instance one); the others behind the ``slow`` marker.
REPRESENTATIVE = {"mean_teacher", "scribsd_plus", "mmt_psm"}
LOGGER_SNIPPET = "experiments/loggers/wandb.yaml"

#: A tiny light Mask R-CNN at 64 px on a 5-image cytology phantom (as tests/test_instance_cli.py).
TINY_INSTANCE = [
    "--data.init_args.root=null",  # the built-in cytology phantom
    "--data.init_args.edf_root=null",
    *TINY_CYTOLOGY_PHANTOM,
    "--data.init_args.batch_size=2",
    *TINY_DETECTOR,
]


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def experiment_layers(sweep: dict[str, Any]) -> list[str]:
    """The run's stack of config layers: every ``--config`` of the command but the logger's."""
    configs = [c.split("=", 1)[1] for c in sweep["command"] if str(c).startswith("--config=")]
    return configs[:-1]


def sample(spec: dict[str, Any], rng: random.Random) -> Any:
    """One value the sweep controller could hand out for ``spec``: ``values`` -> the first,
    ``value`` -> it, a distribution -> a draw inside its range."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][0]
    low, high = spec["min"], spec["max"]
    distribution = spec.get("distribution", "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform")
    if distribution == "uniform":
        return rng.uniform(low, high)
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution == "int_uniform":
        return rng.randint(low, high)
    raise AssertionError(f"no sampler for distribution {distribution!r}: extend sample()")


def sampled_values(path: Path) -> dict[str, Any]:
    rng = random.Random(path.stem)
    return {key: sample(spec, rng) for key, spec in load(path)["parameters"].items()}


def agent_command(sweep: dict[str, Any], values: dict[str, Any]) -> list[str]:
    """The command line ``wandb agent`` runs for one suggestion (wandb_agent.Agent._command_run)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(list(sweep["command"]))  # ${envvar:NAME}
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros["interpreter"] = [sys.executable]
    macros["program"] = [sweep["program"]]
    if os.name != "nt":
        macros["env"] = ["/usr/bin/env"]
    expanded: list[str] = []
    for item in map(str, command):
        if item.startswith("${") and item.endswith("}"):
            expanded += macros.get(item[2:-1]) or []
        else:
            expanded.append(item)
    return expanded


def same(got: Any, value: Any) -> bool:
    return got == pytest.approx(value) if isinstance(value, float) else got == value


def fit_arguments(command: list[str]) -> list[str]:
    """What follows ``fit`` in the agent's command line (the CLI's arguments)."""
    return command[command.index("fit") + 1 :]


def test_every_method_has_a_sweep() -> None:
    assert {p.stem for p in SWEEPS} == METHODS


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_file_is_well_formed(path: Path) -> None:
    sweep = load(path)
    assert sweep["method"] in ("bayes", "random")
    assert (REPO / sweep["program"]).is_file()

    # The command: the agent's macros around `python -m kdseg.cli fit <the run's stack> --config <wandb>`.
    command = [str(c) for c in sweep["command"]]
    assert command[:5] == ["${env}", "${interpreter}", "-m", "kdseg.cli", "fit"]
    assert command[-1] == "${args}"
    configs = [c.split("=", 1)[1] for c in command if c.startswith("--config=")]
    assert configs[-1] == LOGGER_SNIPPET
    runs = [run for run in STACKS if STACKS[run] == configs[:-1] and run.split("/")[0] in ("acdc", "isbi2014")]
    assert path.stem in [run.split("/")[1] for run in runs], "the stack of experiments/stacks.yaml named as the sweep"

    # The metric the run logs and its checkpoint monitors.
    config_text = "\n".join((REPO / layer).read_text() for layer in configs[:-1])
    monitor = "val/aji_mean" if "monitor: val/aji_mean" in config_text else "val/dice_mean"
    assert sweep["metric"] == {"name": monitor, "goal": "maximize"}

    # Parameters: LightningCLI dotted keys of the method's config, valid search spaces, no data root.
    assert sweep["parameters"]
    for key, spec in sweep["parameters"].items():
        section = key.split(".")[0]
        assert section in ("model", "data", "trainer"), key
        assert key not in ("data.init_args.root", "data.init_args.edf_root"), key
        if section in ("model", "data"):
            assert key.startswith(f"{section}.init_args."), key
        kinds = [k for k in ("value", "values", "distribution") if k in spec]
        assert len(kinds) == 1, (key, spec)
        if "distribution" in spec:
            low, high = spec["min"], spec["max"]
            assert low < high, key
            if spec["distribution"] == "log_uniform_values":
                assert low > 0, key
            if spec["distribution"] == "int_uniform":
                assert isinstance(low, int) and isinstance(high, int), key
        if "values" in spec:
            assert len(spec["values"]) >= 2, key

    # ${args} expands to --key=value, one per parameter, after the configs (so it wins).
    values = sampled_values(path)
    expanded = agent_command(sweep, values)
    assert not [c for c in expanded if "${" in c]
    assert expanded[expanded.index(sys.executable) + 1 : expanded.index("fit")] == ["-m", "kdseg.cli"]
    assert expanded[-len(values) :] == [f"--{k}={v}" for k, v in values.items()]


def tiny_overrides(path: Path, acdc_root: Path) -> list[str]:
    if path.stem == "mmt_psm":
        return TINY_INSTANCE
    return [f"--data.init_args.root={acdc_root}", *TINY_NETWORK]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_values_reach_the_model(path: Path, acdc_like_root: Path, tmp_path: Path) -> None:
    """The agent's arguments parse (LightningCLI keys, value types) and every sampled value lands
    in the instantiated method / data module."""
    from kdseg.cli import main

    values = sampled_values(path)
    args = fit_arguments(agent_command(load(path), values))
    args += tiny_overrides(path, acdc_like_root)
    args += [f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"]
    cli = main(args, run=False)
    for key, value in values.items():
        assert same(cli.config[key], value), key
        if key.startswith("model.init_args."):  # the method was built with it
            assert same(cli.model.hparams[key.split(".", 2)[2]], value), key


def run_agent_command(path: Path, acdc_root: Path, tmp_path: Path, real_run: bool) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs the agent's command line for one suggestion in a subprocess, with the environment an
    agent gives its runs (sweep id, run id, the suggestion's config file), logging offline into
    ``tmp_path``. ``real_run``: one training step and one validation, logged to W&B; else
    ``fast_dev_run`` (Lightning then replaces the logger)."""
    from wandb.sdk.lib import config_util

    sweep = load(path)
    values = sampled_values(path)
    params = tmp_path / "wandb" / "sweep-test" / "config-sweeprun.yaml"
    config_util.save_config_file_from_dict(str(params), {k: {"value": v} for k, v in values.items()})
    env = {
        **os.environ,
        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
        "WANDB_SWEEP_ID": "test", "WANDB_RUN_ID": "sweeprun", "WANDB_SWEEP_PARAM_PATH": str(params),
        "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
    }
    overrides = tiny_overrides(path, acdc_root)
    if path.stem != "mmt_psm":
        if "experiments/data/acdc_semi.yaml" in experiment_layers(sweep):
            overrides.append("--data.init_args.labeled_patients=2")  # 2 of the 6 phantom train patients
    else:
        overrides += ["--model.init_args.warmup_steps=0", "--model.init_args.pseudo_label_score=0.0"]
    if real_run:
        overrides += ["--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
                      "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1"]
    else:
        overrides.append("--trainer.fast_dev_run=true")
    overrides += [f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"]
    command = agent_command(sweep, values) + overrides
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "kdseg: run folder" in result.stdout
    return result, values


def _flushed_record(path: Path, expected: bytes, patience_s: float = 60.0) -> bytes:
    """The offline run file once it holds ``expected``: W&B's service process writes it
    asynchronously and may still be flushing after the training process has exited (seen on a
    loaded 2-core machine: only the file header was there)."""
    deadline = time.monotonic() + patience_s
    record = path.read_bytes()
    while expected not in record and time.monotonic() < deadline:
        time.sleep(0.5)
        record = path.read_bytes()
    return record


def check_offline_wandb_run(tmp_path: Path, metric: str, values: dict[str, Any]) -> None:
    """The offline W&B run holds the sweep's metric, and the run folder's config the sampled values."""
    runs = list((tmp_path / "wandb").glob("offline-run-*-sweeprun"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    record = _flushed_record(runs[0] / "run-sweeprun.wandb", metric.encode())
    assert metric.encode() in record
    assert all(key.encode() in record for key in values)  # the suggestion is the run's W&B config
    saved = yaml.safe_load((tmp_path / "kdseg" / "sweeprun" / "config.yaml").read_text())
    for key, value in values.items():
        section, _, name = key.split(".", 2)
        if section == "model":
            assert same(saved["model"]["init_args"][name], value), key


def _agent_params() -> list:
    return [
        pytest.param(p, id=p.stem, marks=() if p.stem in REPRESENTATIVE else pytest.mark.slow) for p in SWEEPS
    ]


@pytest.mark.parametrize("path", _agent_params())
def test_agent_command_runs(path: Path, acdc_like_root: Path, tmp_path: Path) -> None:
    real_run = path.stem == "mean_teacher"
    result, values = run_agent_command(path, acdc_like_root, tmp_path, real_run=real_run)
    if real_run:
        metric = load(path)["metric"]["name"]
        assert f"kdseg: best {metric}" in result.stdout
        check_offline_wandb_run(tmp_path, metric, values)
