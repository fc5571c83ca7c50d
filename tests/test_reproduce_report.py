"""The reproduction's report: the ACDC protocol's tables with the paired difference to the
label-only baseline, the instance table's AJI difference, run times and the protocol caption."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import MATRIX, REPO

from kdseg.reproduce.spec import load_matrix, load_profile, profile_path


def _fake_finished_run(setting, method: str, seed: int, folder: Path, dice_by_case: dict[str, float]):
    """A finished run whose test_cases.csv gives each case the same Dice for RV, Myo and LV."""
    from kdseg.reproduce.execute import RunResult
    from kdseg.reproduce.plan import RunPlan

    folder.mkdir(parents=True)
    lines = ["case_id,dice_RV,hd95_RV,asd_RV,status_RV,dice_Myo,hd95_Myo,asd_Myo,status_Myo,dice_LV,hd95_LV,asd_LV,status_LV"]
    lines += [f"{case},{d},1,1,ok,{d},1,1,ok,{d},1,1,ok" for case, d in dice_by_case.items()]
    (folder / "test_cases.csv").write_text("\n".join(lines) + "\n")
    mean = sum(dice_by_case.values()) / len(dice_by_case)
    plan = RunPlan(setting, setting.methods[method], seed, None, [], True)
    return RunResult(plan, "finished", folder=folder, metrics={"dice_mean": mean})


def test_acdc_table_has_the_paired_difference_to_the_label_only_baseline(tmp_path: Path) -> None:
    from kdseg.results.tables import csv_rows, latex, markdown

    matrix = load_matrix(MATRIX)
    profile = load_profile(profile_path("smoke", REPO / "experiments/reproduce/profiles"), matrix)
    semi, scribble = matrix.settings["acdc_semi_3"], matrix.settings["acdc_scribble"]
    cases = ("p1_frame01", "p1_frame12")
    results = [
        # Mean Teacher beats Supervised by exactly 0.1 on every (seed, volume): mean and interval +0.100.
        _fake_finished_run(semi, "supervised", 0, tmp_path / "s0", dict(zip(cases, (0.5, 0.6)))),
        _fake_finished_run(semi, "supervised", 1, tmp_path / "s1", dict(zip(cases, (0.4, 0.7)))),
        _fake_finished_run(semi, "mean_teacher", 0, tmp_path / "m0", dict(zip(cases, (0.6, 0.7)))),
        _fake_finished_run(semi, "mean_teacher", 1, tmp_path / "m1", dict(zip(cases, (0.5, 0.8)))),
        # ACTION, seed 0 only: differences +0.2 and 0.0, paired with Supervised's seed 0.
        _fake_finished_run(semi, "action", 0, tmp_path / "a0", dict(zip(cases, (0.7, 0.6)))),
        # Scribble setting: pce is the baseline; dmpls was tested on another volume (cannot pair).
        _fake_finished_run(scribble, "pce", 0, tmp_path / "c0", dict(zip(cases, (0.5, 0.5)))),
        _fake_finished_run(scribble, "dmpls", 0, tmp_path / "d0", {"p9_frame01": 0.5}),
    ]
    md = markdown(matrix, profile, results, None)
    semi_md = md.split("## acdc_semi_3", 1)[1].split("## ", 1)[0]
    assert "| Δ mean Dice vs supervised [95% CI] |" in semi_md
    rows = {line.split(" | ")[0].lstrip("| "): line for line in semi_md.splitlines() if line.startswith("| ")}
    assert rows["Supervised (labeled patients only)"].endswith("| baseline |")
    assert rows["Mean Teacher"].endswith("| +0.100 [+0.100, +0.100] |")
    action_cell = rows["ACTION"].rsplit(" | ", 1)[1]
    assert action_cell.startswith("+0.100 [")  # (0.2 + 0.0) / 2; the bootstrap of two pairs spans them
    low, high = (float(x) for x in action_cell.split("[")[1].rstrip("] |").split(", "))
    assert 0.0 <= low < 0.1 < high <= 0.2
    assert "(seed, case) pairs" in semi_md and "mean Dice (RV, Myo, LV) of each test volume" in semi_md
    # Between the other methods, in the caption: ACTION - Mean Teacher on seed 0 is +0.1 and -0.1.
    assert "Paired differences between the other methods (A - B, mean Dice per case" in semi_md
    assert "ACTION - Mean Teacher +0.000 [" in semi_md and "(2 pairs)" in semi_md
    scribble_md = md.split("## acdc_scribble", 1)[1].split("## ", 1)[0]
    assert "Paired differences between" not in scribble_md  # DMPLS alone besides pCE: no pair
    scribble_md = md.split("## acdc_scribble", 1)[1].split("## ", 1)[0]
    assert "| Δ mean Dice vs pce [95% CI] |" in scribble_md
    assert "No interval for dmpls: run pair 0: the runs were tested on different cases" in scribble_md
    assert "| Δ AJI vs supervised [95% CI] |" in md.split("## cervical", 1)[1]  # no run there: "–" cells
    header, lines = csv_rows(matrix, results, None)
    by_method = {(r["setting"], r["method"]): r for r in lines}
    mt = by_method[("acdc_semi_3", "mean_teacher")]
    assert mt["paired_baseline"] == "supervised" and mt["paired_metric"] == "dice_mean"
    assert float(mt["paired_diff"]) == pytest.approx(0.1)
    assert mt["paired_pairs"] == 4 and float(mt["paired_low"]) == pytest.approx(0.1)
    assert r"$\Delta$ mean Dice vs supervised [95\% CI]" in latex(matrix, profile, results, None)
    # The README's summary (kdseg.results.readme), made from these csv rows, shows table.md's cells.
    from kdseg.results.readme import summary

    assert {r["setting"]: r["task"] for r in lines} == {"acdc_scribble": "semantic", "acdc_semi_3": "semantic",
                                                         "acdc_semi_7": "semantic", "cervical": "instance"}
    progress, *readme = summary([{k: str(v) for k, v in r.items()} for r in lines]).split("\n\n")
    assert progress == "Runs finished: 7 of 7 planned."  # the plans of these fake runs only
    assert "| acdc_semi_3 | Mean Teacher | 2 | 0.650 ± 0.000 | – | +0.100 [+0.100, +0.100] |" in readme[0]
    assert f"| acdc_semi_3 | ACTION | 1 | 0.650 | – | {action_cell.rstrip(' |')} |" in readme[0]
    assert "| cervical | MMT-PSM | 0 | – | – | – | – |" in readme[1] and "cervical" not in readme[0]


def test_table_md_sums_the_recorded_run_times(tmp_path: Path) -> None:
    from kdseg.results.tables import markdown

    matrix = load_matrix(MATRIX)
    profile = load_profile(profile_path("smoke", REPO / "experiments/reproduce/profiles"), matrix)
    semi, scribble = matrix.settings["acdc_semi_3"], matrix.settings["acdc_scribble"]
    results = [_fake_finished_run(semi, "supervised", 0, tmp_path / "s0", {"p1_frame01": 0.5}),
               _fake_finished_run(semi, "mean_teacher", 0, tmp_path / "m0", {"p1_frame01": 0.6}),
               _fake_finished_run(scribble, "pce", 0, tmp_path / "c0", {"p1_frame01": 0.5})]
    for result, seconds in zip(results, (1800, 5400, 900)):
        result.result = {"test_seconds": seconds}  # these fake plans have no fit stage: test time only
    assert "## Compute" not in markdown(matrix, profile, results[:0], None)
    compute = markdown(matrix, profile, results, None).split("## Compute", 1)[1]
    assert "- acdc_scribble: 1 run, 0.2 run-hours (900 s)" in compute
    assert "- acdc_semi_3: 2 runs, 2.0 run-hours (1,800-5,400 s a run)" in compute
    assert "- total: 3 runs, 2.2 run-hours" in compute and "acdc_semi_7" not in compute


def test_instance_table_has_the_paired_aji_difference(tmp_path: Path) -> None:
    from kdseg.reproduce.execute import RunResult
    from kdseg.reproduce.plan import RunPlan
    from kdseg.results.tables import csv_rows, markdown

    matrix = load_matrix(MATRIX)
    profile = load_profile(profile_path("smoke", REPO / "experiments/reproduce/profiles"), matrix)
    cervical = matrix.settings["cervical"]

    def run(method: str, seed: int, aji: dict[str, tuple[float, float]]) -> RunResult:
        """A finished run whose images have these (cytoplasm, nucleus) AJIs."""
        folder = tmp_path / f"{method}{seed}"
        folder.mkdir()
        lines = ["image_id,class,num_gt,num_pred,aji,aji_gated,tp,fp,fn,f1,dice"]
        lines += [f"{image},{name},1,1,{value},{value},1,0,0,1,0.9"
                  for image, pair in aji.items() for name, value in zip(("cytoplasm", "nucleus"), pair)]
        (folder / "test_cases.csv").write_text("\n".join(lines) + "\n")
        plan = RunPlan(cervical, cervical.methods[method], seed, None, [], True)
        return RunResult(plan, "finished", folder=folder, metrics={"aji_mean": 0.5})

    # MMT-PSM minus supervised per image: (0.7+0.5)/2 - (0.6+0.4)/2 = +0.1 on both images and seeds.
    results = [run(m, seed, {"a": (0.6 + d, 0.4 + d), "b": (0.5 + d, 0.3 + d)})
               for seed in (0, 1) for m, d in (("supervised", 0.0), ("mmt_psm", 0.1))]
    section = markdown(matrix, profile, results, None).split("## cervical", 1)[1]
    assert "| Δ AJI vs supervised [95% CI] |" in section
    assert "| MMT-PSM |" in section and "| +0.100 [+0.100, +0.100] |" in section
    assert "AJI (mean over cytoplasm and nucleus) of each test image" in section
    lines = {r["method"]: r for r in csv_rows(matrix, results, None)[1] if r["setting"] == "cervical"}
    assert lines["mmt_psm"]["paired_metric"] == "aji_mean" and lines["mmt_psm"]["paired_pairs"] == 4
    assert float(lines["mmt_psm"]["paired_diff"]) == pytest.approx(0.1)


def test_runner_passes_the_holdout_and_captions_the_protocol(tmp_path: Path) -> None:
    from kdseg.reproduce.data import prepare_data

    spec = {"phantom": {"train_patients": 6, "test_patients": 2}, "val_patients": 2}
    prepared = prepare_data("acdc", spec, tmp_path, "p.yaml")
    root = next((tmp_path / "data").glob("acdc_phantom-*"))
    assert prepared.overrides == (f"--data.init_args.root={root}", "--data.init_args.fallback_val_patients=2")
    assert not (tmp_path / "splits").exists()  # the runner writes no split files of its own
    assert prepared.protocol == "train-holdout" and len(prepared.splits["val"]) == 2
    assert "train 4 patients (train.txt without its last 2)" in prepared.description
    assert "validation for checkpoint selection 2 patients (the last 2 of train.txt)" in prepared.description
    assert "test 2 patients (val.txt, no test split)" in prepared.description
    (root / "splits" / "test.txt").write_text((root / "splits" / "val.txt").read_text())
    (root / "splits" / "val.txt").write_text("phantom004\n")
    (root / "splits" / "train.txt").write_text("".join(f"phantom{i:03d}\n" for i in range(4)))
    ssl4mis = prepare_data("acdc", spec, tmp_path, "p.yaml")
    assert ssl4mis.protocol == "ssl4mis" and "ACDC protocol ssl4mis" in ssl4mis.description
    assert "validation for checkpoint selection 1 patients (val.txt), test 2 patients (test.txt)" in ssl4mis.description
