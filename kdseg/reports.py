"""The JSON reports ``make bench`` and ``make gpu-check`` write: the machine they ran on, in a new
file that never overwrites an earlier one."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine", "write_new_report"]


def machine() -> dict[str, Any]:
    """Platform, Python, torch, CPU (model, cores, torch threads, load) and GPU of this machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_new_report(folder: Path, prefix: str, report: dict[str, Any]) -> Path:
    """Writes ``report`` to ``folder/<prefix>-<UTC timestamp>.json`` and prints its path; raises
    FileExistsError rather than overwrite a report."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"{prefix}-{stamp}.json"
    if path.exists():
        raise FileExistsError(f"{path} exists")
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    return path
