"""Paired per-case comparison (kdseg.metrics.paired) on hand-made test_cases.csv files."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdseg.metrics.paired import case_scores, main, paired_difference

HEADER = "image_id,class,num_gt,aji\n"


def write(path: Path, rows: list[tuple[str, str, float]]) -> Path:
    path.write_text(HEADER + "".join(f"{i},{c},1,{v}\n" for i, c, v in rows))
    return path


def test_case_score_is_the_mean_over_the_case_rows(tmp_path: Path) -> None:
    f = write(tmp_path / "a.csv", [("img1", "cytoplasm", 0.6), ("img1", "nucleus", 0.8), ("img2", "cytoplasm", 0.5), ("img2", "nucleus", 0.7)])
    assert case_scores(f, ["aji"]) == pytest.approx({"img1": 0.7, "img2": 0.6})


def test_acdc_format_averages_the_listed_columns(tmp_path: Path) -> None:
    f = tmp_path / "acdc.csv"
    f.write_text("case_id,dice_RV,dice_LV,status_RV\np1,0.5,0.9,ok\np2,0.2,0.6,ok\n")
    assert case_scores(f, ["dice_RV", "dice_LV"]) == pytest.approx({"p1": 0.7, "p2": 0.4})


def test_difference_by_hand(tmp_path: Path) -> None:
    # seed 0, A - B per case: img1 +0.1, img2 +0.3 -> mean 0.2
    # seed 1: img1 -0.2, img2 0.0 -> mean -0.1; pooled (0.1, 0.3, -0.2, 0.0) -> 0.05, A higher on 2
    a = [{"img1": 0.7, "img2": 0.8}, {"img1": 0.5, "img2": 0.6}]
    b = [{"img1": 0.6, "img2": 0.5}, {"img1": 0.7, "img2": 0.6}]
    r = paired_difference(a, b, resamples=2000)
    assert r.mean == pytest.approx(0.05)
    assert r.per_seed == pytest.approx((0.2, -0.1))
    assert (r.wins, r.pairs) == (2, 4)
    assert -0.2 <= r.low < r.mean < r.high <= 0.3  # resampled means lie within the pairs' range
    assert paired_difference(a, b, resamples=2000) == r  # the bootstrap is seeded


def test_identical_runs_give_zero_and_a_zero_width_interval() -> None:
    a = [{"x": 0.4, "y": 0.9}]
    r = paired_difference(a, a, resamples=100)
    assert (r.mean, r.low, r.high, r.wins) == (0.0, 0.0, 0.0, 0)


def test_bad_input_names_the_file_or_pair(tmp_path: Path) -> None:
    good = write(tmp_path / "good.csv", [("img1", "nucleus", 0.5)])
    with pytest.raises(ValueError, match="good.csv: no column dice"):
        case_scores(good, ["dice"])
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "img1,nucleus,1,oops\n")
    with pytest.raises(ValueError, match="bad.csv, line 2: aji is 'oops'"):
        case_scores(bad, ["aji"])
    with pytest.raises(ValueError, match="different cases.*img2"):
        paired_difference([{"img1": 1.0}], [{"img2": 1.0}])
    with pytest.raises(ValueError, match="as many runs"):
        paired_difference([{"img1": 1.0}], [])


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path / "a.csv", [("img1", "c", 0.9), ("img2", "c", 0.5)])
    b = write(tmp_path / "b.csv", [("img1", "c", 0.7), ("img2", "c", 0.6)])
    r = main(["--a", str(a), "--b", str(b), "--metric", "aji", "--resamples", "500"])
    assert r.mean == pytest.approx(0.05)
    assert "mean +0.0500" in capsys.readouterr().out
