"""The README's summary of a results table, generated from its ``table.csv`` so the two cannot drift:
how many of the planned runs finished, then per setting and method the seeds, Dice mean and ASD mean
(ACDC) or AJI, mAP and F1@0.5 (ISBI 2014), and the paired difference (mean Dice or AJI) to the
label-only baseline where the table has it. The block sits between two marker lines in the README;
``--check`` fails when it differs from what the table gives.

    python -m kdseg.results.readme experiments/results/cpu/table.csv README.md [--check]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from kdseg.results.baseline import format_interval
from kdseg.results.tables import DASH, Stat, format_stat

BEGIN = ("<!-- results-rows: generated from {table} by `python -m kdseg.results.readme`; "
         "edit the table, not these rows -->")
START = "<!-- results-rows:"  # how BEGIN starts: finds a block whatever table it names
END = "<!-- /results-rows -->"
#: (metric id, header, is a distance) of the two summary layouts.
SEMANTIC = (("dice_mean", "Dice mean", False), ("asd_mean", "ASD mean ({unit})", True))
INSTANCE = (("aji_mean", "AJI", False), ("map_mean", "mAP", False), ("f1_mean", "F1@0.5", False))


def cell(row: dict[str, str], metric: str, distance: bool) -> str:
    """table.md's cell of ``metric`` from a ``table.csv`` row: ``0.475 ± 0.010``, ``0.414`` for one
    seed, ``–`` if absent."""
    mean, std = row.get(f"{metric}_mean", ""), row.get(f"{metric}_std", "")
    return format_stat(Stat(float(mean), float(std) if std else None) if mean else None, distance)


def paired_cell(row: dict[str, str]) -> str:
    """``+0.054 [+0.014, +0.095]`` as in table.md; ``baseline`` for the baseline itself."""
    if row.get("method") and row.get("method") == row.get("paired_baseline"):
        return "baseline"
    if not row.get("paired_diff"):
        return DASH
    return format_interval(*(float(row[k]) for k in ("paired_diff", "paired_low", "paired_high")))


def summary(rows: list[dict[str, str]]) -> str:
    """Markdown tables (one for the semantic settings, one for the instance ones) of ``rows``, the
    dicts of a ``table.csv``, in their order."""
    # table.csv names each setting's task; tables written before that column are told apart by AJI
    instance = [r for r in rows if r.get("task", "instance" if r.get("aji_mean_mean") else "") == "instance"]
    semantic = [r for r in rows if r not in instance]
    out: list[str] = [progress, ""] if (progress := progress_line(rows)) else []
    if semantic:
        unit = next((r["distance_unit"] for r in semantic if r.get("distance_unit")), "") or "px"
        unit = "px" if unit == "pixel" else unit
        out += _layout(semantic, [(m, h.format(unit=unit), d) for m, h, d in SEMANTIC], "mean Dice")
    if instance:
        out += [""] if semantic else []
        out += _layout(instance, list(INSTANCE), "AJI")
    return "\n".join(out)


def seeds_cell(row: dict[str, str]) -> str:
    """Finished seeds, ``1 of 3`` while some planned ones have not finished."""
    finished, planned = row.get("seeds_finished") or "", row.get("seeds_planned") or ""
    if not finished:
        return DASH
    return f"{finished} of {planned}" if planned and int(planned) > int(finished) else finished


def progress_line(rows: list[dict[str, str]]) -> str | None:
    """``Runs finished: 28 of 39 planned.`` over the measured rows; None for a table without counts."""
    measured = [r for r in rows if r.get("kind", "measured") == "measured" and r.get("seeds_planned")]
    if not measured:
        return None
    finished = sum(int(r.get("seeds_finished") or 0) for r in measured)
    return f"Runs finished: {finished} of {sum(int(r['seeds_planned']) for r in measured)} planned."


def _layout(rows: list[dict[str, str]], columns: list[tuple[str, str, bool]], score: str) -> list[str]:
    """One summary table; the Δ column only where the table has the paired columns."""
    paired = any(r.get("paired_baseline") for r in rows)
    headers = ["setting", "method", "seeds", *(h for _, h, _ in columns)]
    headers += [f"Δ {score} vs baseline [95% CI]"] if paired else []
    return _table(headers, [[r["setting"], r["label"], seeds_cell(r),
                             *(cell(r, m, d) for m, _, d in columns),
                             *([paired_cell(r)] if paired else [])] for r in rows])


def _table(headers: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers),
            *("| " + " | ".join(line) + " |" for line in body)]


def read_rows(table_csv: Path) -> list[dict[str, str]]:
    with table_csv.open(newline="") as f:
        return list(csv.DictReader(f))


def block(table_csv: Path, shown_as: str) -> str:
    """The README block for ``table_csv``, markers included; ``shown_as`` names the table in the marker."""
    return "\n".join([BEGIN.format(table=shown_as), summary(read_rows(table_csv)), END])


def replace_block(text: str, new_block: str) -> str:
    """``text`` with its one marked block replaced by ``new_block``."""
    start, end = text.find(START), text.find(END)
    if text.count(START) != 1 or text.count(END) != 1 or end < start:
        raise ValueError(f"expected one block between a line starting '{START}' and '{END}'")
    return text[:start] + new_block + text[end + len(END):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdseg.results.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("table", type=Path, help="table.csv of a results folder")
    parser.add_argument("readme", type=Path, help="the markdown file holding the marked block")
    parser.add_argument("--check", action="store_true", help="exit 1 if the block differs; write nothing")
    args = parser.parse_args(argv)
    for path in (args.table, args.readme):
        if not path.is_file():
            print(f"kdseg: error: {path}: no such file", file=sys.stderr)
            return 2
    text = args.readme.read_text()
    try:
        shown_as = args.table.relative_to(Path.cwd()).as_posix() if args.table.is_absolute() else args.table.as_posix()
    except ValueError:
        shown_as = args.table.as_posix()
    try:
        updated = replace_block(text, block(args.table, shown_as))
    except ValueError as error:
        print(f"kdseg: error: {args.readme}: {error}", file=sys.stderr)
        return 2
    if args.check:
        if updated != text:
            print(f"kdseg: error: {args.readme}: its results rows differ from {args.table}; rerun without --check",
                  file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
