"""The rows of one evaluation epoch and the result files of a test run."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Generic, TypeVar

from lightning.pytorch.utilities import rank_zero_info

from kdseg.distributed import gather_unique

__all__ = ["Evaluator", "next_free_path", "write_test_results"]

Row = TypeVar("Row")


class Evaluator(Generic[Row]):
    """Rows of one validation / test epoch, one per sample, added on each rank.

    :meth:`gathered` is the one place where evaluation rows cross DDP ranks: every rank gets all
    rows, one per sample id (a ``DistributedSampler`` pads with repeats), sorted by id.

    Args:
        key: the sample id of a row.
    """

    def __init__(self, key: Callable[[Row], Hashable]) -> None:
        self.key = key
        self.rows: list[Row] = []

    def reset(self) -> None:
        self.rows = []

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def gathered(self) -> list[Row]:
        """Every rank's rows, deduplicated by id and sorted (a collective under DDP)."""
        return gather_unique(self.rows, self.key)


def next_free_path(path: Path) -> Path:
    """``path`` if it does not exist, else ``stem-1.suffix``, ``stem-2.suffix``, ...: results are
    never overwritten."""
    if not path.exists():
        return path
    for i in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"{path}: too many earlier results beside it")


def write_test_results(
    directory: Path, summary: dict[str, Any], write_cases: Callable[[Path], Path], table: str
) -> tuple[Path, Path]:
    """Writes ``test_metrics.json`` (``summary``) and ``test_cases.csv`` (by ``write_cases``, given
    the free path) into ``directory`` without overwriting earlier results, and logs ``table``."""
    json_path = next_free_path(directory / "test_metrics.json")
    json_path.write_text(json.dumps(summary, indent=2))
    csv_path = write_cases(next_free_path(directory / "test_cases.csv"))
    rank_zero_info(table)
    rank_zero_info(f"wrote {json_path} and {csv_path}")
    return json_path, csv_path
