"""Safe checkpoint loading: a shared ``.ckpt`` must not be able to run code on the reader's machine.

``torch.load(..., weights_only=False)`` unpickles arbitrary objects, so a crafted checkpoint (an
object whose ``__reduce__`` calls ``os.system``) runs code when loaded. kdseg's own checkpoint
reads (``init_weights_from``, ``--ckpt_path`` hyperparameters, the results runner) go through
:func:`load_checkpoint`, which uses ``weights_only=True`` (tensors, containers and primitive
types only, plus the allow-list :data:`SAFE_GLOBALS`) and turns every failure into one
:class:`CheckpointError` naming the file and what is wrong; Lightning's own ``--ckpt_path`` load
gets ``weights_only=True`` from ``KdsegCLI._prepare_subcommand_kwargs``.

kdseg's own checkpoints (Lightning's dict: ``state_dict``, loops, callbacks, optimizer states and
the LightningCLI ``hyper_parameters``, which are plain dicts/lists/numbers/strings) load with the
default ``weights_only`` allow-list, so :data:`SAFE_GLOBALS` is empty; a type a future checkpoint
needs is added there, never by falling back to ``weights_only=False``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from kdseg.data.volume import DataError

#: Extra (non-tensor, non-primitive) types kdseg's own checkpoints hold; registered with
#: ``torch.serialization.add_safe_globals`` so Lightning's own ``weights_only`` loads accept them too.
SAFE_GLOBALS: list[Any] = []
torch.serialization.add_safe_globals(SAFE_GLOBALS)


class CheckpointError(DataError):
    """A checkpoint that is missing, not a checkpoint, or needs more than safe loading allows."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The content of the checkpoint at ``path``, loaded with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, is not a PyTorch checkpoint (truncated, another
            format), is not a dict, or holds objects outside the safe allow-list (the message
            names them; such a file is refused rather than unpickled, as it could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            content = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (UnpicklingError: {exc})") from exc
        try:
            blocked = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)) or "unknown"
        except Exception:  # the scan itself can fail on odd files; the refusal stands regardless
            blocked = "unknown"
        raise CheckpointError(
            f"{path}: refused to load: the checkpoint holds objects that safe loading "
            f"(weights_only=True) does not allow ({blocked}); loading them could run code. "
            "kdseg checkpoints hold only tensors and plain values: use a checkpoint kdseg wrote"
        ) from exc
    except Exception as exc:  # noqa: BLE001
        # torch.load fails on other formats, empty or truncated files with any error type
        # (EOFError, KeyError, IndexError, RuntimeError, ...): all mean "not a checkpoint".
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "file is empty or truncated"
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: torch.load cannot read it "
                              f"({type(exc).__name__}: {detail})") from exc
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (holds a {type(content).__name__}, expected a dict)")
    return content


def load_matching_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Copies into ``module`` every tensor of the checkpoint's ``state_dict`` whose name and shape
    match (``init_weights_from``: no optimizer state or step); a student-only checkpoint also
    initialises an ``ema_teacher``.

    Raises:
        FileNotFoundError: no such checkpoint.
        CheckpointError: not a checkpoint, or one holding more than tensors and plain values.
        ValueError: the checkpoint has no weights for the student's U-Net.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: init_weights_from names no checkpoint file")
    state = load_checkpoint(path).get("state_dict", {})
    own = module.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith("student.unet.") for k in matched):
        raise ValueError(f"{path}: no student U-Net weights of this architecture in the checkpoint")
    if hasattr(module, "ema_teacher") and not any(k.startswith("ema_teacher.") for k in matched):
        # An earlier student-only run: its student also initialises the teacher.
        matched.update({
            "ema_teacher." + k[len("student."):]: v for k, v in matched.items()
            if k.startswith("student.") and "ema_teacher." + k[len("student."):] in own
        })
    module.load_state_dict(matched, strict=False)
    rank_zero_info(f"initialised {len(matched)} of {len(own)} tensors from {path}")
