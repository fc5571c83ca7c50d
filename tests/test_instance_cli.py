"""The cervical-cell data module, every instance-segmentation stack of experiments/stacks.yaml
(isbi2014/*, cytology_phantom/*) through the real ``kdseg`` CLI on tiny data, and the
fit -> test -> predict round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import REPO, STACKS, TINY_CYTOLOGY_PHANTOM, TINY_DETECTOR, TINY_INSTANCE_SPLIT, run_cli, stack
from skimage import io

from kdseg.data.cytology_phantom import make_cytology_phantom
from kdseg.data.instance_datamodule import CervicalCellDataModule
from kdseg.data.volume import DataError

#: A tiny light Mask R-CNN at 64 px and a CPU-only trainer.
TINY = TINY_DETECTOR
#: Teacher-student configs: unlabeled losses from the first step, pseudo-labels from an untrained teacher.
TEACHER_NOW = ["--model.init_args.warmup_steps=0", "--model.init_args.pseudo_label_score=0.0"]
SPLIT = TINY_INSTANCE_SPLIT
PHANTOM_TINY = TINY_CYTOLOGY_PHANTOM


def instance_runs() -> list[str]:
    return sorted(run for run in STACKS if run.split("/")[0] in ("isbi2014", "cytology_phantom"))


def stack_text(run: str) -> str:
    """The run's layers, one after the other (later lines win, as in the CLI)."""
    return "\n".join((REPO / layer).read_text() for layer in STACKS[run])


