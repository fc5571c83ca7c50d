"""Faults: a fit stopped by a signal at step k and resumed with ``--ckpt_path`` in a fresh CLI
call ends with exactly the weights of the uninterrupted fit (student and teacher, every tensor),
mid-epoch and at an epoch's end, for semi-supervised, scribble, multi-stage and instance methods.

Sizes (``max_size_cycle`` over the labeled stream): the tiny phantom has 12 labeled slices in 6
batches of 2 per epoch (Mean Teacher, ACTION) or 24 in 12 (ScribSD+, all scribbled), and one
unlabeled batch of 8 that restarts every step; the tiny cytology phantom has 2 labeled images,
one batch, so every MMT-PSM step ends an epoch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_CYTOLOGY_PHANTOM, TINY_DETECTOR, TINY_NETWORK, run_cli, stack
from test_cli import PHANTOM_TINY_DATA

TESTS = Path(__file__).resolve().parent
SEGMENTATION = [*PHANTOM_TINY_DATA, *TINY_NETWORK]


def _child_env() -> dict[str, str]:
    """A ``kdseg`` subprocess with ``tests/`` importable and torch on 1 thread, as this process
    (conftest): another thread count sums in another order, a difference of ~1e-6 by itself."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "OMP_NUM_THREADS": "1"}


def _fit_args(run: str, steps: int, extra: list[str], version: str) -> list[str]:
    """``kdseg fit`` of a run of experiments/stacks.yaml for ``steps`` steps into ``version``."""
    return [
        "fit", *stack(run), f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=4", "--trainer.check_val_every_n_epoch=null", *extra,
        f"--trainer.logger.init_args.version={version}",
    ]


def _last_ckpt(root: Path, version: str) -> Path:
    (found,) = root.glob(f"runs/*/{version}/checkpoints/last.ckpt")
    return found


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")


def _interrupted_then_resumed(root: Path, config: str, steps: int, k: int, extra: list[str],
                              signum: int = signal.SIGTERM) -> tuple[object, object]:
    """The uninterrupted fit and the fit signalled at step ``k`` then resumed, both CLIs."""
    full = run_cli(_fit_args(config, steps, extra, "full"))
    with pytest.raises(SystemExit) as stopped:
        run_cli(_fit_args(config, steps, extra, "cut") + [
            "--trainer.callbacks+=fault_injection.SignalAtStep", f"--trainer.callbacks.step={k}",
            f"--trainer.callbacks.signum={int(signum)}",
        ])
    assert stopped.value.code == 128 + signum
    last = _last_ckpt(root, "cut")
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == k
    resumed = run_cli(_fit_args(config, steps, extra, "resumed") + [f"--ckpt_path={last}"])
    assert resumed.trainer.global_step == full.trainer.global_step == steps
    return full, resumed


@pytest.mark.parametrize(
    ("config", "steps", "k"),
    [
        ("phantom/mean_teacher", 9, 3),  # mid-epoch (6 batches an epoch), before a validation
        ("phantom/mean_teacher", 9, 6),  # the last batch of epoch 0
        ("phantom/scribsd_plus", 7, 5),  # scribble supervision, its input noise
    ],
    ids=["mean_teacher-mid_epoch", "mean_teacher-epoch_end", "scribsd_plus-mid_epoch"],
)
def test_resume_after_sigterm_is_exact(config: str, steps: int, k: int, in_tmp_cwd: Path) -> None:
    full, resumed = _interrupted_then_resumed(in_tmp_cwd, config, steps, k, SEGMENTATION)
    expected = full.model.state_dict()
    assert any(n.startswith("student.") for n in expected) and any(n.startswith("ema_teacher.") for n in expected)
    assert_same_weights(expected, resumed.model.state_dict())


def test_action_stage3_resume_is_exact(in_tmp_cwd: Path) -> None:
    """Stage 3 initialised from an earlier stage's checkpoint (init_weights_from), stopped by
    SIGINT (Ctrl-C) mid-epoch."""
    init = run_cli(_fit_args("phantom/supervised", 2, SEGMENTATION, "stage_before"))
    before = _last_ckpt(in_tmp_cwd, "stage_before")
    assert init.trainer.global_step == 2
    extra = [*SEGMENTATION, f"--model.init_args.init_weights_from={before}"]
    full, resumed = _interrupted_then_resumed(in_tmp_cwd, "phantom/action_stage3", 7, 4, extra, signal.SIGINT)
    assert_same_weights(full.model.state_dict(), resumed.model.state_dict())


