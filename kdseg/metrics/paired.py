"""Paired per-case comparison of two methods from their ``test_cases.csv`` files.

Ten test images cannot separate a 0.01 AJI difference, and a mean over two seeds does not say so.
This compares two methods case by case: for each seed, the per-case score of method A minus that
of method B on the same test cases, pooled over seeds, with a percentile bootstrap interval of
the mean difference (resampling the (seed, case) pairs).

The per-case score is the mean of the chosen metric columns over all rows of that case: for the
instance format (one row per image and class, ``image_id,class,...,aji,...``) ``--metric aji``
is the AJI averaged over classes, as ``aji_mean`` of ``test_metrics.json``; for the ACDC format
(one row per volume, ``case_id,dice_RV,...``) ``--metric dice_RV dice_Myo dice_LV`` is the
volume's mean Dice.

Usage::

    python -m kdseg.metrics.paired --metric aji \\
        --a experiments/results/cpu/runs/cervical/mmt_psm/seed{0,1,2}/test_cases.csv \\
        --b experiments/results/cpu/runs/cervical/supervised/seed{0,1,2}/test_cases.csv
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["PairedDifference", "case_scores", "paired_difference", "main"]


def case_scores(path: Path, metrics: Sequence[str]) -> dict[str, float]:
    """Per-case score of one ``test_cases.csv``: the mean of ``metrics`` over the case's rows.

    The case is the first column (``image_id`` / ``case_id``). Raises ``ValueError`` naming the
    file when a metric column is missing or a value is not a finite number.
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty file, no header")
        key = reader.fieldnames[0]
        missing = [m for m in metrics if m not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(reader.fieldnames)})")
        values: dict[str, list[float]] = {}
        for line, row in enumerate(reader, start=2):
            for m in metrics:
                try:
                    v = float(row[m])
                except (TypeError, ValueError):
                    raise ValueError(f"{path}, line {line}: {m} is {row[m]!r}, not a number") from None
                if not math.isfinite(v):
                    raise ValueError(f"{path}, line {line}: {m} is {v}, not finite")
                values.setdefault(row[key], []).append(v)
    if not values:
        raise ValueError(f"{path}: no cases")
    return {case: float(np.mean(v)) for case, v in values.items()}


@dataclass(frozen=True)
class PairedDifference:
    """Mean of A - B over the pooled (seed, case) pairs, its bootstrap interval, per-seed means
    and how many pairs A wins (strictly higher)."""

    mean: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    wins: int
    pairs: int


def paired_difference(
    a: Sequence[dict[str, float]],
    b: Sequence[dict[str, float]],
    resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """A - B per case, seed by seed (``a[i]`` and ``b[i]`` are the same seed), pooled.

    Args:
        a, b: per seed, case -> score (:func:`case_scores`); each pair must cover the same cases.
        resamples: bootstrap resamples of the pooled pairs.
        confidence: width of the percentile interval.
        seed: of the bootstrap generator (the interval is reproducible).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need as many runs of A as of B (>= 1), got {len(a)} and {len(b)}")
    diffs: list[float] = []
    per_seed = []
    for i, (sa, sb) in enumerate(zip(a, b)):
        if set(sa) != set(sb):
            only = sorted(set(sa) ^ set(sb))
            raise ValueError(f"run pair {i}: the runs were tested on different cases ({', '.join(only[:5])} ...)")
        d = [sa[c] - sb[c] for c in sorted(sa)]
        per_seed.append(float(np.mean(d)))
        diffs.extend(d)
    x = np.asarray(diffs)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDifference(float(x.mean()), float(low), float(high), tuple(per_seed), int((x > 0).sum()), len(x))


def main(argv: Sequence[str] | None = None) -> PairedDifference:
    parser = argparse.ArgumentParser(prog="python -m kdseg.metrics.paired", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="+", type=Path, required=True, help="test_cases.csv of method A, one per seed")
    parser.add_argument("--b", nargs="+", type=Path, required=True, help="test_cases.csv of method B, same seeds in the same order")
    parser.add_argument("--metric", nargs="+", required=True, help="column(s) averaged into the per-case score")
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = paired_difference(
        [case_scores(p, args.metric) for p in args.a],
        [case_scores(p, args.metric) for p in args.b],
        resamples=args.resamples, confidence=args.confidence, seed=args.seed,
    )
    print(
        f"A - B on {'+'.join(args.metric)}: mean {result.mean:+.4f}, "
        f"{100 * args.confidence:.0f} % bootstrap interval [{result.low:+.4f}, {result.high:+.4f}] "
        f"over {result.pairs} (seed, case) pairs; per seed "
        + ", ".join(f"{d:+.4f}" for d in result.per_seed)
        + f"; A higher on {result.wins} of {result.pairs}"
    )
    return result


if __name__ == "__main__":
    main()
