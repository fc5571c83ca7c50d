"""Run WSL4MIS's pCE script (or SSL4MIS's fully supervised script) unmodified on kdseg's ACDC split, on CPU.

Peer-parity check of issue 16 §2. Nothing of the reference code is copied here: this script
(a) writes the shared ACDC volumes into the folder layout the reference dataloader reads, and
(b) executes the reference training script from an exported work tree of its repository with
the few process-level patches a one-core CPU run needs, listed in ``patch_environment``.

Split (kdseg's cpu profile, ``val_patients: 5``, kdseg/data/protocol.py "train-holdout"): the first
65 patients of ``splits/train.txt`` train, the last 5 select the checkpoint and are reported.
``splits/val.txt`` (the cpu profile's test set) is never read.

Usage (one core):
  OMP_NUM_THREADS=1 python experiments/results/parity/run_reference.py wsl4mis-pce \
      --code /work/parity_ref/code --data /work/parity_data/wsl4mis --exp parity_pce
  OMP_NUM_THREADS=1 python experiments/results/parity/run_reference.py ssl4mis-supervised \
      --code /work/parity_ref_ssl/code --data /work/parity_data/ACDC_ssl4mis --exp parity_sup
The work trees come from ``git --git-dir=<mirror> archive <commit> code | tar -x -C <dir>``
(commits named in README.md beside this file).
"""

from __future__ import annotations

import argparse
import collections
import runpy
import sys
import time
import types
from pathlib import Path

import h5py
import numpy as np

SHARED = Path(__file__).resolve().parents[3] / "../shared/data/acdc"
PATCH = 128


def split_patients(root: Path, holdout: int = 5) -> tuple[list[str], list[str]]:
    """(training patients, validation patients): train.txt without / with only its last ``holdout``."""
    patients = [p.strip() for p in (root / "splits" / "train.txt").read_text().split() if p.strip()]
    return patients[:-holdout], patients[-holdout:]


def frames_of(root: Path, patient: str) -> list[Path]:
    return sorted((root / "volumes").glob(f"{patient}_frame*.h5"))


def convert_wsl4mis(root: Path, out: Path, train: list[str], val: list[str]) -> None:
    """WSL4MIS layout (its dataset.py at 3c80991): ACDC_training_slices/<case>_slice_<i>.h5 with
    image/label/scribble per slice, ACDC_training_volumes/<case>.h5 with image/label per frame."""
    slices, volumes = out / "ACDC_training_slices", out / "ACDC_training_volumes"
    slices.mkdir(parents=True, exist_ok=True)
    volumes.mkdir(parents=True, exist_ok=True)
    for patient in train:
        for path in frames_of(root, patient):
            with h5py.File(path, "r") as f:
                image, label, scribble = f["image"][:], f["label"][:], f["scribble"][:]
            for i in range(image.shape[0]):
                with h5py.File(slices / f"{path.stem}_slice_{i}.h5", "w") as g:
                    g["image"], g["label"], g["scribble"] = image[i], label[i], scribble[i]
    for patient in val:
        for path in frames_of(root, patient):
            with h5py.File(path, "r") as f, h5py.File(volumes / path.name, "w") as g:
                g["image"], g["label"], g["scribble"] = f["image"][:], f["label"][:], f["scribble"][:]


def convert_ssl4mis(root: Path, out: Path, train: list[str], val: list[str]) -> None:
    """SSL4MIS layout (its dataset.py): data/slices/<case>_slice_<i>.h5, data/<case>.h5, and the
    lists train_slices.list / val.list (slices in train.txt's patient order, so that its
    patients_to_slices count of 68 slices for 3 patients takes the first 3 patients)."""
    (out / "data" / "slices").mkdir(parents=True, exist_ok=True)
    names = []
    for patient in train:
        for path in frames_of(root, patient):
            with h5py.File(path, "r") as f:
                image, label = f["image"][:], f["label"][:]
            for i in range(image.shape[0]):
                name = f"{path.stem}_slice_{i}"
                with h5py.File(out / "data" / "slices" / f"{name}.h5", "w") as g:
                    g["image"], g["label"] = image[i], label[i]
                names.append(name)
    (out / "train_slices.list").write_text("\n".join(names) + "\n")
    cases = []
    for patient in val:
        for path in frames_of(root, patient):
            with h5py.File(path, "r") as f, h5py.File(out / "data" / path.name, "w") as g:
                g["image"], g["label"] = f["image"][:], f["label"][:]
            cases.append(path.stem)
    (out / "val.list").write_text("\n".join(cases) + "\n")


