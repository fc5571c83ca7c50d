"""The key of a run: a hash of its resolved config (``kdseg fit ... --print_config``) without the
fields that only say where and how it reports (:data:`IGNORED_FIELDS`), split files by content.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

import yaml

#: Dotted config paths that do not change what a run computes.
IGNORED_FIELDS: tuple[str, ...] = (
    "trainer.logger",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "checkpoint.dirpath",
    "checkpoint.verbose",
    "prediction_writer",
    "ckpt_path",
)
KEY_LENGTH = 12


class ConfigError(ValueError):
    """``kdseg`` refused the arguments (unknown key, bad value): the message is its error."""


def resolve_config(args: Sequence[str], subcommand: str = "fit") -> str:
    """``kdseg <subcommand> <args> --print_config``, parsed in this process (a subprocess would spend
    seconds importing torch); ConfigError with the end of the CLI's error output if it refuses."""
    from kdseg.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main([subcommand, *args, "--print_config"])
    except SystemExit as exit_info:
        code = exit_info.code
    except Exception as error:  # a config that breaks the parser in another way
        raise ConfigError(f"{type(error).__name__}: {error}") from None
    if code not in (0, None) or not out.getvalue().strip():
        tail = "\n".join(err.getvalue().strip().splitlines()[-8:])
        raise ConfigError(tail or f"kdseg {subcommand} --print_config exited with {code}")
    return out.getvalue()


def normalized_config(resolved: str | dict[str, Any]) -> dict[str, Any]:
    """The resolved config without :data:`IGNORED_FIELDS`, split files replaced by their content hash."""
    config = yaml.safe_load(resolved) if isinstance(resolved, str) else json.loads(json.dumps(resolved))
    if not isinstance(config, dict):
        raise ValueError("a resolved config must be a mapping")
    for dotted in IGNORED_FIELDS:
        *parents, last = dotted.split(".")
        node: Any = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    _alias_split_files(config)
    return config


def config_key(resolved: str | dict[str, Any]) -> str:
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
