"""The MMT-PSM diagnostic probes (experiments/isbi2014/diagnose_mmt_psm.py) on a tiny phantom."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math

import pytest
from conftest import REPO, TINY_CYTOLOGY_PHANTOM, TINY_DETECTOR, run_cli, stack

SCRIPT = REPO / "experiments" / "isbi2014" / "diagnose_mmt_psm.py"
PHANTOM = [
    *TINY_CYTOLOGY_PHANTOM,
    "--model.init_args.adaptor_channels=8",
    "--model.init_args.num_views=2",
    "--model.init_args.pseudo_label_score=0.0",  # an untrained teacher still gives pseudo-labels
]


@pytest.fixture(scope="module")
def diagnose():
    spec = importlib.util.spec_from_file_location("diagnose_mmt_psm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probes_report_scores_and_gradient_norms(diagnose, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The script reads one resolved config (a run's), here the stack's as --print_config writes it.
    resolved = io.StringIO()
    with contextlib.redirect_stdout(resolved), pytest.raises(SystemExit):
        run_cli(["fit", *stack("cytology_phantom/mmt_psm"), "--print_config"])
    (tmp_path / "config.yaml").write_text(resolved.getvalue())
    args = [f"--config={tmp_path / 'config.yaml'}", "--batches=1",
            *TINY_DETECTOR, *PHANTOM]
    bn = diagnose.main(["bn", *args])
    assert set(bn) == {"checkpoint", "after_labeled", "after_unlabeled_clean", "after_unlabeled_perturbed"}
    assert all(0.0 <= v["aji_mean"] <= 1.0 for v in bn.values())

    (row,) = diagnose.main(["grad", *args])
    assert all(math.isfinite(v) for v in row.values())
    assert row["grad_sup"] > 0 and row["grad_psm"] > 0 and row["L_mgd"] > 0
    assert row["grad_unlabeled"] != row["grad_psm"]  # MGD adds its own gradient


def test_missing_config_is_named(diagnose, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        diagnose.load_method(tmp_path / "nowhere.yaml", None)
