"""kdseg.results.curves: last-quarter gains by hand, and the caption sentence built from run folders."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kdseg.results.curves import flattening_text, last_quarter_gain, read_curve


def test_last_quarter_gain_by_hand() -> None:
    # 1000 steps: the last quarter is after step 750; best before 0.45, best overall 0.50.
    assert last_quarter_gain({250: 0.30, 500: 0.40, 750: 0.45, 1000: 0.50}) == pytest.approx(0.05)
    # A late dip does not count as a loss: the best value up to 3/4 is also the best overall.
    assert last_quarter_gain({250: 0.30, 500: 0.60, 750: 0.55, 1000: 0.58}) == pytest.approx(0.0)
    assert last_quarter_gain({}) is None
    assert last_quarter_gain({1000: 0.5}) is None  # no point in the first three quarters


def _run(tmp_path: Path, method: str, seed: int, curve: dict[int, float]) -> SimpleNamespace:
    version = tmp_path / f"{method}-{seed}" / "fit" / "version_0"
    version.mkdir(parents=True)
    # Lightning logs validation at global_step - 1, and other rows without the metric.
    lines = ["step,train/loss,val/dice_mean"] + [f"{s - 1},0.5," for s in curve] + [f"{s - 1},,{v}" for s, v in curve.items()]
    (version / "metrics.csv").write_text("\n".join(lines) + "\n")
    plan = SimpleNamespace(setting=SimpleNamespace(name="s"), method=SimpleNamespace(name=method), stages=[0],
                           final={"checkpoint.monitor": "val/dice_mean"})
    return SimpleNamespace(plan=plan, status="finished", has_metrics=True, folder=tmp_path / f"{method}-{seed}")


def test_flattening_text_names_flat_and_rising_methods(tmp_path: Path) -> None:
    methods = {"a": SimpleNamespace(name="a", label="A"), "b": SimpleNamespace(name="b", label="B"),
               "c": SimpleNamespace(name="c", label="C")}
    results = [
        _run(tmp_path, "a", 0, {250: 0.5, 500: 0.6, 750: 0.70, 1000: 0.705}),
        _run(tmp_path, "a", 1, {250: 0.5, 500: 0.6, 750: 0.70, 1000: 0.700}),
        _run(tmp_path, "b", 0, {250: 0.3, 500: 0.4, 750: 0.45, 1000: 0.50}),
        _run(tmp_path, "b", 1, {250: 0.3, 500: 0.4, 750: 0.45, 1000: 0.452}),  # the largest gain decides
    ]
    assert read_curve(results[0].folder, "val/dice_mean") == {250: 0.5, 500: 0.6, 750: 0.70, 1000: 0.705}
    other = _run(tmp_path, "a", 2, {250: 0.1, 500: 0.2, 750: 0.3, 1000: 0.9})
    other.plan.setting = SimpleNamespace(name="another setting")  # a method of the same name elsewhere
    text = flattening_text(SimpleNamespace(name="s", methods=methods), [*results, other])
    assert "flattened (gain below 0.01) for A +0.005;" in text
    assert "still rising for B +0.050." in text
    assert "C" not in text.replace("Validation curves", "")  # no run: not mentioned
    assert flattening_text(SimpleNamespace(name="s", methods=methods), []) == ""


def test_restored_runs_give_their_record_curve_or_are_named_without_one(tmp_path: Path) -> None:
    """Runs restored from their records (run folders gone): the record's ``val_curve.csv`` counts like
    a run folder's curve; a record without one is named in the caption, not silently left out."""
    methods = {"a": SimpleNamespace(name="a", label="A"), "b": SimpleNamespace(name="b", label="B")}
    kept, bare = _run(tmp_path, "a", 0, {}), _run(tmp_path, "b", 0, {})
    for run in (kept, bare):
        run.status = "restored"
    (kept.folder / "val_curve.csv").write_text("step,val/dice_mean\n250,0.3\n500,0.4\n750,0.45\n1000,0.5\n")
    text = flattening_text(SimpleNamespace(name="s", methods=methods), [kept, bare])
    assert "still rising for A +0.050." in text
    assert text.endswith("No validation curve in the records of: B 1 of 1 runs.")
    assert flattening_text(SimpleNamespace(name="s", methods=methods), [bare]) == (
        "No validation curve in the records of: B 1 of 1 runs.")
