"""The results table, one per setting, as ``table.md`` / ``table.csv`` / ``table.tex``: per method
(matrix order) the mean +- sample std (``ddof=1``) over its finished seeds, then the papers'
numbers, and the paired difference to the label-only baseline; ACDC tables add "missed / spurious"
counts. Captions come from the runs' resolved configs. Beside them ``runs.csv`` (one row per run)
and each finished run's result files under ``runs/<setting>/<method>/seed<k>/``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from kdseg.data.datamodule import ACDC_CLASS_NAMES
from kdseg.data.instances import CLASS_NAMES as CELL_CLASS_NAMES
from kdseg.evaluation.metric_ids import KNOWN_METRICS
from kdseg.evaluation.volume import describe_distances
from kdseg.metrics.paired import PairedDifference
from kdseg.results.baseline import between_methods_text, caption_text, compare_to_baseline
from kdseg.results.curves import flattening_text, record_curves
from kdseg.reproduce.execute import RunResult, fit_seconds
from kdseg.reproduce.records import write_record
from kdseg.reproduce.spec import Matrix, PaperNumbers, Profile, ReportedRow, Setting

DASH = "–"
ACDC_NAMES, CELL_NAMES = list(ACDC_CLASS_NAMES.values()), list(CELL_CLASS_NAMES.values())
#: (metric id, header, is a distance) of each task's columns. Per-class ASD beside per-class Dice: a
#: method can gain Dice on the large LV while its RV boundaries stray far; per-class HD95 stays in table.csv.
COLUMNS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "semantic": (*((f"dice_{n}", f"Dice {n}", False) for n in ACDC_NAMES), ("dice_mean", "Dice mean", False),
                 ("hd95_mean", "HD95 mean", True), *((f"asd_{n}", f"ASD {n}", True) for n in ACDC_NAMES),
                 ("asd_mean", "ASD mean", True)),
    "instance": (("aji_mean", "AJI", False), ("map_mean", "mAP", False), ("ap50_mean", "AP50", False),
                 ("f1_mean", "F1@0.5", False), *((f"dice_{n}", f"Dice {n}", False) for n in CELL_NAMES),
                 ("dice_mean", "Dice mean", False)),
}


@dataclass
class Stat:
    mean: float
    std: float | None
    n: int = 1


@dataclass
class Row:
    """One table row: a method measured here, or a paper's reported numbers."""

    setting: str
    method: str
    label: str
    kind: str  # "measured" | "reported"
    stats: dict[str, Stat] = field(default_factory=dict)
    seeds_finished: int = 0
    seeds_failed: int = 0
    seeds_planned: int = 0
    iterations: str = ""
    reported: ReportedRow | None = None
    failures: list[RunResult] = field(default_factory=list)
    misses: dict[str, list[int]] = field(default_factory=dict)  # {class: [missed, spurious]} over seeds

    def misses_cell(self, names: list[str]) -> str:
        if self.kind == "reported" or not self.misses:
            return DASH
        return ", ".join("/".join(str(v) for v in self.misses.get(n, [0, 0])) for n in names)

    @property
    def status(self) -> str:
        if self.kind == "reported":
            return "reported"
        if self.seeds_finished:
            return "partial" if self.seeds_failed else "ok"
        return "FAILED" if self.seeds_failed else "not run"

    def seeds_cell(self) -> str:
        if self.kind == "reported":
            return DASH
        missing = self.seeds_planned - self.seeds_finished - self.seeds_failed
        return (str(self.seeds_finished) + (f" ({self.seeds_failed} FAILED)" if self.seeds_failed else "")
                + (f" ({missing} not run)" if missing else ""))


