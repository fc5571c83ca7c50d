"""Issue 14 §3-§6: bad inputs end with one ``kdseg: error:`` line before training and leave no run
folder; model arguments given with ``--ckpt_path`` are applied; checkpoints load with
``weights_only=True`` (a crafted pickle never runs); evaluation outputs live under the run they
evaluate; W&B runs carry the config's name; ``--help`` says what kdseg is."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, TINY_CYTOLOGY_PHANTOM, TINY_DETECTOR, TINY_NETWORK, run_cli, stack
from test_instance_data import _write_coco

from kdseg.callbacks.run_dir import evaluation_log_root
from kdseg.checkpoints import CheckpointError, load_checkpoint
from kdseg.cli import ConfigError, console, differing_arguments
from kdseg.data.coco import read_coco
from kdseg.data.volume import DataError

ACDC_MT = stack("acdc/mean_teacher")
PHANTOM_TINY_DATA = [
    "--data.init_args.num_train_patients=4", "--data.init_args.num_val_patients=1",
    "--data.init_args.num_test_patients=1", "--data.init_args.num_slices=3", "--data.init_args.phantom_size=40",
]
MARKER_NAME = "kdseg-pwned"


# --------------------------------------------------------------------------- helpers


def run_folders(cwd: Path) -> list[Path]:
    return sorted(p for p in cwd.rglob("version_*") if p.is_dir())


def console_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    """Runs the ``kdseg`` console script in-process; returns its last stderr line (exit code 2)."""
    monkeypatch.setattr(sys, "argv", ["kdseg", *args])
    with pytest.raises(SystemExit) as exit_info:
        console()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


class _WritesMarker:
    """Unpickling this calls ``open(<marker>, "w")``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def crafted_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A ``.ckpt`` (torch.save format, Lightning-like content) that writes a marker file when unpickled."""
    marker = folder / MARKER_NAME
    path = folder / "shared.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": _WritesMarker(marker)}, "global_step": 1}, path)
    return path, marker


@pytest.fixture()
def broken_root(acdc_like_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "acdc"
    shutil.copytree(acdc_like_root, root)
    return root


def empty_volume(path: Path) -> None:
    """Rewrites an HDF5 volume with 0 slices (keys kept)."""
    with h5py.File(path, "a") as f:
        for key in list(f.keys()):
            shape, dtype = f[key].shape, f[key].dtype
            del f[key]
            f.create_dataset(key, shape=(0, *shape[1:]), dtype=dtype)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step Mean Teacher phantom run; returns its best checkpoint."""
    out = tmp_path_factory.mktemp("seg_run")
    cli = run_cli(["fit", *stack("phantom/mean_teacher"), "--trainer.max_steps=2",
                   "--trainer.val_check_interval=2", f"--trainer.logger.init_args.save_dir={out / 'runs'}",
                   *PHANTOM_TINY_DATA, *TINY_NETWORK])
    return Path(cli.trainer.checkpoint_callback.best_model_path)


# --------------------------------------------------------------------------- §3 bad inputs


@pytest.mark.parametrize("case", ["phantom000_frame01", "phantom006_frame12"], ids=["train", "val"])
def test_volume_without_slices_is_named_before_training(case: str, broken_root: Path, in_tmp_cwd: Path) -> None:
    empty_volume(broken_root / "volumes" / f"{case}.h5")
    with pytest.raises(DataError, match="empty") as error:
        run_cli(["fit", *ACDC_MT, f"--data.init_args.root={broken_root}",
                 "--data.init_args.labeled_patients=2", "--trainer.max_steps=1", *TINY_NETWORK])
    assert f"{case}.h5" in str(error.value)
    assert not list(in_tmp_cwd.rglob("*.ckpt"))
    assert run_folders(in_tmp_cwd) == []  # the failed start left no version_N behind
    assert not (in_tmp_cwd / "runs").exists()


