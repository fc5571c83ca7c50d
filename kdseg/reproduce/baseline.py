"""The paired column of the ACDC tables: each method against its label-only baseline.

Two seeds' mean Dice cannot say whether a 0.01 gain is real; this compares a method with the
baseline that uses the same labels and nothing else (``supervised`` in the semi-supervised
settings, ``pce`` in the scribble setting) test volume by test volume. Per seed, the volume's mean
Dice over RV, Myo and LV of the method minus that of the baseline on the same volume; the pairs of
all seeds both finished are pooled, and :func:`kdseg.metrics.paired.paired_difference` gives the
mean and its percentile bootstrap interval (resampling the (seed, volume) pairs, seeded, so the
table is reproducible). Only semantic (ACDC) settings get the column; ISBI 2014's paired AJI is in
the README (``python -m kdseg.metrics.paired --metric aji``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdseg.metrics.paired import PairedDifference, case_scores, paired_difference
from kdseg.reproduce.execute import RunResult
from kdseg.reproduce.spec import Setting

#: The label-only baseline of a setting: the first of these that is one of its methods.
LABEL_ONLY_BASELINES = ("supervised", "pce")
#: The per-volume score: mean Dice of the foreground classes (columns of ``test_cases.csv``).
DICE_COLUMNS = ("dice_RV", "dice_Myo", "dice_LV")
CONFIDENCE = 0.95
RESAMPLES = 10000


@dataclass(frozen=True)
class BaselineComparison:
    """The baseline of one setting and, per other method, its paired difference or why none."""

    baseline: str
    baseline_label: str
    differences: dict[str, PairedDifference | str] = field(default_factory=dict)

    @property
    def header(self) -> str:
        return f"Δ mean Dice vs {self.baseline} [{100 * CONFIDENCE:.0f}% CI]"

    def cell(self, method: str) -> str:
        """``+0.012 [-0.004, +0.028]``; ``baseline`` for the baseline; ``–`` where there is none."""
        if method == self.baseline:
            return "baseline"
        found = self.differences.get(method)
        if not isinstance(found, PairedDifference):
            return "–"
        return f"{found.mean:+.3f} [{found.low:+.3f}, {found.high:+.3f}]"


def label_only_baseline(setting: Setting) -> str | None:
    """The method of ``setting`` that trains on the labels alone (None: the setting has none)."""
    return next((name for name in LABEL_ONLY_BASELINES if name in setting.methods), None)


def _cases_by_seed(setting: Setting, method: str, results: list[RunResult]) -> dict[int, Path]:
    found = {}
    for r in results:
        if r.plan.setting.name == setting.name and r.plan.method.name == method and r.has_metrics and r.folder:
            if (r.folder / "test_cases.csv").is_file():
                found[r.plan.seed] = r.folder / "test_cases.csv"
    return found


def compare_to_baseline(setting: Setting, results: list[RunResult], seed: int = 0) -> BaselineComparison | None:
    """The paired comparison of ``setting`` (None for instance settings or without a baseline).

    A method none of whose seeds finished together with the baseline's is left out; one whose
    ``test_cases.csv`` cannot be paired with the baseline's (other volumes, a missing or
    non-finite Dice) gets the reason instead of a difference.
    """
    baseline = label_only_baseline(setting)
    if setting.task != "semantic" or baseline is None:
        return None
    comparison = BaselineComparison(baseline, setting.methods[baseline].label)
    base = _cases_by_seed(setting, baseline, results)
    for method in setting.methods:
        if method == baseline:
            continue
        mine = _cases_by_seed(setting, method, results)
        seeds = sorted(set(mine) & set(base))
        if not seeds:  # not run (yet): the cell says "–", nothing to explain
            continue
        try:
            comparison.differences[method] = paired_difference(
                [case_scores(mine[s], DICE_COLUMNS) for s in seeds],
                [case_scores(base[s], DICE_COLUMNS) for s in seeds],
                resamples=RESAMPLES, confidence=CONFIDENCE, seed=seed,
            )
        except ValueError as error:
            comparison.differences[method] = str(error)
    return comparison


def caption_text(comparison: BaselineComparison) -> str:
    """What the column means, for the table caption."""
    text = (
        f"'{comparison.header}': the method's mean Dice (RV, Myo, LV) of each test volume minus "
        f"that of {comparison.baseline} ({comparison.baseline_label}) on the same volume, pooled over the seeds "
        "both finished, with a "
        f"{100 * CONFIDENCE:.0f}% percentile bootstrap interval over the (seed, volume) pairs ({RESAMPLES} "
        "resamples, kdseg.metrics.paired)."
    )
    for method, found in comparison.differences.items():
        if isinstance(found, str):
            text += f" No interval for {method}: {found}."
    return text
