"""Shared fixtures: tiny data on disk in the ACDC layout, the real data when present, and a
helper that runs the real ``kdseg`` CLI entry point in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from kdseg.data.phantom import make_phantom_volumes, write_acdc_like

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_ACDC = REPO.parent / "shared" / "data" / "acdc"
SHARED_ISBI = REPO.parent / "shared" / "data" / "isbi2014"
#: The reproduction's declared files, and the environment of its subprocesses (one thread each).
MATRIX = REPO / "experiments" / "reproduce" / "matrix.yaml"
PAPERS = REPO / "experiments" / "reproduce" / "paper_numbers.yaml"
REPRODUCE_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")

#: CLI overrides that make any segmentation config tiny (32x32 slices, a 4-stage U-Net: the
#: shallowest that still has the 1/8 decoder scale multi-scale methods use).
TINY_NETWORK = [
    "--model.init_args.network.encoder_depth=4",
    "--model.init_args.network.decoder_channels=[32,16,8,8]",
    "--data.init_args.image_size=32",
    "--data.init_args.batch_size=2",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]

#: CLI overrides that make any Mask R-CNN config tiny (64 px, a narrow ResNet-18 FPN) on the CPU.
TINY_DETECTOR = [
    "--model.init_args.detector.backbone=resnet18",
    "--model.init_args.detector.fpn_channels=16",
    "--model.init_args.detector.box_representation_size=32",
    "--model.init_args.detector.mask_head_channels=8",
    "--model.init_args.detector.min_size=64",
    "--model.init_args.detector.max_size=64",
    "--model.init_args.detector.anchor_sizes=[8,16,32,64,128]",
    "--model.init_args.detector.rpn_post_nms_top_n_train=100",
    "--model.init_args.detector.rpn_post_nms_top_n_test=50",
    "--model.init_args.detector.box_detections_per_img=10",
    "--model.init_args.detector.box_batch_size_per_image=32",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]

#: CLI overrides for a tiny instance split (1 val, 1 test, 2 labeled images).
TINY_INSTANCE_SPLIT = [
    "--data.init_args.num_val_images=1",
    "--data.init_args.num_test_images=1",
    "--data.init_args.num_labeled=2",
]
#: CLI overrides that make the built-in cytology phantom tiny: 5 annotated 64 px images (split as
#: TINY_INSTANCE_SPLIT) and 2 extra unlabeled ones.
TINY_CYTOLOGY_PHANTOM = [
    "--data.init_args.phantom_num_images=5",
    "--data.init_args.phantom_num_unlabeled=2",
    "--data.init_args.phantom_size=64",
    *TINY_INSTANCE_SPLIT,
]

requires_acdc = pytest.mark.skipif(
    not (SHARED_ACDC / "volumes").is_dir(), reason=f"real ACDC data not found at {SHARED_ACDC}"
)


@pytest.fixture(scope="session")
def acdc_like_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom volumes written in the layout of ../shared/data/acdc: 6 train, 2 val, 2 test
    patients, 2 frames each, 3 slices of 40x36 (H != W catches transposition mistakes)."""
    root = tmp_path_factory.mktemp("acdc_like")
    volumes = make_phantom_volumes(10, seed=7, num_slices=3, size=(40, 36))
    ids = sorted({v.patient_id for v in volumes})
    return write_acdc_like(root, volumes, {"train": ids[:6], "val": ids[6:8], "test": ids[8:]})


#: Every run's stack of config layers (experiments/stacks.yaml): run name -> layer paths.
STACKS: dict[str, list[str]] = yaml.safe_load((REPO / "experiments" / "stacks.yaml").read_text())


def stack(run: str) -> list[str]:
    """``--config=<layer>`` for each layer of a run of experiments/stacks.yaml, e.g. ``phantom/supervised``."""
    return [f"--config={REPO / layer}" for layer in STACKS[run]]


def _merged(base: dict, layer: dict) -> dict:
    out = dict(base)
    for key, value in layer.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def stack_config(run: str) -> dict:
    """A run's layers merged as the CLI merges them (later layers win, key by key), without the
    class defaults: what the layers themselves say."""
    config: dict = {}
    for layer in STACKS[run]:
        config = _merged(config, yaml.safe_load((REPO / layer).read_text()) or {})
    return config


def run_cli(args: list[str], workdir: Path | None = None):
    """Runs ``kdseg <args>`` through the real entry point (in this process)."""
    from kdseg.cli import main

    if workdir is not None:
        args = args + [f"--trainer.default_root_dir={workdir}"]
    return main(args)


@pytest.fixture()
def in_tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs the test from a fresh folder, so ``runs/`` and ``predictions/`` land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
