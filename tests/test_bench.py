"""`make bench` machinery on a tiny setting: numbers come out and land in a new JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from kdseg import bench


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
