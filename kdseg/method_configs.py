"""The config that defines each method, for the tools that run every method (``make bench``,
``make gpu-check``).

A method's run has the same name under its family's phantom prefix and its real-data prefix in
``experiments/stacks.yaml`` (``phantom/<name>``, ``acdc/<name>``), so one row names it for both: :mod:`kdseg.bench` times it on the phantom,
:mod:`kdseg.gpu_check` fits it on the real data (or on the phantom written in the real data's
layout). Each tool picks which methods it runs.
"""

from __future__ import annotations

__all__ = ["FAMILY_DATA", "FAMILY_FOLDERS", "METHOD_CONFIGS", "phantom_config", "real_data_config"]

#: family -> (phantom run prefix, real-data run prefix) in experiments/stacks.yaml.
FAMILY_FOLDERS: dict[str, tuple[str, str]] = {
    "semantic": ("phantom", "acdc"),
    "instance": ("cytology_phantom", "isbi2014"),
}

#: family -> its real data set (a ``data`` key of the reproduce profiles).
FAMILY_DATA: dict[str, str] = {"semantic": "acdc", "instance": "isbi2014"}

#: method name -> (family, run name under the family's prefixes).
METHOD_CONFIGS: dict[str, tuple[str, str]] = {
    "supervised": ("semantic", "supervised"),
    "mean_teacher": ("semantic", "mean_teacher"),
    "ua_mt": ("semantic", "ua_mt"),
    "action_stage3": ("semantic", "action_stage3"),
    "action_no_anco": ("semantic", "action_no_anco"),
    "pce": ("semantic", "pce"),
    "pce_em": ("semantic", "pce_em"),
    "ustm": ("semantic", "ustm"),
    "dmpls": ("semantic", "dmpls"),
    "scribsd": ("semantic", "scribsd"),
    "scribsd_plus": ("semantic", "scribsd_plus"),
    "instance_supervised": ("instance", "supervised"),
    "instance_mean_teacher": ("instance", "mean_teacher"),
    "mmt_psm": ("instance", "mmt_psm"),
}


def phantom_config(name: str) -> str:
    """The run of experiments/stacks.yaml that fits method ``name`` on its family's phantom."""
    family, file = METHOD_CONFIGS[name]
    return f"{FAMILY_FOLDERS[family][0]}/{file}"


def real_data_config(name: str) -> str:
    """The run of experiments/stacks.yaml that fits method ``name`` on its family's real data."""
    family, file = METHOD_CONFIGS[name]
    return f"{FAMILY_FOLDERS[family][1]}/{file}"
