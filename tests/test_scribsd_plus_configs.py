"""The ScribSD+ ACDC stacks carry the choices made on validation patients (issue 13, section 6):
every ACDC stack of the method, ablations included, puts the input noise on the teacher and uses
the full-resolution KD target (re-checked at the cpu table's budget on 2026-12-06, which reversed the
250-step choices), and the note that records the choice is there."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, STACKS, stack_config

NOTE = REPO / "experiments" / "results" / "notes" / "scribsd_plus_validation_choices.md"
RUNS = sorted(run for run in STACKS if run.startswith("acdc/scribsd_plus"))


@pytest.mark.parametrize("run", RUNS)
def test_scribsd_plus_stacks_use_the_validated_choices(run: str) -> None:
    args = stack_config(run)["model"]["init_args"]
    assert (args["noise_on"], args["kd_target"]) == ("teacher", "full_resolution")
    # The layer that makes the choice names the note.
    layer = next(layer for layer in STACKS[run] if "noise_on" in (REPO / layer).read_text())
    assert NOTE.name in (REPO / layer).read_text()


def test_the_note_names_the_split_and_keeps_val_txt_out() -> None:
    assert len(RUNS) == 4
    text = NOTE.read_text()
    assert "patient086, patient023, patient009,\n  patient079, patient015" in text
    assert "never on `val.txt`" in text