def aggregate(values: Iterable[float]) -> Stat | None:
    """Mean and sample std (``ddof=1``; None for one value) of the finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return Stat(float(np.mean(finite)), std, len(finite))


def build_rows(setting: Setting, results: list[RunResult], papers: PaperNumbers | None) -> list[Row]:
    """The measured rows of ``setting`` (matrix order) and its reported rows."""
    rows: list[Row] = []
    for method in setting.methods.values():
        mine = _of(results, setting, method.name)
        finished = [r for r in mine if r.has_metrics]
        failures = [r for r in mine if r.status == "failed"]
        row = Row(setting.name, method.name, method.label, "measured", seeds_finished=len(finished),
                  seeds_failed=len(failures), seeds_planned=len(mine), failures=failures)
        for metric in sorted(KNOWN_METRICS[setting.task]):
            if (stat := aggregate(r.metrics.get(metric, math.nan) for r in finished)) is not None:
                row.stats[metric] = stat
        row.iterations = ", ".join(sorted({"+".join(str(i) for i in r.plan.iterations)
                                           for r in mine if r.plan.stages and not r.plan.error}))
        for summary in (r.test_metrics for r in finished) if setting.task == "semantic" else ():
            for name, values in summary.get("per_class", {}).items():
                counts = row.misses.setdefault(name, [0, 0])
                counts[0] += int(values.get("missed", 0))
                counts[1] += int(values.get("spurious", 0))
        rows.append(row)
    return rows + [Row(setting.name, p.method, f"{p.label} (reported in {p.short}, {p.where})", "reported",
                       reported=p, stats={k: Stat(v, None) for k, v in p.metrics.items()})
                   for p in (papers.rows if papers else ()) if p.setting == setting.name]


def _of(results: list[RunResult], setting: Setting, method: str | None = None) -> list[RunResult]:
    """The results of ``setting`` (and ``method``)."""
    return [r for r in results if r.plan.setting.name == setting.name and method in (None, r.plan.method.name)]


def format_stat(stat: Stat | None, distance: bool) -> str:
    """``0.475 ± 0.010`` (distances: 2 decimals), the mean alone for one value, ``–`` for none."""
    if stat is None:
        return DASH
    digits = 2 if distance else 3
    return f"{stat.mean:.{digits}f}" + ("" if stat.std is None else f" ± {stat.std:.{digits}f}")


def _distance_tags(results: list[RunResult], setting: Setting) -> tuple[str | None, str | None]:
    """The distances' units and conventions in the finished runs' ``test_metrics.json`` of a semantic
    setting (``monai`` for runs from before the convention was recorded)."""
    if setting.task != "semantic":
        return None, None
    finished = [r.test_metrics for r in _of(results, setting) if r.has_metrics]
    unit, convention = (", ".join(sorted({str(m.get(key, default)) for m in finished})) or None
                        for key, default in (("distance_unit", "pixel"), ("distance_convention", "monai")))
    return unit, convention


def caption(setting: Setting, results: list[RunResult], profile: Profile, papers: PaperNumbers | None) -> str:
    """The budget, data, checkpoint and statistics of one setting's table, from its runs' configs."""
    runs = [r for r in _of(results, setting) if r.plan.stages]
    finals = [r.plan.final for r in runs if r.plan.final.resolved]

    def values(dotted: str, none: str = "?") -> str:
        found = sorted({none if s.get(dotted) is None else str(s.get(dotted)) for s in finals})
        return ", ".join(found) if found else "?"

    def methods_where(predicate: Any) -> str:
        labels = [r.plan.method.label for r in runs if r.plan.seed == runs[0].plan.seed and predicate(r.plan.final)]
        return ", ".join(dict.fromkeys(labels)) or "none"

    parts = [f"Profile `{profile.name}`: {profile.description}", f"Device: {profile.device}."]
    data = next((r.plan.data for r in runs if r.plan.data is not None), None)
    if data is not None:
        parts.append(f"Data: {data.description}.")
    if setting.label_budget:
        parts.append(f"Label budget: {setting.label_budget}.")
    if setting.task == "semantic":
        parts.append(
            f"Training: {values('data.init_args.image_size')} px slices, encoder "
            f"{values('model.init_args.network.encoder_name')}, batch {values('data.init_args.batch_size')} labeled "
            f"(+ {values('data.init_args.unlabeled_batch_size')} unlabeled where used); iterations per stage in the "
            "'iters' column."
        )
    else:
        unlabeled = lambda s: (s.get("data.init_args.unlabeled_batch_size") or 0) > 0  # noqa: E731
        size = values("data.init_args.image_size", "original")
        parts.append(
            f"Split by CervicalCellDataModule (split_seed {values('data.init_args.split_seed')}): "
            f"validation images (checkpoint selection): {values('data.init_args.num_val_images')}, "
            f"test images: {values('data.init_args.num_test_images')}, "
            f"labeled: {values('data.init_args.num_labeled')}, "
            f"the rest of the annotated images unlabeled; methods training on unlabeled images: "
            f"{methods_where(unlabeled)} (with the extra "
            f"EDF images: {methods_where(lambda s: unlabeled(s) and s.get('data.init_args.use_edf'))}). "
            "Training: " + ("images at their original size" if size == "original"
                            else f"images resized to {size} px (longer side)")
            + f", Mask R-CNN backbone {values('model.init_args.detector.backbone')}, batch "
            f"{values('data.init_args.batch_size')}; iterations in the 'iters' column. Metrics scored "
            + _scored_at_text(size, values('data.init_args.eval_native_size', 'False')) + "."
        )
    parts.append(
        f"Checkpoint: `kdseg test` of the best checkpoint by {values('checkpoint.monitor')} on the validation set "
        "(over every validation of the last stage); multi-stage methods hand each stage's checkpoint to the next."
    )
    if paired := compare_to_baseline(setting, results):
        parts.append(caption_text(paired))
    if between := between_methods_text(setting, results):
        parts.append(between)
    if flattening := flattening_text(setting, results):
        parts.append(flattening)
    parts.append("Values: mean ± sample std (ddof=1) over the finished seeds (number in 'seeds').")
    if setting.task == "semantic":
        unit, convention = _distance_tags(results, setting)
        parts.append(describe_distances(convention, unit) + "; 'missed / spurious' counts these cases per class "
                     "over all test volumes of the finished seeds.")
    if papers is not None and any(r.setting == setting.name for r in papers.rows):
        parts.append("Rows 'reported in' are the papers' own numbers (their budgets, networks and test splits; see "
                     f"{papers.path.name}): a reference, not a like-for-like comparison.")
    elif papers is not None:
        parts.append(f"Papers' numbers: none recorded for this setting in {papers.path.name} "
                     "(see its not_recorded list).")
    return " ".join(parts)


def _scored_at_text(size: str, native: str) -> str:
    """Where instance metrics were scored; runs without ``eval_native_size`` predate it (resized)."""
    if size == "original" or native == "True":
        return "at the images' native size (ISBI 2014: 512 px; predicted masks resized back bilinearly)"
    if native == "False":
        return f"at the resized {size} px, not the native size"
    return f"at native size in some runs, at {size} px in others ({native})"


def _columns(setting: Setting, unit: str | None, convention: str | None = None) -> list[tuple[str, str, bool]]:
    """(metric, header, is a distance) per column; distance headers name convention and unit."""
    tag = ", ".join(v for v in (convention, unit) if v)
    return [(metric, f"{header} ({tag})" if distance and tag else header, distance)
            for metric, header, distance in COLUMNS[setting.task]]


def _grid(setting: Setting, results: list[RunResult], papers: PaperNumbers | None
          ) -> tuple[list[str], list[tuple[Row, list[str], list[str] | str]]]:
    """The metric headers of a setting's table and per row its method / seeds / iters cells and its
    metric cells (or the status of a row with no finished seed), for the markdown and LaTeX writers."""
    cols = _columns(setting, *_distance_tags(results, setting))
    names = ACDC_NAMES if setting.task == "semantic" else []
    paired = compare_to_baseline(setting, results)
    headers = ([h for _, h, _ in cols] + (["missed / spurious: " + ", ".join(names)] if names else [])
               + ([paired.header] if paired else []))
    out: list[tuple[Row, list[str], list[str] | str]] = []
    for row in build_rows(setting, results, papers):
        lead = [row.label, row.seeds_cell(), row.iterations if row.kind == "measured" else DASH]
        if row.kind == "measured" and not row.seeds_finished:
            out.append((row, lead, row.status))
            continue
        cells = [format_stat(row.stats.get(m), d) for m, _, d in cols] + ([row.misses_cell(names)] if names else [])
        cells += [paired.cell(row.method) if row.kind == "measured" else DASH] if paired else []
        out.append((row, lead, cells))
    return headers, out


def markdown(matrix: Matrix, profile: Profile, results: list[RunResult], papers: PaperNumbers | None) -> str:
    """``table.md``: one section per setting, then the failures."""
    lines = [f"# Reproduction table: profile `{profile.name}`", "",
             f"Matrix `{matrix.path.name}`, profile `{profile.path.name}`"
             + (f", papers' numbers `{papers.path.name}`" if papers else "") + ".", ""]
    failures: list[RunResult] = []
    for setting in matrix.settings.values():
        headers, grid = _grid(setting, results, papers)
        lines += [f"## {setting.name}: {setting.title}", "", "| method | seeds | iters | " + " | ".join(headers) + " |",
                  "|" + " --- |" * (3 + len(headers))]
        for row, lead, cells in grid:
            if isinstance(cells, str):
                cells = [cells + (" (see failures)" if row.seeds_failed else "")] + [DASH] * (len(headers) - 1)
            lines.append("| " + " | ".join(lead + cells) + " |")
            failures += row.failures
        lines += ["", caption(setting, results, profile, papers), ""]
    lines += compute_lines(matrix, results)
    if failures:
        lines += ["## Failures", ""]
        for result in failures:
            record = result.failure or {}
            lines.append(f"- **{result.plan.label}** FAILED: {record.get('message', '?')}; "
                         f"stderr `{record.get('stderr')}`"
                         + (f", stdout `{record['stdout']}`" if record.get("stdout") else ""))
            if tail := str(record.get("stderr_tail") or "").strip():
                lines += ["", "  ```", *(f"  {line}" for line in tail.splitlines()), "  ```"]
        lines.append("")
    if papers is not None and papers.not_recorded:
        lines += ["## Papers' numbers not recorded", ""]
        for item in papers.not_recorded:
            lines.append(f"- {item.get('source', '')} {item.get('setting', '')}: {item['what']}: {item['why']}".strip())
        lines.append("")
    return "\n".join(lines)


def compute_lines(matrix: Matrix, results: list[RunResult]) -> list[str]:
    """table.md's "Compute" section: per setting the finished runs and their recorded fit + test time
    (``runs.csv``'s ``run_seconds``, whichever calls ran them), and the total; none before a run finished."""
    out, total, counted = [], 0.0, 0
    for setting in matrix.settings.values():
        seconds = [float(s) for r in _of(results, setting) if (s := _recorded_seconds(r))]
        if seconds:
            each = (f"{min(seconds):,.0f}-{max(seconds):,.0f} s a run" if len(seconds) > 1
                    else f"{seconds[0]:,.0f} s")
            out.append(f"- {setting.name}: {_runs(len(seconds))}, {sum(seconds) / 3600:.1f} run-hours ({each})")
            total, counted = total + sum(seconds), counted + len(seconds)
    if not out:
        return []
    return ["## Compute", "", "Recorded fit + test time of the finished runs (`runs.csv`, `run_seconds`; interrupted "
            "and resumed fits included); runs that shared the machine's cores take longer than alone.", "",
            *out, f"- total: {_runs(counted)}, {total / 3600:.1f} run-hours", ""]


def _runs(count: int) -> str:
    return f"{count} run" + ("" if count == 1 else "s")


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$",
                "–": "--", "`": "", "Δ": r"$\Delta$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)


def latex(matrix: Matrix, profile: Profile, results: list[RunResult], papers: PaperNumbers | None) -> str:
    """``table.tex``: one booktabs table per setting (needs ``\\usepackage{booktabs}``)."""
    out = [f"% Reproduction table, profile {profile.name}; written by python -m kdseg.reproduce. Needs booktabs."]
    for setting in matrix.settings.values():
        headers, grid = _grid(setting, results, papers)
        out += [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{l" + "c" * (2 + len(headers)) + "}",
                r"\toprule", " & ".join(["Method", "Seeds", "Iters", *(tex_escape(h) for h in headers)]) + r" \\",
                r"\midrule"]
        first_reported = next((row for row, _, _ in grid if row.kind == "reported"), None)
        for row, lead, cells in grid:
            if row is first_reported:
                out.append(r"\midrule")
            if isinstance(cells, str):
                cells = [rf"\multicolumn{{{len(headers)}}}{{c}}{{{tex_escape(cells)}}}"]
            else:
                cells = [tex_escape(c) for c in cells]
            out.append(" & ".join([*(tex_escape(c) for c in lead), *cells]) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}",
                rf"\caption{{{tex_escape(setting.title)}. {tex_escape(caption(setting, results, profile, papers))}}}",
                rf"\label{{tab:reproduce-{setting.name.replace('_', '-')}}}", r"\end{table}", ""]
    return "\n".join(out)


