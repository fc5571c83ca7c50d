"""Multi-process DDP (2 CPU processes, gloo) through the real console script: students and EMA
teachers stay identical on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import stack

TESTS = Path(__file__).resolve().parent


def test_ddp_two_cpu_processes_keep_ranks_identical(tmp_path: Path) -> None:
    kdseg = Path(sys.executable).with_name("kdseg")
    dump = tmp_path / "dump"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "KDSEG_TEST_DUMP_DIR": str(dump),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    command = [
        str(kdseg), "fit", *stack("phantom/mean_teacher"),
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=ddp_state_dump.StateDump",
        "--data.init_args.num_train_patients=4", "--data.init_args.num_val_patients=1",
        "--data.init_args.num_test_patients=1", "--data.init_args.num_slices=3",
        "--data.init_args.phantom_size=40", "--data.init_args.image_size=32", "--data.init_args.batch_size=2",
        "--data.init_args.unlabeled_batch_size=2",
        "--model.init_args.network.encoder_depth=3", "--model.init_args.network.decoder_channels=[32,16,8]",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = torch.load(dump / "rank0.pt", weights_only=False)
    rank1 = torch.load(dump / "rank1.pt", weights_only=False)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["global_step"] == rank1["global_step"] == 3
    for part in ("student", "teacher"):
        assert rank0[part].keys() == rank1[part].keys()
        for key in rank0[part]:
            torch.testing.assert_close(rank0[part][key], rank1[part][key], rtol=0, atol=0, msg=f"{part}.{key}")
    # The teacher moved away from its initial copy and differs from the student (it lags).
    differs = [not torch.equal(rank0["teacher"][k], rank0["student"][k]) for k in rank0["student"]
               if rank0["student"][k].is_floating_point()]
    assert any(differs)