def test_labeled_patients_zero_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                           in_tmp_cwd: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data.labeled_patients must be >= 1 or null, got 0$"):
        run_cli(["fit", *stack("phantom/mean_teacher"),
                 "--data.init_args.labeled_patients=0", *TINY_NETWORK])
    last = console_error(monkeypatch, capsys, ["fit", *stack("phantom/mean_teacher"),
                                               "--data.init_args.labeled_patients=0"])
    assert last == "kdseg: error: data.labeled_patients must be >= 1 or null, got 0"


@pytest.mark.parametrize("content", [b"", b"this is no checkpoint" * 7, b"PK\x03\x04 truncated zip"],
                         ids=["empty", "text", "truncated-zip"])
def test_ckpt_path_that_is_not_a_checkpoint_is_one_line(content: bytes, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str], in_tmp_cwd: Path) -> None:
    bad = in_tmp_cwd / "model.ckpt"
    bad.write_bytes(content)
    last = console_error(monkeypatch, capsys, ["test", *stack("phantom/supervised"),
                                               f"--ckpt_path={bad}", *PHANTOM_TINY_DATA, *TINY_NETWORK])
    assert last.startswith(f"kdseg: error: {bad}: not a PyTorch checkpoint")
    assert run_folders(in_tmp_cwd) == []


def test_ckpt_path_missing_file_is_named(in_tmp_cwd: Path) -> None:
    with pytest.raises(CheckpointError, match="nowhere.ckpt: checkpoint file does not exist"):
        run_cli(["test", *stack("phantom/supervised"), "--ckpt_path=nowhere.ckpt",
                 *PHANTOM_TINY_DATA, *TINY_NETWORK])


def _coco_with_polygon(tmp_path: Path, polygon: list[float]) -> Path:
    path, _ = _write_coco(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][0]["segmentation"] = [polygon]  # annotation 10 of the 20x24 image a.png
    path.write_text(json.dumps(data))
    return path


def test_coco_polygon_partly_outside_is_clipped_with_a_warning(tmp_path: Path) -> None:
    # x 18..30 on a 24-wide image: 2 of the 4 corners outside; what is inside is x 18..23, y 5..11.
    path = _coco_with_polygon(tmp_path, [18, 5, 30, 5, 30, 12, 18, 12])
    with pytest.warns(UserWarning, match=r"annotation 10: 2 polygon point\(s\) outside the 20x24 image") as rec:
        sample = read_coco(path, tmp_path / "imgs")[0]
    assert any("ann.json" in str(w.message) for w in rec if issubclass(w.category, UserWarning))
    expected = np.zeros((20, 24), bool)
    expected[5:12, 18:24] = True
    mask = sample.masks[0]
    assert (mask & expected).sum() / (mask | expected).sum() > 0.8 and not mask[:, :18].any()


def test_coco_polygon_wholly_outside_is_an_error(tmp_path: Path) -> None:
    path = _coco_with_polygon(tmp_path, [30, 25, 40, 25, 40, 30, 30, 30])
    with pytest.raises(DataError, match="annotation 10: the polygon lies wholly outside the 20x24 image"):
        read_coco(path, tmp_path / "imgs")


def test_coco_polygon_inside_gives_no_warning(tmp_path: Path) -> None:
    path = _coco_with_polygon(tmp_path, [0, 0, 24, 0, 24, 20, 0, 20])  # the image border itself is inside
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert read_coco(path, tmp_path / "imgs")[0].masks[0].all()
    assert not [w for w in caught if "outside" in str(w.message)]


# --------------------------------------------------------------------------- §5 safe loading


def test_crafted_checkpoint_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdseg.methods import MeanTeacher, NetworkConfig
    from kdseg.networks.mask_rcnn import _load_state_dict_file
    from kdseg.reproduce.execute import checkpoint_score

    path, marker = crafted_checkpoint(tmp_path)
    # The crafted file is real: an unsafe load runs its code.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match=r"shared.ckpt: refused to load.*(io|builtins).open"):
        load_checkpoint(path)
    model = MeanTeacher(network=NetworkConfig(encoder_depth=4, decoder_channels=[32, 16, 8, 8]))
    with pytest.raises(CheckpointError, match="shared.ckpt"):
        model.load_weights_from(path)  # init_weights_from
    with pytest.raises(CheckpointError, match="shared.ckpt"):
        _load_state_dict_file(path)  # instance init_weights_from / backbone weights
    assert checkpoint_score(path) is None  # the results runner skips it
    assert not marker.exists()


