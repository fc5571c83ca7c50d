"""`make bench` machinery on a tiny setting: numbers come out and land in a new JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdseg import bench
from kdseg.bench_measure import bench_one


def test_bench_smoke(tmp_path: Path, capsys) -> None:
    bench.main(["--methods", "supervised", "mean_teacher", "--image-size", "32", "--batch-size", "2",
                "--steps", "1", "--warmup", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "mean_teacher" in out and "x sup" in out
    files = list(tmp_path.glob("cpu-*.json"))
    assert len(files) == 1
    report = json.loads(files[0].read_text())
    by_method = {r["method"]: r for r in report["results"]}
    assert by_method["supervised"]["step_ratio_vs_supervised"] == 1.0
    assert by_method["mean_teacher"]["unlabeled_batch"] == 2
    assert all(r["step_s"] > 0 and r["inference_slices_per_s"] > 0 for r in report["results"])
    assert report["machine"]["cpu_count"] >= 1


def test_bench_new_methods_ratios(tmp_path: Path) -> None:
    """ACTION stage 3 and MMT-PSM with their baselines on the smallest sizes: the full methods run
    (MMT-PSM's unlabeled losses despite its warm-up), the baselines see the same images, and the
    ratios to the baselines are finite. In-process (``bench_one`` directly) to stay quick on busy
    cores: the subprocess path is ``test_bench_smoke``'s; peaks are then not isolated per method,
    so only their being computed is checked here."""
    import math

    results = []
    for name in ("instance_supervised", "mmt_psm", "mean_teacher", "action_stage3"):
        result = bench_one(
            bench.METHODS[name][0], "cpu", image_size=32, batch_size=2, steps=1, warmup=0,
            precision="32-true", channels_last=False, instance_image_size=64, instance_batch_size=1,
        )
        results.append(result | {"method": name})
    text = bench.table(results)
    by_method = {r["method"]: r for r in results}
    for name, baseline in (("action_stage3", "mean_teacher"), ("mmt_psm", "instance_supervised")):
        r = by_method[name]
        assert r["baseline"] == baseline and r["same_batch_as_baseline"] is True
        assert math.isfinite(r["step_ratio_vs_baseline"]) and r["step_ratio_vs_baseline"] > 0
        assert isinstance(r["peak_ratio_vs_baseline"], float)
    assert by_method["action_stage3"]["unlabeled_batch"] == by_method["mean_teacher"]["unlabeled_batch"] == 2
    assert by_method["mmt_psm"]["step_ratio_vs_supervised"] == by_method["mmt_psm"]["step_ratio_vs_baseline"]
    assert math.isnan(by_method["action_stage3"]["step_ratio_vs_supervised"])  # supervised not run
    assert by_method["mmt_psm"]["family"] == "instance" and by_method["mmt_psm"]["unlabeled_batch"] == 1
    logs = by_method["mmt_psm"]["last_step_logs"]
    assert logs["train/unlabeled_weight"] > 0  # warm-up skipped
    assert logs["train/pseudo_labels"] > 0 and logs["train/positive_rois"] > 0  # PSM / MGD have work
    assert by_method["mmt_psm"]["inference_images_per_s"] > 0
    assert text.index("semantic (") < text.index("instance (")  # one table per family
    assert "ACTION stage 3 (L_sup + L_unsup + L_anco) vs mean_teacher, same batch 2+2" in text
    with pytest.raises(ValueError, match="channels-last"):
        bench_one(bench.METHODS["mmt_psm"][0], "cpu", 32, 2, 1, 0, "bf16-mixed", True)


def test_variants_option_on_cpu() -> None:
    """``--variants``: bf16 autocast and channels-last on the CPU (channels-last never for Mask R-CNN)."""
    import argparse

    assert bench.parse_variant("32-true+cl") == ("32-true", True)
    assert bench.parse_variant("bf16-mixed") == ("bf16-mixed", False)
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_variant("16-mixed")
    requested = [("32-true", False), ("bf16-mixed", True)]
    assert bench.variants_for("cpu", "semantic", requested) == requested
    assert bench.variants_for("cpu", "instance", requested) == [("32-true", False)]
    assert bench.variants_for("cpu", "semantic") == [("32-true", False)]
    result = bench_one(bench.METHODS["supervised"][0], "cpu", image_size=32, batch_size=2, steps=1, warmup=0,
                       precision="bf16-mixed", channels_last=True)
    assert result["precision"] == "bf16-mixed" and result["channels_last"] and result["step_s"] > 0