@pytest.fixture(scope="module")
def tiny_isbi(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Phantom images written in the ISBI 2014 layout (``train/images/N.tif`` +
    ``isbi_train_GT.mat``) and two "EDF" PNGs, all 64 px."""
    root = tmp_path_factory.mktemp("isbi")
    images = root / "train" / "images"
    images.mkdir(parents=True)
    samples = make_cytology_phantom(5, seed=11, size=64)
    cyto = np.empty((len(samples), 1), dtype=object)
    nuclei = np.empty((len(samples), 1), dtype=object)
    cellnum = []
    for i, s in enumerate(samples):
        io.imsave(str(images / f"{i + 1}.tif"), (s.image * 255).astype(np.uint8), check_contrast=False)
        cells = s.masks[s.labels == 1]
        stack = np.empty((len(cells), 1), dtype=object)
        for k, m in enumerate(cells):
            stack[k, 0] = m.astype(np.uint8)
        cyto[i, 0] = stack
        nuclei[i, 0] = s.masks[s.labels == 2].any(axis=0).astype(np.uint8)
        cellnum.append(len(cells))
    scipy.io.savemat(
        str(root / "train" / "isbi_train_GT.mat"),
        {"train_Cytoplasm": cyto, "train_Nuclei": nuclei, "CellNum": np.array(cellnum, np.uint8)[:, None]},
    )
    edf = root / "edf"
    edf.mkdir()
    for i, s in enumerate(make_cytology_phantom(2, seed=12, size=64)):
        io.imsave(str(edf / f"EDF{i:03d}.png"), (s.image * 255).astype(np.uint8), check_contrast=False)
    return root, edf


def tiny_overrides(run: str, isbi: tuple[Path, Path]) -> list[str]:
    data = PHANTOM_TINY
    if run.startswith("isbi2014/"):
        root, edf = isbi
        data = [f"--data.init_args.root={root}", f"--data.init_args.edf_root={edf}", "--data.init_args.image_size=64"]
        data += SPLIT
    teacher = TEACHER_NOW if "ema_decay" in stack_text(run) else []
    return [*data, *TINY, *teacher]


def test_datamodule_splits_sizes_and_sources(tiny_isbi: tuple[Path, Path], tmp_path: Path) -> None:
    dm = CervicalCellDataModule(
        phantom_num_images=8, phantom_num_unlabeled=2, phantom_size=64, num_val_images=2, num_test_images=1,
        num_labeled=2, unlabeled_batch_size=2, crop_size=48,
    )
    dm.setup("fit")
    ids = lambda samples: {s.image_id for s in samples}  # noqa: E731
    assert len(dm.val_samples) == 2 and len(dm.test_samples) == 1 and len(dm.labeled_samples) == 2
    assert len(dm.unlabeled_samples) == 3 + 2  # the rest of the pool + the extra unlabeled images
    assert not ids(dm.val_samples) & ids(dm.test_samples) and not ids(dm.labeled_samples) & ids(dm.unlabeled_samples)
    assert all(s.num_instances == 0 for s in dm.unlabeled_samples)  # annotations dropped
    batch = next(iter(dm.train_dataloader()))[0]
    (image, target), unlabeled = batch["labeled"][0], batch["unlabeled"]
    assert image.shape == (1, 48, 48) and target["masks"].shape[1:] == (48, 48) and len(unlabeled) == 2
    assert target["boxes"].shape == (len(target["labels"]), 4)
    image, target, image_id = next(iter(dm.val_dataloader()))[0]
    assert image.shape == (1, 64, 64) and image_id in ids(dm.val_samples)
    # ISBI layout + EDF, resized at load; a labeled fraction of the pool.
    root, edf = tiny_isbi
    isbi = CervicalCellDataModule(root=str(root), edf_root=str(edf), image_size=32, labeled_fraction=0.5,
                                  num_val_images=1, num_test_images=0, unlabeled_batch_size=1)
    isbi.setup("fit")
    assert isbi.source_name == "isbi2014" and len(isbi.labeled_samples) == 2
    assert len(isbi.unlabeled_samples) == 2 + 2 and isbi.test_samples == isbi.val_samples
    assert all(s.image.shape == (32, 32) for s in isbi.labeled_samples + isbi.unlabeled_samples)
    # COCO input.
    sample = make_cytology_phantom(1, seed=5, size=40)[0]
    io.imsave(str(tmp_path / "a.png"), (sample.image * 255).astype(np.uint8), check_contrast=False)
    io.imsave(str(tmp_path / "b.png"), (sample.image * 255).astype(np.uint8), check_contrast=False)
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "categories": [{"id": 1, "name": "cytoplasm"}, {"id": 2, "name": "nucleus"}],
        "annotations": [{"id": 1, "image_id": i, "category_id": 1, "segmentation": [[5, 5, 30, 5, 30, 30, 5, 30]]}
                        for i in (1, 2)],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    dm_coco = CervicalCellDataModule(coco_json=str(tmp_path / "coco.json"), num_val_images=1)
    dm_coco.setup("fit")
    assert dm_coco.labeled_samples[0].num_instances == 1 and not dm_coco.has_unlabeled
    with pytest.raises(DataError, match="held out"):
        CervicalCellDataModule(phantom_num_images=3, num_val_images=2, num_test_images=1).setup("fit")
    with pytest.raises(DataError, match="no unlabeled image"):
        dm = CervicalCellDataModule(phantom_num_images=4, phantom_size=64, num_val_images=1, unlabeled_batch_size=2)
        dm.setup("fit")
    with pytest.raises(ValueError, match="not both"):
        CervicalCellDataModule(root="x", coco_json="y")


@pytest.mark.parametrize("run", instance_runs())
def test_every_instance_stack_fast_dev_run(run: str, tiny_isbi: tuple[Path, Path], in_tmp_cwd: Path) -> None:
    text = stack_text(run)
    assert "monitor: val/aji_mean" in text
    cli = run_cli(["fit", *stack(run), "--trainer.fast_dev_run=true", *tiny_overrides(run, tiny_isbi)])
    assert cli.trainer.state.finished
    metrics = cli.trainer.callback_metrics
    for key in ("val/aji_mean", "val/aji_gated_mean", "val/f1_mean", "val/dice_mean", "train/loss"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["val/aji_mean"]) <= 1.0
    if "ema_decay" in text:  # teacher-student: the unlabeled losses really ran
        assert float(metrics["train/unlabeled_weight"]) > 0
        assert "train/L_unlabeled" in metrics and float(metrics["train/pseudo_labels"]) > 0
    if "MMTPSM" in text:
        assert ("mgd_weight: 0.0" in text) == (float(metrics["train/L_mgd"]) == 0.0)


def test_fit_test_predict_roundtrip_and_nothing_overwritten(in_tmp_cwd: Path) -> None:
    cli = run_cli(
        ["fit", *stack("cytology_phantom/mmt_psm"), "--trainer.max_steps=2", "--trainer.val_check_interval=2",
         *PHANTOM_TINY, *TINY, *TEACHER_NOW]
    )
    run_dir = Path(cli.trainer.log_dir)
    best = cli.trainer.checkpoint_callback.best_model_path
    assert (run_dir / "config.yaml").is_file()
    assert best and Path(best).is_file() and "-aji" in Path(best).name
    assert cli.trainer.checkpoint_callback.monitor == "val/aji_mean"

    test_cli = run_cli(["test", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}"])
    test_dir = Path(test_cli.trainer.log_dir)
    metrics = json.loads((test_dir / "test_metrics.json").read_text())
    assert metrics["method"] == "MMTPSM" and metrics["num_images"] == 1 and metrics["data"] == "phantom"
    expected = {"aji_mean", "aji_gated_mean", "f1_mean", "dice_mean", "map_mean", "aji_cytoplasm", "ap50_nucleus"}
    assert expected <= set(metrics["metrics"])
    rows = (test_dir / "test_cases.csv").read_text().strip().splitlines()
    assert rows[0].startswith("image_id,class,num_gt,num_pred,aji,aji_gated")
    assert len(rows) == 1 + 2  # one test image x (cytoplasm, nucleus)
    # Without a logger results go to default_root_dir; a second run there never overwrites.
    no_logger = ["test", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}", "--trainer.logger=false",
                 f"--trainer.default_root_dir={in_tmp_cwd / 'plain'}"]
    run_cli(no_logger)
    first = (in_tmp_cwd / "plain" / "test_metrics.json").read_text()
    run_cli(no_logger)
    assert (in_tmp_cwd / "plain" / "test_metrics-1.json").is_file()
    assert (in_tmp_cwd / "plain" / "test_cases-1.csv").is_file()
    assert (in_tmp_cwd / "plain" / "test_metrics.json").read_text() == first

    out = in_tmp_cwd / "pred"
    args = ["predict", f"--config={run_dir / 'config.yaml'}", f"--ckpt_path={best}",
            f"--prediction_writer.output_dir={out}", "--model.init_args.predict_score_threshold=0.0"]
    run_cli(args)
    npz = sorted(out.glob("*.npz"))
    assert len(npz) == 1 and (out / f"{npz[0].stem}_overlay.png").is_file()
    with np.load(npz[0]) as f:
        masks, labels, scores = f["masks"], f["labels"], f["scores"]
    assert masks.dtype == bool and masks.shape[1:] == (64, 64) and len(labels) == len(scores) == masks.shape[0]
    assert io.imread(str(out / f"{npz[0].stem}_overlay.png")).shape == (64, 64, 3)
    before = npz[0].stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=npz[0].name):
        run_cli(args)
    assert npz[0].stat().st_mtime_ns == before
