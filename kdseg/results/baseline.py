"""The paired column of the tables: per test case, a method's score minus that of its label-only
baseline (``supervised``, or ``pce`` for scribbles) on the same case, pooled over the seeds both
finished, mean and seeded percentile bootstrap interval (:mod:`kdseg.metrics.paired`): two or three
seeds' means cannot say whether a 0.01 gain is real. The captions give the same statistics between
the other methods. The score is the mean Dice (RV, Myo, LV) of an ACDC volume, or the AJI of an ISBI
2014 image averaged over cytoplasm and nucleus (``aji_mean``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdseg.metrics.paired import PairedDifference, case_scores, paired_difference
from kdseg.reproduce.execute import RunResult
from kdseg.reproduce.spec import Setting

#: The label-only baseline of a setting: the first of these that is one of its methods.
LABEL_ONLY_BASELINES = ("supervised", "pce")
#: Per task: (score's name, the ``test_cases.csv`` columns averaged per case, the metric id it equals,
#: what a case is). Instance files have one row per image and class, so "aji" averages the classes.
SCORES: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "semantic": ("mean Dice", ("dice_RV", "dice_Myo", "dice_LV"), "dice_mean",
                 "mean Dice (RV, Myo, LV) of each test volume"),
    "instance": ("AJI", ("aji",), "aji_mean", "AJI (mean over cytoplasm and nucleus) of each test image"),
}
CONFIDENCE = 0.95
RESAMPLES = 10000


@dataclass(frozen=True)
class BaselineComparison:
    """A setting's baseline and, per other method, its paired difference or why none."""

    baseline: str
    baseline_label: str
    task: str = "semantic"
    differences: dict[str, PairedDifference | str] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """The metric id the per-case score averages to (``dice_mean``, ``aji_mean``)."""
        return SCORES[self.task][2]

    @property
    def header(self) -> str:
        return f"Δ {SCORES[self.task][0]} vs {self.baseline} [{100 * CONFIDENCE:.0f}% CI]"

    def cell(self, method: str) -> str:
        """``+0.012 [-0.004, +0.028]``; ``baseline`` for the baseline; ``–`` where there is none."""
        if method == self.baseline:
            return "baseline"
        found = self.differences.get(method)
        if not isinstance(found, PairedDifference):
            return "–"
        return format_interval(found.mean, found.low, found.high)


def format_interval(mean: float, low: float, high: float) -> str:
    """``+0.012 [-0.004, +0.028]``: a paired difference and its interval, as the tables show it."""
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def _cases_by_seed(setting: Setting, method: str, results: list[RunResult]) -> dict[int, Path]:
    return {r.plan.seed: r.folder / "test_cases.csv" for r in results
            if r.plan.setting.name == setting.name and r.plan.method.name == method and r.has_metrics and r.folder
            and (r.folder / "test_cases.csv").is_file()}


def compare_to_baseline(setting: Setting, results: list[RunResult], seed: int = 0) -> BaselineComparison | None:
    """The paired comparison of ``setting`` with its baseline, else None. A method with no seed finished
    with the baseline's is left out; one that cannot be paired gets the reason."""
    baseline = next((name for name in LABEL_ONLY_BASELINES if name in setting.methods), None)
    if setting.task not in SCORES or baseline is None:
        return None
    comparison = BaselineComparison(baseline, setting.methods[baseline].label, setting.task)
    for method in setting.methods:
        if method != baseline and (found := compare(setting, results, method, baseline, seed)) is not None:
            comparison.differences[method] = found
    return comparison


def compare(setting: Setting, results: list[RunResult], a: str, b: str,
            seed: int = 0) -> PairedDifference | str | None:
    """Method ``a`` minus method ``b`` per test case over the seeds both finished; None when they share
    no finished seed (not run yet), the reason when they cannot be paired."""
    mine, theirs = _cases_by_seed(setting, a, results), _cases_by_seed(setting, b, results)
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    columns = SCORES[setting.task][1]
    try:
        return paired_difference([case_scores(mine[s], columns) for s in seeds],
                                 [case_scores(theirs[s], columns) for s in seeds],
                                 resamples=RESAMPLES, confidence=CONFIDENCE, seed=seed)
    except ValueError as error:
        return str(error)


def between_methods_text(setting: Setting, results: list[RunResult], seed: int = 0) -> str | None:
    """The caption's sentence on the paired differences between the methods other than the baseline,
    each later method (in matrix order: the papers' methods come last) minus each earlier one."""
    if setting.task not in SCORES:
        return None
    others = [m for m in setting.methods if m not in LABEL_ONLY_BASELINES]
    found = [(a, b, d) for i, a in enumerate(others) for b in others[:i]
             if isinstance(d := compare(setting, results, a, b, seed), PairedDifference)]
    if not found:
        return None
    label = {name: method.label for name, method in setting.methods.items()}
    return (f"Paired differences between the other methods (A - B, {SCORES[setting.task][0]} per case, same "
            "statistics): " + "; ".join(f"{label[a]} - {label[b]} {format_interval(d.mean, d.low, d.high)} "
                                        f"({d.pairs} pairs)" for a, b, d in found) + ".")


def caption_text(comparison: BaselineComparison) -> str:
    """What the column means, for the table caption."""
    text = (
        f"'{comparison.header}': the method's {SCORES[comparison.task][3]} minus "
        f"that of {comparison.baseline} ({comparison.baseline_label}) on the same case, pooled over the seeds "
        "both finished, with a "
        f"{100 * CONFIDENCE:.0f}% percentile bootstrap interval over the (seed, case) pairs ({RESAMPLES} "
        "resamples, kdseg.metrics.paired)."
    )
    for method, found in comparison.differences.items():
        if isinstance(found, str):
            text += f" No interval for {method}: {found}."
    return text