def test_crafted_checkpoint_via_cli_never_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                               in_tmp_cwd: Path) -> None:
    path, marker = crafted_checkpoint(in_tmp_cwd)
    last = console_error(monkeypatch, capsys, ["predict", *stack("phantom/supervised"),
                                               f"--ckpt_path={path}", *PHANTOM_TINY_DATA, *TINY_NETWORK])
    assert last.startswith(f"kdseg: error: {path}: refused to load")
    assert not marker.exists()


def test_weights_only_false_is_refused(seg_run: Path, in_tmp_cwd: Path) -> None:
    config = seg_run.parents[1] / "config.yaml"
    with pytest.raises(ConfigError, match="weights_only"):
        run_cli(["test", f"--config={config}", f"--ckpt_path={seg_run}", "--weights_only=false"])


def test_lightning_loads_the_checkpoint_with_weights_only(seg_run: Path, in_tmp_cwd: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    original = torch.load

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    # Even where torch's own default is switched to unsafe loading.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    run_cli(["validate", f"--config={seg_run.parents[1] / 'config.yaml'}", f"--ckpt_path={seg_run}"])
    assert seen and all(w is True for w in seen)


# --------------------------------------------------------------------------- §4 given arguments


def test_differing_arguments_by_hand() -> None:
    saved = {"lr": 0.01, "network": {"encoder_depth": 5, "encoder_name": "resnet18"}, "t": 0.5}
    given = {"lr": 0.01, "network": {"encoder_depth": 4}, "t": 0.0, "new": 1}
    assert differing_arguments(saved, given) == [
        ("network.encoder_depth", 5, 4), ("t", 0.5, 0.0), ("new", "<not saved>", 1)
    ]
    assert differing_arguments(saved, {}) == []


def test_segmentation_evaluation_argument_is_applied(seg_run: Path, in_tmp_cwd: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = seg_run.parents[1] / "config.yaml"
    saved = load_checkpoint(seg_run)["hyper_parameters"]
    assert saved["eval_network"] == "student" and saved["eval_slice_batch_size"] == 16
    cli = run_cli(["test", f"--config={config}", f"--ckpt_path={seg_run}", "--model.init_args.eval_network=teacher",
                   "--model.init_args.eval_slice_batch_size=5"])
    assert cli.model.hparams.eval_network == "teacher" and cli.model.hparams.eval_slice_batch_size == 5
    assert cli.model.inference_network() is cli.model.ema_teacher
    err = capsys.readouterr().err
    assert "model.init_args.eval_network='teacher' (given) replaces the checkpoint's 'student'" in err
    # Not given: the checkpoint's value stays.
    cli = run_cli(["test", f"--config={config}", f"--ckpt_path={seg_run}"])
    assert cli.model.hparams.eval_network == "student"
    assert "replaces the checkpoint" not in capsys.readouterr().err


def test_model_class_other_than_the_checkpoint_is_refused(seg_run: Path, in_tmp_cwd: Path) -> None:
    with pytest.raises(ConfigError, match="the checkpoint is a kdseg.methods.MeanTeacher but the model given is"):
        run_cli(["test", *stack("phantom/supervised"), f"--ckpt_path={seg_run}",
                 *PHANTOM_TINY_DATA, *TINY_NETWORK])


def test_instance_predict_score_threshold_is_applied(in_tmp_cwd: Path) -> None:
    fit = run_cli(["fit", *stack("cytology_phantom/supervised"), "--trainer.max_steps=1", "--trainer.val_check_interval=1",
                   *TINY_CYTOLOGY_PHANTOM, *TINY_DETECTOR])
    best = fit.trainer.checkpoint_callback.best_model_path
    assert load_checkpoint(best)["hyper_parameters"]["predict_score_threshold"] == 0.5
    out = in_tmp_cwd / "pred"
    cli = run_cli(["predict", f"--config={Path(fit.trainer.log_dir) / 'config.yaml'}", f"--ckpt_path={best}",
                   f"--prediction_writer.output_dir={out}", "--model.init_args.predict_score_threshold=0.0",
                   "--model.init_args.eval_score_threshold=0.25"])
    assert cli.model.hparams.predict_score_threshold == 0.0 and cli.model.hparams.eval_score_threshold == 0.25
    with np.load(next(out.glob("*.npz"))) as f:
        scores = f["scores"]
    assert len(scores) and scores.min() < 0.5  # detections below the checkpoint's 0.5 were written


# --------------------------------------------------------------------------- §6 runs told apart


def test_evaluation_log_root_by_hand() -> None:
    ckpt = "runs/x/version_3/checkpoints/best.ckpt"
    assert evaluation_log_root(Path("runs"), "x", "test", ckpt) == Path("runs/x/version_3")
    assert evaluation_log_root(Path("runs"), "x", "predict", "elsewhere/model.ckpt") == Path("runs/x")
    assert evaluation_log_root(Path("runs"), "x", "validate", None) == Path("runs/x")
    assert evaluation_log_root(Path("out/run"), "test", "test", ckpt) is None  # results runner: <run>/test


def test_evaluations_live_under_the_evaluated_run(seg_run: Path, in_tmp_cwd: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = seg_run.parents[1]
    before = sorted(p.name for p in run.parent.iterdir())
    first = Path(run_cli(["test", f"--config={run / 'config.yaml'}", f"--ckpt_path={seg_run}"]).trainer.log_dir)
    second = Path(run_cli(["test", f"--config={run / 'config.yaml'}", f"--ckpt_path={seg_run}"]).trainer.log_dir)
    validate = Path(run_cli(["validate", f"--config={run / 'config.yaml'}", f"--ckpt_path={seg_run}"]).trainer.log_dir)
    assert first.parent == second.parent == run / "test" and first != second
    assert validate.parent == run / "validate"
    assert (first / "test_metrics.json").is_file() and (second / "test_metrics.json").is_file()
    assert sorted(p.name for p in run.parent.iterdir()) == before  # no new run beside the training run
    assert f"kdseg: test outputs in {second}" in capsys.readouterr().out


def test_wandb_run_named_by_the_config_without_git_warning(in_tmp_cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    said: list[str] = []
    monkeypatch.setattr(wandb, "termwarn", lambda message, *a, **k: said.append(str(message)))
    cli = run_cli(["fit", *stack("phantom/supervised"),
                   f"--config={REPO / 'experiments/loggers/wandb.yaml'}", "--trainer.max_steps=1",
                   "--trainer.val_check_interval=1", *PHANTOM_TINY_DATA, *TINY_NETWORK])
    logger = cli.trainer.logger
    assert logger.experiment.name == "phantom_semi"  # the data layer names the run
    assert str(logger.version).startswith("phantom_semi-")
    assert [p.name for p in (in_tmp_cwd / "runs" / "kdseg").iterdir()] == [logger.version]
    assert not [m for m in said if "git root" in m]


def test_help_says_what_kdseg_is_and_lists_methods(capsys: pytest.CaptureFixture[str], in_tmp_cwd: Path) -> None:
    from kdseg.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "Lightning Trainer command line tool" not in top
    assert "knowledge distillation" in top and "experiments/" in top
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    fit_help = " ".join(capsys.readouterr().out.split())
    for name in ("MMTPSM", "ScribSDPlus", "InstanceMeanTeacher", "CervicalCellDataModule", "ACDCDataModule"):
        assert name in fit_help


def test_every_method_and_data_module_is_exported() -> None:
    import inspect

    import lightning.pytorch as pl

    import kdseg.data
    import kdseg.methods

    for package, base, modules in ((kdseg.methods, pl.LightningModule, "kdseg.methods."),
                                   (kdseg.data, pl.LightningDataModule, "kdseg.data.")):
        defined = set()
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith(modules):
                defined |= {n for n, c in inspect.getmembers(module, inspect.isclass)
                            if issubclass(c, base) and c.__module__.startswith(modules) and not n.startswith("_")}
        assert defined and defined <= set(package.__all__), defined - set(package.__all__)

