"""Which ACDC patients train, which select the checkpoint and which are tested: the protocol of a root.

The benchmark split of HiLab-git/SSL4MIS (``data/ACDC/train.list``, ``val.list``, ``test.list``:
70 / 10 / 20 of the 100 ACDC training patients) is what the papers report on. Two protocols, chosen
by what the data root holds:

- ``ssl4mis``: ``splits/test.txt`` exists (a user's full ACDC). Train on ``train.txt``, select
  the checkpoint on ``val.txt``, test on ``test.txt``.
- ``train-holdout``: no ``splits/test.txt`` (kdseg's shared copy withholds the 20 test patients).
  The last ``holdout`` patients of ``train.txt`` leave training and select the checkpoint;
  ``val.txt`` is the test set. Departs from SSL4MIS, which selects on ``val.list``: here that list
  is the only held-out labeled set, and selecting on the patients one reports would bias the
  numbers upwards.

Split files the user names explicitly win: a given ``test_split`` means ``ssl4mis`` with that file;
a given ``val_split`` is the validation set as is (``train.txt`` is then not cut). The held-out
patients come from the *end* of ``train.txt``, so ``labeled_patients: N`` keeps meaning "the first
N patients of train.txt" (SSL4MIS order) as long as N leaves them out. A patient in both the
training set and the validation or test set is an error (:class:`~kdseg.data.volume.DataError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kdseg.data.volume import DataError

ProtocolName = Literal["ssl4mis", "train-holdout"]


@dataclass(frozen=True)
class SplitSource:
    """The patients of one split, in order, and where they come from (named in messages)."""

    patients: tuple[str, ...]
    file: Path
    how: str = "{file}"  # how the patients come from ``file``; ``{file}`` stands for it

    def text(self, file_names: bool = False) -> str:
        """``"5 patients (the last 5 of /data/splits/train.txt)"``; ``file_names``: the name only."""
        return f"{len(self.patients)} patients ({self.how.format(file=self.file.name if file_names else self.file)})"


@dataclass(frozen=True)
class SplitProtocol:
    """The resolved train / val (checkpoint selection) / test splits of an ACDC root."""

    name: ProtocolName
    train: SplitSource
    val: SplitSource
    test: SplitSource

    def split(self, name: str) -> SplitSource:
        if name not in ("train", "val", "test"):
            raise KeyError(name)
        return getattr(self, name)

    def describe(self, file_names: bool = False) -> str:
        """One line: the protocol and the three splits, for the log or (``file_names``: split files
        by name, not path) a table caption."""
        why = {
            "ssl4mis": "the SSL4MIS protocol: test split present",
            "train-holdout": "no test split: the last train patients select the checkpoint, val is the test set",
        }[self.name]
        text = (f"ACDC protocol {self.name} ({why}): train {self.train.text(file_names)}, validation for "
                f"checkpoint selection {self.val.text(file_names)}, test {self.test.text(file_names)}")
        shared = set(self.val.patients) & set(self.test.patients)
        if shared:  # allowed (explicit files win) but it biases the test numbers: say so
            text += f"; WARNING: validation and test share {len(shared)} patients"
        return text


def resolve_protocol(
    root: Path,
    train_split: Path | None = None,
    val_split: Path | None = None,
    test_split: Path | None = None,
    holdout: int = 5,
) -> SplitProtocol:
    """The splits of ``root`` (files default to ``root/splits/<name>.txt``; see the module doc).

    Args:
        root: the data folder.
        train_split, val_split, test_split: split files given by the user, or None.
        holdout: patients cut from the end of the train split for validation when there is no
            test split and no ``val_split``.

    Raises:
        DataError: a needed split file is missing or malformed, the holdout leaves no training
            patient, or a patient is in the training set and in the validation or test set.
    """
    from kdseg.data.readers import read_split_file

    splits = Path(root) / "splits"
    train_file = Path(train_split) if train_split else splits / "train.txt"
    val_file = Path(val_split) if val_split else splits / "val.txt"
    test_file = Path(test_split) if test_split else splits / "test.txt"

    def read(path: Path, name: str) -> tuple[str, ...]:
        if not path.is_file():
            raise DataError(f"{path}: the {name} split file does not exist (one patient id a line; "
                            f"set data.{name}_split to another file)")
        return tuple(read_split_file(path))

    train_all = read(train_file, "train")
    if test_split or test_file.is_file():
        protocol = SplitProtocol(
            "ssl4mis",
            SplitSource(train_all, train_file),
            SplitSource(read(val_file, "val"), val_file),
            SplitSource(read(test_file, "test"), test_file),
        )
    else:
        default_val = splits / "val.txt"
        test = SplitSource(read(default_val, "val"), default_val, "{file}, no test split")
        if val_split:
            train = SplitSource(train_all, train_file)
            val = SplitSource(read(val_file, "val"), val_file)
        else:
            if holdout < 1 or holdout >= len(train_all):
                raise DataError(
                    f"{train_file}: data.fallback_val_patients={holdout} must be >= 1 and leave a training "
                    f"patient (the file lists {len(train_all)})"
                )
            train = SplitSource(train_all[:-holdout], train_file, f"{{file}} without its last {holdout}")
            val = SplitSource(train_all[-holdout:], train_file, f"the last {holdout} of {{file}}")
        protocol = SplitProtocol("train-holdout", train, val, test)
    for other in ("val", "test"):
        shared = sorted(set(protocol.train.patients) & set(protocol.split(other).patients))
        if shared:
            raise DataError(
                f"{protocol.train.file} and {protocol.split(other).file}: patient(s) {', '.join(shared[:3])} "
                f"are in the training set and in the {other} set"
            )
    return protocol
