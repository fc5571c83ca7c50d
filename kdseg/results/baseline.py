"""The paired column of the ACDC tables: per test volume, a method's mean Dice (RV, Myo, LV) minus
that of its label-only baseline (``supervised``, or ``pce`` for scribbles), pooled over the seeds
both finished, mean and seeded percentile bootstrap interval (:mod:`kdseg.metrics.paired`): two
seeds' means cannot say whether a 0.01 gain is real. ISBI 2014's paired AJI: ``python -m
kdseg.metrics.paired --metric aji``.
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
    """A setting's baseline and, per other method, its paired difference or why none."""

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


def _cases_by_seed(setting: Setting, method: str, results: list[RunResult]) -> dict[int, Path]:
    return {r.plan.seed: r.folder / "test_cases.csv" for r in results
            if r.plan.setting.name == setting.name and r.plan.method.name == method and r.has_metrics and r.folder
            and (r.folder / "test_cases.csv").is_file()}


def compare_to_baseline(setting: Setting, results: list[RunResult], seed: int = 0) -> BaselineComparison | None:
    """The paired comparison of a semantic ``setting`` with a baseline, else None. A method with no seed
    finished with the baseline's is left out; one that cannot be paired gets the reason."""
    baseline = next((name for name in LABEL_ONLY_BASELINES if name in setting.methods), None)
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
