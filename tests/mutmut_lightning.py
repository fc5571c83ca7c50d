"""pytest plugin loaded only by mutmut (``[tool.mutmut] pytest_add_cli_args``): lets Lightning's
``save_hyperparameters`` see through mutmut's trampolines.

mutmut 3 renames each mutated ``__init__`` to ``xǁClassǁ__init____mutmut_orig`` (or ``_<n>``) and
calls it through two wrapper frames in ``mutmut/mutation/trampoline.py``. Lightning's
``collect_init_args`` walks the constructor frames by name and stops at the first frame that is
not an ``__init__``, so every hyperparameter of a mutated subclass would be lost and the model
would fail to build. This plugin skips the trampoline frames and accepts the renamed ``__init__``.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from lightning.pytorch.utilities import parsing


def _is_trampoline(frame: types.FrameType) -> bool:
    return "mutmut" in frame.f_code.co_filename.replace("\\", "/").split("/")


def _is_init(frame: types.FrameType) -> bool:
    name = frame.f_code.co_name
    return name == "__init__" or "ǁ__init____mutmut_" in name


def _get_init_args(frame: types.FrameType) -> tuple[Any, dict[str, Any]]:
    _, _, _, local_vars = inspect.getargvalues(frame)
    if "__class__" not in local_vars or not _is_init(frame):
        return None, {}
    cls = local_vars["__class__"]
    self_var, args_var, kwargs_var = parsing.parse_class_init_keys(cls)
    excluded = {n for n in (self_var, args_var, kwargs_var) if n} | {"__class__", "frame", "frame_args"}
    names = [n for n in inspect.signature(cls.__init__).parameters if n in local_vars]
    local_args = {k: local_vars[k] for k in names}
    if kwargs_var:
        local_args.update(local_args.get(kwargs_var, {}))
    return local_vars.get(self_var), {k: v for k, v in local_args.items() if k not in excluded}


def _collect_init_args(
    frame: types.FrameType, path_args: list[dict[str, Any]], inside: bool = False, classes: tuple[type, ...] = ()
) -> list[dict[str, Any]]:
    while True:
        if not isinstance(frame.f_back, types.FrameType):
            return path_args
        if inside and _is_trampoline(frame):
            frame = frame.f_back
            continue
        _, _, _, local_vars = inspect.getargvalues(frame)
        local_self, local_args = _get_init_args(frame)
        if "__class__" in local_vars and (not classes or isinstance(local_self, classes)):
            path_args.append(local_args)
            inside = True
        elif inside:
            return path_args
        frame = frame.f_back


parsing._get_init_args = _get_init_args
parsing.collect_init_args = _collect_init_args
