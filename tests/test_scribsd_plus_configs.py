"""The ScribSD+ experiment configs carry the choices made on validation patients (issue 13, section
6): every config of the method, ablations included, puts the input noise on the student and uses
the same-scale KD target, and the note that records the choice is there."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

NOTE = REPO / "experiments" / "results" / "notes" / "scribsd_plus_validation_choices.md"
CONFIGS = sorted((REPO / "experiments" / "acdc").glob("scribsd_plus*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_scribsd_plus_configs_use_the_validated_choices(config) -> None:
    args = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert (args["noise_on"], args["kd_target"]) == ("student", "same_scale")
    assert NOTE.name in config.read_text()


def test_the_note_names_the_split_and_keeps_val_txt_out() -> None:
    assert len(CONFIGS) == 4
    text = NOTE.read_text()
    assert "patient086, patient023, patient009,\n  patient079, patient015" in text
    assert "never on `val.txt`" in text