def csv_rows(matrix: Matrix, results: list[RunResult],
             papers: PaperNumbers | None) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows of ``table.csv``."""
    settings = matrix.settings.values()
    metrics = list(dict.fromkeys([*(c[0] for s in settings for c in COLUMNS[s.task]),
                                  *(m for s in settings for m in sorted(KNOWN_METRICS[s.task]))]))
    names = ACDC_NAMES if any(s.task == "semantic" for s in settings) else []
    header = ["setting", "task", "method", "label", "kind", "status", "seeds_finished", "seeds_failed", "seeds_planned",
              "iterations", "distance_unit", "distance_convention", "source", "where",
              *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")),
              *(f"{k}_{n}" for n in names for k in ("missed", "spurious")),
              "paired_baseline", "paired_metric", "paired_diff", "paired_low", "paired_high", "paired_pairs"]
    out = []
    for setting in settings:
        unit, convention = (tag or "" for tag in _distance_tags(results, setting))
        paired = compare_to_baseline(setting, results)
        for row in build_rows(setting, results, papers):
            measured = row.kind == "measured"
            line: dict[str, Any] = {
                "setting": row.setting, "task": setting.task, "method": row.method, "label": row.label,
                "kind": row.kind, "status": row.status, "iterations": row.iterations,
                "source": row.reported.citation if row.reported else "",
                "where": row.reported.where if row.reported else "",
                **({"seeds_finished": row.seeds_finished, "seeds_failed": row.seeds_failed,
                    "seeds_planned": row.seeds_planned, "distance_unit": unit, "distance_convention": convention}
                   if measured else {}),
            }
            for metric, stat in row.stats.items():
                line[f"{metric}_mean"] = f"{stat.mean:.6g}"
                line[f"{metric}_std"] = "" if stat.std is None else f"{stat.std:.6g}"
                line[f"{metric}_n"] = stat.n
            for name, (missed, spurious) in row.misses.items():
                if name in names:
                    line[f"missed_{name}"], line[f"spurious_{name}"] = missed, spurious
            if paired and measured:
                line["paired_baseline"], line["paired_metric"] = paired.baseline, paired.metric
                if isinstance(found := paired.differences.get(row.method), PairedDifference):
                    line.update(paired_diff=f"{found.mean:.6g}", paired_low=f"{found.low:.6g}",
                                paired_high=f"{found.high:.6g}", paired_pairs=found.pairs)
            out.append(line)
    return header, out


def write_tables(results_dir: Path, matrix: Matrix, profile: Profile, results: list[RunResult],
                 papers: PaperNumbers | None) -> dict[str, Path]:
    """Writes the tables, ``runs.csv`` and the finished runs' records (``kdseg.reproduce.records``)
    under ``results_dir`` (rewritten on each call: a view of the run folders and records); returns the
    table paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": results_dir / "table.md", "csv": results_dir / "table.csv", "tex": results_dir / "table.tex"}
    paths["md"].write_text(markdown(matrix, profile, results, papers))
    paths["tex"].write_text(latex(matrix, profile, results, papers))
    header, rows = csv_rows(matrix, results, papers)
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    with (results_dir / "runs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        # "seconds": time spent by this call (0 for a run skipped as finished); "run_seconds": the
        # run's own fit + test time as recorded in its stage folders, whichever calls ran it
        # (interrupted and resumed fits included, execute.fit_seconds).
        writer.writerow(["setting", "method", "seed", "status", "seconds", "run_seconds", "keys", "folder",
                         "checkpoint", "failure", "stderr_log"])
        for r in results:
            failure = r.failure or {}
            writer.writerow([
                r.plan.setting.name, r.plan.method.name, r.plan.seed, r.status, f"{r.seconds:.0f}",
                _recorded_seconds(r),
                "+".join(str(s.key) for s in r.plan.stages), _folder_text(r, results_dir), r.result.get("checkpoint", ""),
                failure.get("message", ""), failure.get("stderr", ""),
            ])
    for r in (r for r in results if r.has_metrics and r.folder is not None):  # records: no checkpoints
        seconds = _recorded_seconds(r)
        write_record(results_dir, r, float(seconds) if seconds else None, record_curves(r))
    return paths


def _folder_text(r: RunResult, results_dir: Path) -> str:
    """``runs.csv``'s folder: a restored run's record relative to ``results_dir`` (the same in every
    clone), else the run folder."""
    if r.folder is None:
        return ""
    return str(r.folder.relative_to(results_dir)) if r.status == "restored" and r.folder.is_relative_to(results_dir) \
        else str(r.folder)


def _recorded_seconds(r: RunResult) -> str:
    """Sum of the stages' fit seconds over all their attempts plus the test's, '' while any is missing."""
    if not r.has_metrics or r.folder is None:
        return ""
    if r.status == "restored":
        return "" if r.run_seconds is None else f"{r.run_seconds:.0f}"
    total = float(r.result.get("test_seconds", math.nan))
    for stage in r.plan.stages:
        seconds = fit_seconds(r.folder.parent / stage.folder_name)
        if seconds is None:
            return ""
        total += seconds
    return "" if math.isnan(total) else f"{total:.0f}"
