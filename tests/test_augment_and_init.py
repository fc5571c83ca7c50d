"""The strong perturbation pipeline and initialisation from an earlier run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import TINY_NETWORK, run_cli, stack

from kdseg.data.augment import StrongPerturbation, cutmix, random_erasing
from kdseg.methods import MeanTeacher, NetworkConfig


def test_strong_perturbation_stays_in_range_and_is_seeded() -> None:
    images = torch.rand(6, 1, 32, 32)
    aug = StrongPerturbation(p=1.0)
    a = aug(images, torch.Generator().manual_seed(1))
    b = aug(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, images)
    assert torch.equal(StrongPerturbation(p=0.0, noise_std=0.0)(images), images.clamp(0, 1))


def test_cutmix_mixes_inside_the_box_only() -> None:
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 16, 16).clone()
    mixed, box, perm = cutmix(images, generator=torch.Generator().manual_seed(0))
    for i in range(4):
        assert torch.all(mixed[i, 0][box[i]] == perm[i].float())
        assert torch.all(mixed[i, 0][~box[i]] == float(i))
        assert 0.2 <= box[i].float().mean() <= 0.55


def test_random_erasing_blanks_a_box() -> None:
    images = torch.ones(3, 1, 20, 20)
    erased = random_erasing(images, p=1.0, generator=torch.Generator().manual_seed(0))
    assert all(0 < (erased[i] == 0).sum() < 400 for i in range(3))


def test_init_weights_from_copies_student_into_student_and_teacher(in_tmp_cwd: Path) -> None:
    cli = run_cli(
        ["fit", *stack("phantom/supervised"), "--trainer.max_steps=2",
         "--trainer.val_check_interval=2", "--data.init_args.num_train_patients=3", "--data.init_args.num_val_patients=1",
         "--data.init_args.num_test_patients=1", "--data.init_args.num_slices=2", "--data.init_args.phantom_size=32",
         *TINY_NETWORK]
    )
    ckpt = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    model = MeanTeacher(network=NetworkConfig(encoder_depth=4, decoder_channels=[32, 16, 8, 8]), init_weights_from=str(ckpt))
    model.setup("fit")
    source = cli.model.student.state_dict()
    for key, value in model.student.state_dict().items():
        torch.testing.assert_close(value, source[key], rtol=0, atol=0)
    for key, value in model.ema_teacher.state_dict().items():
        torch.testing.assert_close(value, source[key], rtol=0, atol=0)


def test_clipped_gaussian_noise_is_bounded_and_off_at_zero_std() -> None:
    from kdseg.data.augment import clipped_gaussian_noise

    torch.manual_seed(0)
    images = torch.rand(4, 1, 16, 16)
    noisy = clipped_gaussian_noise(images, std=0.1, clip=0.2)
    difference = noisy - images
    assert difference.abs().max() <= 0.2 + 1e-7 and difference.abs().max() > 0.15  # clipped, not tiny
    assert abs(difference.std().item() - 0.1) < 0.02
    assert clipped_gaussian_noise(images, std=0.0, clip=0.2) is images
