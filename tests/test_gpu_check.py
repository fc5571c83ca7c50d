"""``make gpu-check`` (kdseg.gpu_check): its CPU smoke mode end to end, and its comparisons by hand
values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from kdseg import gpu_check


def test_compare_metrics_hand_values() -> None:
    a = {"dice_mean": 0.5, "per_class": {"RV": 0.25, "LV": float("nan")}, "cases": [1, 2], "name": "x"}
    same = gpu_check.compare_metrics(a, json.loads(json.dumps(a)), 1e-4)
    assert same == {"ok": True, "max_abs_diff": 0.0, "compared": 5, "differing": [], "missing": []}
    b = {"dice_mean": 0.50005, "per_class": {"RV": 0.2502, "LV": float("nan")}, "cases": [1, 2]}
    result = gpu_check.compare_metrics(a, b, 1e-4)
    assert not result["ok"] and result["differing"] == ["per_class.RV"]
    assert math.isclose(result["max_abs_diff"], 2e-4, rel_tol=1e-6)
    nan_vs_number = gpu_check.compare_metrics({"hd95": float("nan")}, {"hd95": 3.0}, 1e-4)
    assert not nan_vs_number["ok"] and nan_vs_number["differing"] == ["hd95"]
    assert gpu_check.compare_metrics({"x": 1.0}, {"y": 1.0}, 1e-4)["missing"] == ["x", "y"]


def test_compare_rank_states_hand_values() -> None:
    state = {"student": {"w": torch.tensor([1.0, 2.0])}, "teacher": {"w": torch.tensor([0.5, 1.0])}, "global_step": 3}
    copy = {"student": {"w": torch.tensor([1.0, 2.0])}, "teacher": {"w": torch.tensor([0.5, 1.0])}, "global_step": 3}
    assert gpu_check.compare_rank_states(state, copy)["ok"]
    copy["teacher"]["w"] = torch.tensor([0.5, 1.25])
    result = gpu_check.compare_rank_states(state, copy)
    assert not result["ok"] and result["differing"] == ["teacher.w"] and result["max_abs_diff"] == 0.25
    copy = {**state, "global_step": 2}
    assert not gpu_check.compare_rank_states(state, copy)["ok"]


def test_cpu_smoke_end_to_end(tmp_path: Path, capsys) -> None:
    """The CPU mode on the tiny phantoms: a semi-supervised method in both precisions, the
    supervised checkpoint tested (CPU only here), DDP skipped with its reason, a JSON report
    written to --out and a table printed."""
    code = gpu_check.main(["--cpu-smoke", "--methods", "mean_teacher", "--steps", "2", "--warmup", "1",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    files = list((tmp_path / "out").glob("cpu-smoke-*.json"))
    assert len(files) == 1
    report = json.loads(files[0].read_text())
    assert code == 0, report["table"]
    assert report["mode"] == "cpu-smoke" and report["accelerator"] == "cpu"
    fits = {(f["method"], f["precision"]): f for f in report["fits"]}
    assert set(fits) == {("mean_teacher", "32-true"), ("mean_teacher", "bf16-mixed")}
    for fit in fits.values():
        assert fit["ok"] and fit["steps"] == 2 and fit["timed_steps"] == 1 and fit["loss_finite"]
        assert fit["step_s"] > 0 and fit["peak_mib"] > 0 and fit["trainer_precision"] == fit["precision"]
    assert report["test"]["ok"] and report["test"]["compared"] > 0
    assert "dice_mean" in json.dumps(report["test"]["metrics"]["cpu"])
    assert report["ddp"]["ok"] is None and "no GPU" in report["ddp"]["skipped"]
    assert "mean_teacher" in out and "bf16-mixed" in out and "ddp: skipped" in out