def test_instance_mmt_psm_resume_is_exact(in_tmp_cwd: Path) -> None:
    extra = [*TINY_CYTOLOGY_PHANTOM, *TINY_DETECTOR, "--data.init_args.unlabeled_batch_size=2"]
    full, resumed = _interrupted_then_resumed(in_tmp_cwd, "cytology_phantom/mmt_psm", 4, 2, extra)
    expected = full.model.state_dict()
    assert any(n.startswith("ema_teacher.") for n in expected)
    assert_same_weights(expected, resumed.model.state_dict())


def test_real_sigterm_to_a_cli_process_saves_the_step_and_resumes_exactly(in_tmp_cwd: Path) -> None:
    """``kill -TERM`` to a running ``kdseg fit``: exit 143, one kdseg line naming last.ckpt,
    which holds the step reached (mid-epoch) and resumes to the uninterrupted weights."""
    flag = in_tmp_cwd / "at_step"
    env = _child_env()
    args = _fit_args("phantom/mean_teacher", 7, SEGMENTATION, "cut") + [
        "--trainer.callbacks+=fault_injection.WaitAtStep", "--trainer.callbacks.step=3",
        f"--trainer.callbacks.flag_file={flag}",
    ]
    child = subprocess.Popen([sys.executable, "-m", "kdseg.cli", *args], cwd=in_tmp_cwd, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not flag.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), child.communicate()[1][-2000:]
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-2000:]
    last = _last_ckpt(in_tmp_cwd, "cut")
    kdseg_lines = [line for line in err.splitlines() if line.startswith("kdseg:")]
    assert kdseg_lines == [f"kdseg: SIGTERM at step 3: state saved; resume with --ckpt_path={last.resolve()}"]
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3

    full = run_cli(_fit_args("phantom/mean_teacher", 7, SEGMENTATION, "full"))
    resumed = run_cli(_fit_args("phantom/mean_teacher", 7, SEGMENTATION, "resumed") + [f"--ckpt_path={last}"])
    assert_same_weights(full.model.state_dict(), resumed.model.state_dict())


def test_sigterm_before_training_exits_143_without_a_checkpoint(in_tmp_cwd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A signal during the sanity check stops the fit there (Lightning's handling), but with the
    interrupted exit status, not 0."""
    with pytest.raises(SystemExit) as stopped:
        run_cli(_fit_args("phantom/mean_teacher", 4, SEGMENTATION, "early") + [
            "--trainer.callbacks+=fault_injection.SignalAtSanityCheck",
        ])
    assert stopped.value.code == 143
    assert "kdseg: SIGTERM before the first training step: stopped, nothing saved" in capsys.readouterr().err
    assert not list(in_tmp_cwd.glob("runs/*/early/checkpoints/*.ckpt"))


def test_kill_9_after_a_validation_resumes_exactly_from_its_last_ckpt(in_tmp_cwd: Path) -> None:
    """The issue's case: ``kill -9`` after the validation of step 4 (last.ckpt written there, at
    the validation's end, mid-epoch), resume from that last.ckpt."""
    env = _child_env()
    args = _fit_args("phantom/mean_teacher", 9, SEGMENTATION, "cut") + [
        "--trainer.callbacks+=fault_injection.KillAtStep", "--trainer.callbacks.step=5",
    ]
    killed = subprocess.run([sys.executable, "-m", "kdseg.cli", *args], cwd=in_tmp_cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = _last_ckpt(in_tmp_cwd, "cut")
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    full = run_cli(_fit_args("phantom/mean_teacher", 9, SEGMENTATION, "full"))
    resumed = run_cli(_fit_args("phantom/mean_teacher", 9, SEGMENTATION, "resumed") + [f"--ckpt_path={last}"])
    assert_same_weights(full.model.state_dict(), resumed.model.state_dict())
