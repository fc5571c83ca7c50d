"""``experiments/reproduce/paper_numbers.yaml``: every recorded number names its paper and table and
lies in its metric's range, every setting of the matrix is either covered or listed as not
recorded, and reported rows render in the tables as "X (reported in <paper>, <table>)"."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from kdseg.reproduce.spec import PaperNumbers, load_matrix, load_paper_numbers, load_profile, profile_path
from kdseg.results.tables import csv_rows, latex, markdown

MATRIX = REPO / "experiments" / "reproduce" / "matrix.yaml"
PAPERS = REPO / "experiments" / "reproduce" / "paper_numbers.yaml"
#: The settings the brief asks the papers' numbers for (issue 13, section 5).
SETTINGS = ("acdc_semi_3", "acdc_semi_7", "acdc_scribble", "cervical")


def out_of_range(metric: str, value: float) -> bool:
    """Dice, AJI, F1, mAP and AP are fractions in [0, 1] (a paper's 87.5 % is 0.875); HD95 and ASD
    are distances, >= 0 and, in any unit these papers use on these images, below 1000."""
    if metric.startswith(("hd95_", "asd_")):
        return not 0.0 <= value < 1000.0
    return not 0.0 <= value <= 1.0


def problems(papers: PaperNumbers, settings: set[str]) -> list[str]:
    """Every way ``papers`` breaks the recording rule of the file's header; empty when it keeps it."""
    found = []
    for sid, source in papers.sources.items():
        for key in ("short", "read_at"):
            if not source.get(key, "").strip():
                found.append(f"sources.{sid}: no {key}")
    for row in papers.rows:
        name = f"{row.setting}/{row.label}"
        if "table" not in row.where.lower():
            found.append(f"{name}: where {row.where!r} names no table")
        if not row.note.strip():
            found.append(f"{name}: no note (unit of the distances, test split)")
        found += [f"{name}: {k} = {v} out of range" for k, v in row.metrics.items() if out_of_range(k, v)]
    for item in papers.not_recorded:
        if item.get("source") not in papers.sources:
            found.append(f"not_recorded: unknown source {item.get('source')!r}")
        if item.get("setting") not in settings:
            found.append(f"not_recorded: unknown setting {item.get('setting')!r}")
    return found


def test_committed_paper_numbers_keep_the_recording_rule() -> None:
    matrix = load_matrix(MATRIX)
    papers = load_paper_numbers(PAPERS, matrix)
    assert problems(papers, set(matrix.settings)) == []
    covered = {row.setting for row in papers.rows} | {item["setting"] for item in papers.not_recorded}
    assert set(SETTINGS) <= covered, "each setting needs reported rows or a not_recorded entry saying why not"


def write_papers(path: Path, rows: dict[str, list[dict]]) -> Path:
    path.write_text(yaml.safe_dump({
        "sources": {"p": {"citation": "A. Author. A paper. 2023.", "short": "Author 2023", "read_at": "its pdf"}},
        "reported": rows,
    }))
    return path


def test_the_rule_catches_percent_dice_and_a_missing_table(tmp_path: Path) -> None:
    matrix = load_matrix(MATRIX)
    papers = load_paper_numbers(write_papers(tmp_path / "bad.yaml", {"acdc_semi_3": [
        {"method": "action", "label": "ACTION", "source": "p", "where": "Sec. 4", "metrics": {"dice_mean": 87.5},
         "note": "HD95 in voxels"},
    ]}), matrix)
    assert problems(papers, set(matrix.settings)) == [
        "acdc_semi_3/ACTION: where 'Sec. 4' names no table",
        "acdc_semi_3/ACTION: dice_mean = 87.5 out of range",
    ]


@pytest.mark.parametrize("setting, metrics", [
    ("acdc_semi_3", {"dice_mean": 0.875, "asd_mean": 1.25}),
    ("acdc_semi_7", {"dice_RV": 0.812, "dice_mean": 0.901}),
    ("acdc_scribble", {"dice_mean": 0.866, "hd95_mean": 4.75}),
    ("cervical", {"aji_mean": 0.704, "map_mean": 0.483}),
])
def test_reported_rows_render_as_their_own_rows(tmp_path: Path, setting: str, metrics: dict[str, float]) -> None:
    matrix = load_matrix(MATRIX)
    profile = load_profile(profile_path("smoke", REPO / "experiments/reproduce/profiles"), matrix)
    method = next(iter(matrix.settings[setting].methods))
    papers = load_paper_numbers(write_papers(tmp_path / "p.yaml", {setting: [
        {"method": method, "label": "X", "source": "p", "where": "Table 2, row X", "metrics": metrics,
         "note": "distances in mm"},
    ]}), matrix)
    assert problems(papers, set(matrix.settings)) == []
    md = markdown(matrix, profile, [], papers)
    section = md.split(f"## {setting}:")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| X (reported in Author 2023, Table 2, row X) |"))
    for value in metrics.values():
        assert (f"{value:.3f}" if value < 1 else f"{value:.2f}") in row
    assert "reported in Author 2023" not in md.replace(section, "")  # only under its own setting
    assert "X (reported in Author 2023, Table 2, row X)" in latex(matrix, profile, [], papers)
    _, records = csv_rows(matrix, [], papers)
    reported = [r for r in records if r["setting"] == setting and r["where"] == "Table 2, row X"]
    assert len(reported) == 1 and reported[0]["source"] == "A. Author. A paper. 2023."
