"""The config that defines each method, for the tools that run every method (``make bench``,
``make gpu-check``).

A method's config has the same file name in its family's phantom folder and in its real-data
folder, so one row names it for both: :mod:`kdseg.bench` times it on the phantom,
:mod:`kdseg.gpu_check` fits it on the real data (or on the phantom written in the real data's
layout). Each tool picks which methods it runs.
"""

from __future__ import annotations

__all__ = ["FAMILY_DATA", "FAMILY_FOLDERS", "METHOD_CONFIGS", "phantom_config", "real_data_config"]

#: family -> (phantom config folder, real-data config folder).
FAMILY_FOLDERS: dict[str, tuple[str, str]] = {
    "semantic": ("experiments/phantom", "experiments/acdc"),
    "instance": ("experiments/cytology_phantom", "experiments/isbi2014"),
}

#: family -> its real data set (a ``data`` key of the reproduce profiles).
FAMILY_DATA: dict[str, str] = {"semantic": "acdc", "instance": "isbi2014"}

#: method name -> (family, config file name).
METHOD_CONFIGS: dict[str, tuple[str, str]] = {
    "supervised": ("semantic", "supervised.yaml"),
    "mean_teacher": ("semantic", "mean_teacher.yaml"),
    "ua_mt": ("semantic", "ua_mt.yaml"),
    "action_stage3": ("semantic", "action_stage3.yaml"),
    "action_no_anco": ("semantic", "action_no_anco.yaml"),
    "pce": ("semantic", "pce.yaml"),
    "pce_em": ("semantic", "pce_em.yaml"),
    "ustm": ("semantic", "ustm.yaml"),
    "dmpls": ("semantic", "dmpls.yaml"),
    "scribsd": ("semantic", "scribsd.yaml"),
    "scribsd_plus": ("semantic", "scribsd_plus.yaml"),
    "instance_supervised": ("instance", "supervised.yaml"),
    "instance_mean_teacher": ("instance", "mean_teacher.yaml"),
    "mmt_psm": ("instance", "mmt_psm.yaml"),
}


def phantom_config(name: str) -> str:
    """The repository-relative path of method ``name``'s config on its family's phantom."""
    family, file = METHOD_CONFIGS[name]
    return f"{FAMILY_FOLDERS[family][0]}/{file}"


def real_data_config(name: str) -> str:
    """The repository-relative path of method ``name``'s config on its family's real data."""
    family, file = METHOD_CONFIGS[name]
    return f"{FAMILY_FOLDERS[family][1]}/{file}"
