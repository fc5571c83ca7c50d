"""``last.ckpt`` is the latest training state, not the state of the latest improvement."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from kdseg.callbacks.latest_checkpoint import LatestCheckpoint
from kdseg.cli import main


class WorseningModel(pl.LightningModule):
    """Its validation Dice only gets worse: the best checkpoint is the first validation's."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/dice_mean", 1.0 / (1.0 + self.global_step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    def _loader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)

    def train_dataloader(self):
        return self._loader()

    def val_dataloader(self):
        return self._loader()


def test_last_ckpt_is_the_final_state_when_the_last_validation_did_not_improve(tmp_path) -> None:
    # 7 steps, validation every 3 (steps 3 and 6): best = step 3; last must be step 7 (end of fit).
    main(["fit", "--model", f"{__name__}.WorseningModel", "--data", f"{__name__}.Data",
          "--trainer.max_steps=7", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.name=w"])
    checkpoints = tmp_path / "w" / "version_0" / "checkpoints"
    names = sorted(p.name for p in checkpoints.glob("*.ckpt"))
    assert names == ["best-step3-dice0.2500.ckpt", "last.ckpt"], names
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(checkpoints / "best-step3-dice0.2500.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 7 and best["global_step"] == 3
    # Both callbacks' states are in the checkpoint, so a resume restores the best-score tracking.
    assert "LatestCheckpoint" in last["callbacks"]
    assert any(k.startswith("ModelCheckpoint") for k in last["callbacks"])


def test_last_ckpt_follows_every_validation(tmp_path) -> None:
    trainer = pl.Trainer(max_steps=6, val_check_interval=3, limit_val_batches=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[LatestCheckpoint(tmp_path)])
    trainer.fit(WorseningModel(), datamodule=Data())
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6


def test_a_write_interrupted_midway_leaves_the_previous_last_ckpt_loadable(tmp_path, monkeypatch) -> None:
    """Every checkpoint of a CLI fit goes through AtomicCheckpointIO: a save that dies after
    writing part of the file (here Ctrl-C inside torch.save) leaves last.ckpt as it was and no
    temporary file behind."""
    import kdseg.callbacks.atomic_io as atomic_io
    from kdseg.callbacks.atomic_io import AtomicCheckpointIO

    cli = main(["fit", "--model", f"{__name__}.WorseningModel", "--data", f"{__name__}.Data",
                "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.name=w"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    checkpoints = tmp_path / "w" / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"
    before = last.read_bytes()

    def dies_midway(obj, handle):
        handle.write(b"partial checkpoint bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_io.torch, "save", dies_midway)
    try:
        cli.trainer.save_checkpoint(last)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError("the injected failure did not happen")
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-step3-dice0.2500.ckpt", "last.ckpt"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path) -> None:
    """The states the checkpoint holds are loadable with weights_only=True (as the CLI reads
    --ckpt_path) and restore every generator: the same draws follow."""
    import random

    import numpy as np

    from kdseg.callbacks.rng_state import capture_rng_states, restore_rng_states

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.randn()  # a cached Gaussian is part of NumPy's state
    torch.save({"s": capture_rng_states()}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.randn(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    restore_rng_states(torch.load(tmp_path / "s.pt", weights_only=True)["s"])
    actual = (torch.rand(3), np.random.randn(3), random.random())
    assert torch.equal(expected[0], actual[0])
    assert np.array_equal(expected[1], actual[1]) and expected[2] == actual[2]
