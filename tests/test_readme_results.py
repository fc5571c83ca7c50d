"""The README's results rows are generated from the committed table (``kdseg.results.readme``), and
every interval its results section quotes is stated in the committed cpu table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

from kdseg.results.readme import END, block, main, paired_cell, replace_block, summary

TABLE = REPO / "experiments" / "results" / "cpu" / "table.csv"
README = REPO / "README.md"
INTERVAL = re.compile(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]")


def _results_section() -> str:
    return README.read_text().split("\n## Results\n", 1)[1].split("\n## ", 1)[0]


def test_readme_rows_are_those_of_the_committed_table() -> None:
    text = README.read_text()
    assert replace_block(text, block(TABLE, "experiments/results/cpu/table.csv")) == text, (
        "README results rows differ from experiments/results/cpu/table.csv: run "
        "`python -m kdseg.results.readme experiments/results/cpu/table.csv README.md`")


def test_every_interval_in_the_results_section_is_in_the_committed_table() -> None:
    section = _results_section()
    # the cpu table only: not the history folders beside it, whose rows predate the final code
    committed = "\n".join(p.read_text() for p in sorted(TABLE.parent.glob("*.md")))
    committed += summary_of_table()
    quoted = INTERVAL.findall(section)
    assert quoted, "the results section quotes no interval: this test would check nothing"
    missing = [q for q in quoted if q not in committed]
    assert not missing, f"intervals in README's results section found nowhere in experiments/results/cpu/*.md: {missing}"


def summary_of_table() -> str:
    from kdseg.results.readme import read_rows

    return summary(read_rows(TABLE))


def _row(**values: str) -> dict[str, str]:
    return {"setting": "s", "task": "semantic", "method": "m", "label": "M", "seeds_finished": "1", **values}


def test_summary_cells_by_hand() -> None:
    rows = [
        _row(method="pce", label="pCE", seeds_finished="3", dice_mean_mean="0.47351", dice_mean_std="0.0281",
             asd_mean_mean="47.114", asd_mean_std="8.466", distance_unit="pixel", paired_baseline="pce"),
        _row(method="em", label="pCE + EM", dice_mean_mean="0.6", asd_mean_mean="21.0", paired_baseline="pce",
             paired_diff="0.1726", paired_low="0.15449", paired_high="0.19"),
        _row(setting="c", task="instance", label="MMT-PSM", seeds_finished="2", aji_mean_mean="0.712",
             aji_mean_std="0.018", map_mean_mean="0.476", map_mean_std="0.0131", paired_baseline="sup",
             paired_diff="0.0131", paired_low="-0.0061", paired_high="0.0304"),
    ]
    semantic, instance = summary(rows).split("\n\n")  # no planned counts: no progress line
    assert semantic.splitlines()[0] == ("| setting | method | seeds | Dice mean | ASD mean (px) "
                                        "| Δ mean Dice vs baseline [95% CI] |")
    assert "| s | pCE | 3 | 0.474 ± 0.028 | 47.11 ± 8.47 | baseline |" in semantic
    assert "| s | pCE + EM | 1 | 0.600 | 21.00 | +0.173 [+0.154, +0.190] |" in semantic
    assert instance.splitlines()[0] == "| setting | method | seeds | AJI | mAP | F1@0.5 | Δ AJI vs baseline [95% CI] |"
    assert instance.splitlines()[2] == "| c | MMT-PSM | 2 | 0.712 ± 0.018 | 0.476 ± 0.013 | – | +0.013 [-0.006, +0.030] |"
    # A table written before the paired columns: no Δ column; before the task column: AJI tells.
    old = summary([{k: v for k, v in r.items() if k != "task" and not k.startswith("paired")} for r in rows])
    assert "Δ" not in old and "| c | MMT-PSM | 2 | 0.712 ± 0.018 | 0.476 ± 0.013 | – |" in old.split("\n\n")[1]
    assert paired_cell(_row(paired_baseline="pce")) == "–"  # another method with no interval


def test_partial_table_says_how_many_runs_finished() -> None:
    rows = [_row(label="A", seeds_finished="3", seeds_planned="3", dice_mean_mean="0.5"),
            _row(label="B", seeds_finished="1", seeds_planned="3", dice_mean_mean="0.6"),
            _row(label="C", seeds_finished="0", seeds_planned="3"),
            _row(label="C (reported in P, Table 1)", kind="reported", seeds_finished="", seeds_planned="",
                 dice_mean_mean="0.8")]
    progress, table = summary(rows).split("\n\n")
    assert progress == "Runs finished: 4 of 9 planned."
    assert "| s | A | 3 | 0.500 | – |" in table and "| s | B | 1 of 3 | 0.600 | – |" in table
    assert "| s | C | 0 of 3 | – | – |" in table and "| s | C (reported in P, Table 1) | – | 0.800 | – |" in table


def test_block_errors_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "table.csv"
    table.write_text("setting,task,method,label,seeds_finished,dice_mean_mean,dice_mean_std\n"
                     "s,semantic,m,M,1,0.5,\n")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nno markers\n")
    assert main([str(table), str(readme)]) == 2
    assert capsys.readouterr().err.startswith(f"kdseg: error: {readme}: expected one block")
    assert readme.read_text() == "# x\n\nno markers\n"  # nothing written
    readme.write_text("before\n<!-- results-rows: old -->\nstale\n" + END + "\nafter\n")
    assert main([str(table), str(readme), "--check"]) == 1
    assert "stale" in readme.read_text()  # --check writes nothing
    assert main([str(table), str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("before\n<!-- results-rows: generated from ") and text.endswith(END + "\nafter\n")
    assert "| s | M | 1 | 0.500 | – |" in text and "stale" not in text
    assert main([str(table), str(readme), "--check"]) == 0
    assert main([str(tmp_path / "missing.csv"), str(readme)]) == 2
    assert "missing.csv: no such file" in capsys.readouterr().err
