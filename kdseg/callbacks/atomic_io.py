"""Checkpoint files that are either the previous complete file or the new complete file.

Lightning's ``TorchCheckpointIO`` serialises to memory and then writes through an fsspec
transaction, which for local paths stages the bytes in the system temp folder and *moves* them:
across file systems that is a copy into the target, so a kill during it leaves a truncated
``last.ckpt`` and the only state to resume from is lost. Here every local checkpoint is written
to a temporary file in the target's own folder, flushed to disk, then renamed over the target
with ``os.replace`` (atomic on POSIX and Windows). Remote URLs keep Lightning's behaviour.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through ``<folder>/.<name>.*.tmp`` + fsync + ``os.replace``;
    on any failure (or interruption) the target is untouched and the temporary file removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not "*.ckpt": a leftover from a kill -9 is never mistaken for a checkpoint.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are ordinary files
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (:func:`atomic_torch_save`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)
