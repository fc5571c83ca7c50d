"""The config layers (experiments/README.md): every stack of experiments/stacks.yaml resolves to
the config recorded in tests/data/config_layers_golden.json (the resolved configs of the whole
per-run files the layers replaced, logger name aside: `kdseg fit --print_config`), and
num_classes / scribble_ignore_index reach the model from the data layer only.

After a deliberate change of a layer, rewrite the record with
``python tests/test_config_layers.py --update`` and review its diff."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, STACKS, TINY_NETWORK, run_cli, stack
from test_cli import PHANTOM_TINY_DATA

GOLDEN = Path(__file__).parent / "data" / "config_layers_golden.json"
#: Differs between runs by design (each whole file named its own run); the layers name it per dataset.
NOT_COMPARED = ("trainer.logger.init_args.name",)


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> leaf values (an empty dict is a leaf)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolved(run: str, extra: list[str] | None = None) -> dict[str, Any]:
    """`kdseg fit <stack> --print_config`, flattened, without the keys not compared."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", *stack(run), *(extra or []), "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()
    config = flat(yaml.safe_load(out.getvalue()))
    return {k: v for k, v in config.items() if k not in NOT_COMPARED}


def test_every_stack_is_recorded_and_every_layer_used() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden["runs"]) == sorted(STACKS)
    used = {layer for layers in STACKS.values() for layer in layers}
    on_disk = {str(p.relative_to(REPO)) for folder in ("data", "methods", "ablations")
               for p in (REPO / "experiments" / folder).rglob("*.yaml")}
    cpu_budget = "experiments/budgets/cpu_scribble.yaml"  # added by the cpu profile; one stack names it too
    on_disk |= {str(p.relative_to(REPO)) for p in (REPO / "experiments" / "budgets").rglob("*.yaml")}
    assert on_disk - used - {cpu_budget} == set(), "layers that no stack uses"
    assert used - on_disk == set(), "stacks naming missing layers"


@pytest.mark.parametrize("run", sorted(STACKS))
def test_stack_resolves_to_the_recorded_config(run: str) -> None:
    golden = json.loads(GOLDEN.read_text())
    expected = {**golden["common"], **golden["runs"][run]}
    got = resolved(run)
    differing = {k: (expected.get(k, "<absent>"), got.get(k, "<absent>"))
                 for k in set(expected) | set(got) if expected.get(k, "<absent>") != got.get(k, "<absent>")}
    assert differing == {}, f"{run}: (recorded, now) for each differing key"


def test_linked_arguments_reach_the_model_from_the_data() -> None:
    from kdseg.cli import ConfigError, main

    cli = main([*stack("phantom/dmpls"), "--data.init_args.scribble_ignore_index=7", "--trainer.logger=false"],
               run=False)
    assert cli.model.scribble_ignore_index == cli.datamodule.scribble_ignore_index == 7
    # The model's own value is not a second source: the data layer's wins.
    cli = main([*stack("phantom/dmpls"), "--model.init_args.num_classes=3", "--trainer.logger=false"], run=False)
    assert cli.model.num_classes == cli.datamodule.num_classes == 4
    # The instance task: the cervical data module's 3 classes reach the Mask R-CNN method.
    cli = main([*stack("cytology_phantom/supervised"), "--trainer.logger=false"], run=False)
    assert cli.model.num_classes == cli.datamodule.num_classes == 3
    with pytest.raises(ConfigError, match="data.num_classes must be 3"):
        main([*stack("cytology_phantom/supervised"), "--data.init_args.num_classes=4", "--trainer.logger=false"],
             run=False)


def _update() -> None:
    """Rewrites the record from the stacks as they resolve now."""
    runs = {run: resolved(run) for run in sorted(STACKS)}
    first = next(iter(runs.values()))
    common = {k: v for k, v in sorted(first.items()) if all(k in r and r[k] == v for r in runs.values())}
    out = {"common": common, "runs": {run: {k: v for k, v in sorted(r.items()) if k not in common}
                                       for run, r in runs.items()}}
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    _update()


def test_checkpoint_for_other_classes_is_refused_by_name(in_tmp_cwd: Path) -> None:
    """With --ckpt_path the linked values come from the data layer, not from the checkpoint's
    hyperparameters: a checkpoint trained with other values is refused by name."""
    from kdseg.cli import ConfigError

    tiny = [*PHANTOM_TINY_DATA, *TINY_NETWORK]
    fit = run_cli(["fit", *stack("phantom/dmpls"), "--trainer.max_steps=1", "--trainer.val_check_interval=1", *tiny])
    best = fit.trainer.checkpoint_callback.best_model_path
    config = f"--config={Path(fit.trainer.log_dir) / 'config.yaml'}"
    test = run_cli(["test", config, f"--ckpt_path={best}"])
    assert test.model.scribble_ignore_index == 4 and test.model.num_classes == 4
    with pytest.raises(ConfigError, match=r"trained with scribble_ignore_index=4 but data.init_args.scribble_ignore_index is 7"):
        run_cli(["test", config, f"--ckpt_path={best}", "--data.init_args.scribble_ignore_index=7"])