def patch_environment(val_patch: int | None) -> None:
    """Process-level patches; the reference's training, loss, network and validation code run as published.

    - ``.cuda()`` on tensors and modules returns the object itself (CPU only machine).
    - DataLoader ``num_workers`` forced to 0 and ``pin_memory`` off (one core; the scripts ask for 8 / 16).
    - ``tensorboardX``, ``cv2`` and ``efficientnet_pytorch`` are stand-ins: the scripts only import
      them (SummaryWriter calls become no-ops; the U-Net path uses none of the other two).
    - ``val_patch``: the patch size ``test_single_volume`` resizes to. The scripts call it without
      one, so it infers at its 256x256 default even when training at 128; the runner passes the
      training size (kdseg validates at its training size too) and logs the 256 result beside it.
    """
    import torch
    import torch.utils.data as tud

    torch.set_num_threads(1)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self

    original_loader = tud.DataLoader.__init__

    def loader_init(self, *args, **kwargs):
        kwargs["num_workers"], kwargs["pin_memory"] = 0, False
        kwargs.pop("worker_init_fn", None)
        original_loader(self, *args, **kwargs)

    tud.DataLoader.__init__ = loader_init

    class SummaryWriter:
        def __init__(self, *a, **k):
            pass

        def __getattr__(self, name):
            return lambda *a, **k: None

    sys.modules["tensorboardX"] = types.SimpleNamespace(SummaryWriter=SummaryWriter)
    sys.modules["cv2"] = types.ModuleType("cv2")
    effnet = types.ModuleType("efficientnet_pytorch")
    effnet.EfficientNet = type("EfficientNet", (), {})
    effnet_utils = types.ModuleType("efficientnet_pytorch.utils")
    effnet_utils.get_model_params, effnet_utils.url_map = None, collections.defaultdict(str)
    effnet.utils = effnet_utils
    sys.modules["efficientnet_pytorch"], sys.modules["efficientnet_pytorch.utils"] = effnet, effnet_utils

    if val_patch is not None:
        import logging

        import val_2D

        original_test = val_2D.test_single_volume

        def test_single_volume(image, label, net, classes, patch_size=None):
            at_256 = original_test(image, label, net, classes, patch_size=[256, 256])
            at_train = original_test(image, label, net, classes, patch_size=[val_patch, val_patch])
            logging.info("parity volume dice at %d px: %s; at 256 px: %s", val_patch,
                         [round(float(m[0]), 4) for m in at_train], [round(float(m[0]), 4) for m in at_256])
            return at_train

        val_2D.test_single_volume = test_single_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["wsl4mis-pce", "ssl4mis-supervised"])
    parser.add_argument("--code", type=Path, required=True, help="the reference repository's exported code/ folder")
    parser.add_argument("--data", type=Path, required=True, help="where the converted data goes (outside the repo)")
    parser.add_argument("--exp", default="parity")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=None, help="default: the script's own")
    parser.add_argument("--val-at-256", action="store_true",
                        help="select on the script's own 256 px inference instead of the training size")
    args = parser.parse_args()

    train, val = split_patients(SHARED)
    marker = args.data / "converted.txt"
    if not marker.is_file():
        (convert_wsl4mis if args.which == "wsl4mis-pce" else convert_ssl4mis)(SHARED, args.data, train, val)
        marker.write_text(f"train {len(train)}: {' '.join(train)}\nval {len(val)}: {' '.join(val)}\n")

    code = args.code.resolve()
    sys.path.insert(0, str(code))
    import os

    os.chdir(code)  # the scripts copy '.' and write to ../model relative to code/
    patch_environment(None if args.val_at_256 else PATCH)

    if args.which == "wsl4mis-pce":
        script = code / "train_weakly_supervised_pCE_2D.py"
        argv = ["--root_path", str(args.data.resolve()), "--exp", args.exp, "--fold", "fold1",
                "--sup_type", "scribble", "--model", "unet", "--num_classes", "4",
                "--max_iterations", str(args.iterations), "--batch_size", str(args.batch),
                "--base_lr", str(args.lr)]
        import dataloaders.dataset as dataset

        # The script's folds are fixed 20-patient ranges of ACDC's 100; this run uses kdseg's split.
        dataset.BaseDataSets._get_fold_ids = lambda self, fold: [train, val]
    else:
        script = code / "train_fully_supervised_2D.py"
        argv = ["--root_path", str(args.data.resolve()), "--exp", args.exp, "--model", "unet",
                "--num_classes", "4", "--labeled_num", "3", "--max_iterations", str(args.iterations),
                "--batch_size", str(args.batch), "--base_lr", str(args.lr)]
        if "ACDC" not in str(args.data.resolve()):
            # its patients_to_slices picks the ACDC slice counts (3 patients = 68 slices) by that name
            parser.error(f"{args.data}: the SSL4MIS script needs 'ACDC' in the data path")
        # SSL4MIS's networks/net_factory.py parses sys.argv and builds a Swin config (yacs, einops)
        # when imported; for "unet" its net_factory is UNet(in_chns, class_num).cuda(), so a stand-in
        # module returns the script's own UNet without importing the transformer path.
        from networks.unet import UNet

        def net_factory(net_type: str = "unet", in_chns: int = 1, class_num: int = 3):
            if net_type != "unet":
                raise SystemExit(f"run_reference.py: only --model unet is supported, got {net_type}")
            return UNet(in_chns=in_chns, class_num=class_num)

        sys.modules["networks.net_factory"] = types.SimpleNamespace(net_factory=net_factory)
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]

    # ``--patch_size`` is declared ``type=list`` (a string would become a list of characters):
    # set it after parsing instead.
    original_parse = argparse.ArgumentParser.parse_args

    def parse_args(self, *a, **k):
        parsed = original_parse(self, *a, **k)
        if hasattr(parsed, "patch_size"):
            parsed.patch_size = [PATCH, PATCH]
        return parsed

    argparse.ArgumentParser.parse_args = parse_args
    sys.argv = [str(script)] + argv
    start = time.time()
    runpy.run_path(str(script), run_name="__main__")
    print(f"parity wall time {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
