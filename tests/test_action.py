"""ACTION's three stages and UA-MT: configs through the real CLI, the stage chain's weight hand-over,
teacher isolation, and the pieces each loss is built from."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_NETWORK, run_cli, stack
from test_cli import PHANTOM_TINY_DATA, tiny_overrides

from kdseg.cli import main
from kdseg.data.augment import StrongPerturbation
from kdseg.losses.confidence_weighted_ce import confidence_weighted_cross_entropy
from kdseg.methods.action import (
    HEAD_GLOBAL_PROJECTION,
    HEAD_LOCAL_PROJECTION,
    HEAD_REPRESENTATION,
    ActionAnatomicalContrast,
    ActionGlobalDistillation,
    ActionLocalDistillation,
)
from kdseg.methods.base import NetworkConfig
from kdseg.networks.projection_heads import RepresentationHead
from kdseg.losses.uncertainty import masked_softmax_mse, predictive_entropy
from kdseg.methods.ua_mt import UncertaintyAwareMeanTeacher

CONFIG_NAMES = [
    "action_stage1", "action_stage2", "action_stage3", "action_no_stage1", "action_no_stage2",
    "action_no_anco", "action_no_unsup", "ua_mt",
]
#: what each config's training_step must log (the paper's loss terms).
LOGGED = {
    "action_stage1": {"train/L_global"},
    "action_stage2": {"train/L_sup", "train/L_local"},
    "action_no_stage1": {"train/L_sup", "train/L_local"},
    "action_stage3": {"train/L_sup", "train/L_unsup", "train/L_anco"},
    "action_no_stage2": {"train/L_sup", "train/L_unsup", "train/L_anco"},
    "action_no_anco": {"train/L_sup", "train/L_unsup", "train/L_anco"},
    "action_no_unsup": {"train/L_sup", "train/L_unsup", "train/L_anco"},
    "ua_mt": {"train/L_sup", "train/L_cons", "train/uncertainty_threshold"},
}
TINY = NetworkConfig(encoder_depth=3, decoder_channels=[32, 16, 8])


@pytest.mark.parametrize("run", [f"{dataset}/{name}" for dataset in ("phantom", "acdc") for name in CONFIG_NAMES])
def test_stack_fast_dev_run_logs_its_loss_terms(run: str, acdc_like_root: Path, in_tmp_cwd: Path) -> None:
    cli = run_cli(["fit", *stack(run), "--trainer.fast_dev_run=true", *tiny_overrides(run, acdc_like_root)])
    metrics = cli.trainer.callback_metrics
    name = run.split("/")[1]
    assert cli.trainer.state.finished
    assert LOGGED[name] | {"train/loss", "val/dice_mean"} <= set(metrics)
    assert all(math.isfinite(float(metrics[k])) for k in LOGGED[name] | {"train/loss"})
    if name == "action_no_anco":
        assert float(metrics["train/L_anco"]) == 0.0
    if name == "action_no_unsup":
        assert float(metrics["train/L_unsup"]) == 0.0


# -- the stage chain -------------------------------------------------------------------------------
def _phantom(stage: str, *extra: str) -> list[str]:
    return [*stack(f"phantom/{stage}"), *PHANTOM_TINY_DATA, *TINY_NETWORK, *extra]


def _set_up(config: str, init: Path) -> torch.nn.Module:
    """The model of ``config`` as ``kdseg fit`` builds it, after its ``setup("fit")``."""
    cli = main(_phantom(config, f"--model.init_args.init_weights_from={init}"), run=False)
    cli.model.setup("fit")
    return cli.model


def test_stage_chain_hands_on_the_shared_weights(in_tmp_cwd: Path) -> None:
    short = ["--trainer.max_steps=2", "--trainer.val_check_interval=2"]
    stage1 = run_cli(["fit", *_phantom("action_stage1", *short)])
    last1 = Path(stage1.trainer.log_dir) / "checkpoints" / "last.ckpt"
    saved1 = torch.load(last1, map_location="cpu", weights_only=False)["state_dict"]

    model2 = _set_up("action_stage2", last1)
    state2 = model2.state_dict()
    shared = [
        "student.unet.encoder.conv1.weight",
        "ema_teacher.unet.encoder.layer1.0.conv1.weight",
        f"student.heads.{HEAD_GLOBAL_PROJECTION}.mlp.0.weight",
        "global_bank.embeddings",
    ]
    for key in shared:
        torch.testing.assert_close(state2[key], saved1[key], rtol=0, atol=0, msg=key)
    assert int(state2["global_bank.num_filled"]) == int(saved1["global_bank.num_filled"]) > 0
    assert not any(k.startswith(f"student.heads.{HEAD_LOCAL_PROJECTION}") for k in saved1)  # stage 2's own

    stage2 = run_cli(["fit", *_phantom("action_stage2", *short, f"--model.init_args.init_weights_from={last1}")])
    best2 = stage2.trainer.checkpoint_callback.best_model_path
    saved2 = torch.load(best2, map_location="cpu", weights_only=False)["state_dict"]
    assert not torch.equal(saved2["student.unet.encoder.conv1.weight"], saved1["student.unet.encoder.conv1.weight"])

    state3 = _set_up("action_stage3", Path(best2)).state_dict()
    for key in ("student.unet.decoder.blocks.0.conv1.0.weight", "student.unet.segmentation_head.0.weight",
                "ema_teacher.unet.encoder.conv1.weight"):
        torch.testing.assert_close(state3[key], saved2[key], rtol=0, atol=0, msg=key)
    assert any(k.startswith(f"student.heads.{HEAD_REPRESENTATION}") for k in state3)


# -- teacher isolation and what trains -------------------------------------------------------------
def _toy_batch(n: int = 2, size: int = 32) -> dict:
    target = torch.zeros(n, size, size, dtype=torch.long)
    target[:, 6:22, 6:22] = 1
    target[:, 10:18, 10:18] = 2
    target[:, 22:30, 2:10] = 3
    return {
        "labeled": {"image": torch.rand(n, 1, size, size), "target": target},
        "unlabeled": {"image": torch.rand(n, 1, size, size)},
    }


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (ActionGlobalDistillation, {}),
        (ActionLocalDistillation, {"global_weight": 1.0}),
        (ActionAnatomicalContrast, {}),
        (UncertaintyAwareMeanTeacher, {"mc_passes": 2}),
    ],
    ids=["stage1", "stage2", "stage3", "ua_mt"],
)
def test_teacher_gets_no_gradient(cls, kwargs) -> None:
    torch.manual_seed(0)
    model = cls(network=TINY, **kwargs)
    model.train()
    for _ in range(2):  # the second step has anchors in the memory banks
        model.zero_grad(set_to_none=True)
        loss = model.training_step(_toy_batch(), 0)
        loss.backward()
    assert all(p.grad is None for p in model.ema_teacher.parameters())
    trainable = model.trainable_parameters()
    assert trainable and not any(p is q for p in trainable for q in model.ema_teacher.parameters())
    assert sum(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable) > len(trainable) // 2
    if cls is ActionGlobalDistillation:
        # Stage 1 trains the encoder and its heads only; the bank holds this step's teacher embeddings.
        assert all(p.grad is None and not p.requires_grad for p in model.student.unet.decoder.parameters())
        assert len(model.global_bank) == 2 * 2


# -- stage 3 pieces --------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [(12, 6, 3), (12, 3, 2)])  # (12, 3, 2): a level thinner than dim
def test_representation_head_equals_conv_of_concatenated_upsampled_features(channels: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    head = RepresentationHead(list(channels), dim=5)
    features = [torch.randn(2, c, 4 * 2**i, 5 * 2**i) for i, c in enumerate(channels)]
    upsampled = [F.interpolate(f, size=(16, 20), mode="bilinear", align_corners=False) for f in features]
    weight = torch.cat([p.weight for p in head.level_projections], dim=1)
    expected = F.conv2d(torch.cat(upsampled, dim=1), weight)
    torch.testing.assert_close(head.fused(features), expected, rtol=1e-5, atol=1e-5)
    assert head(features).shape == (2, 5, 16, 20)


def test_strong_view_mixes_pseudo_labels_with_the_images() -> None:
    model = ActionAnatomicalContrast(network=TINY, perturbation=StrongPerturbation(p=0.0, noise_std=0.0))
    n = 6
    index = torch.arange(n)
    image = (index.float() / 10)[:, None, None, None].expand(n, 1, 16, 16).clone()
    label = index[:, None, None].expand(n, 16, 16).clone()
    confidence = (index.float() / 100)[:, None, None].expand(n, 16, 16).clone()
    view, mixed_label, mixed_confidence = model.strong_view(image, label, confidence)
    assert torch.equal((view[:, 0] * 10).round().long(), mixed_label)
    torch.testing.assert_close(mixed_confidence, mixed_label.float() / 100)
    assert (mixed_label != label).any()  # something was pasted


def test_unsup_loss_weightings() -> None:
    logits = torch.randn(2, 4, 8, 8)
    pseudo = torch.randint(0, 4, (2, 8, 8))
    confidence = torch.full((2, 8, 8), 0.5)
    confidence[0, :4] = 0.99  # image 0: half its pixels confident; image 1: none
    ce = F.cross_entropy(logits, pseudo, reduction="none")
    fraction = confidence_weighted_cross_entropy(logits, pseudo, confidence, 0.97, "confident_fraction")
    torch.testing.assert_close(fraction, (0.5 * ce[0]).sum() / ce.numel())
    threshold = confidence_weighted_cross_entropy(logits, pseudo, confidence, 0.97, "threshold")
    torch.testing.assert_close(threshold, ce[0, :4].sum() / ce.numel())
    with pytest.raises(ValueError, match="unsup_weighting"):
        ActionAnatomicalContrast(network=TINY, unsup_weighting="soft")


# -- UA-MT -----------------------------------------------------------------------------------------
def test_ua_mt_masks_out_uncertain_pixels() -> None:
    c, t = 4, 8
    mc = torch.zeros(t, 1, c, 1, 3)
    mc[:, 0, 1, 0, 0] = 1.0  # pixel 0: every pass says class 1 -> certain
    mc[:, 0, :, 0, 1] = 1.0 / c  # pixel 1: uniform -> maximal entropy ln(C)
    mc[torch.arange(t), 0, torch.arange(t) % c, 0, 2] = 1.0  # pixel 2: the passes disagree
    entropy = predictive_entropy(mc)
    assert entropy.shape == (1, 1, 1, 3)
    assert entropy[0, 0, 0, 0] == pytest.approx(0.0, abs=1e-4)
    assert entropy[0, 0, 0, 1] == pytest.approx(math.log(c), abs=1e-4)
    assert entropy[0, 0, 0, 2] == pytest.approx(math.log(c), abs=1e-4)

    # H_max = ln 2 whatever C is (SSL4MIS train_uncertainty_aware_mean_teacher_2D.py: np.log(2)).
    model = UncertaintyAwareMeanTeacher(network=TINY, threshold_rampup_steps=100)
    assert model.uncertainty_threshold_at(0) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert model.uncertainty_threshold_at(100) == pytest.approx(math.log(2))
    mask = (entropy < model.uncertainty_threshold_at(0)).float()
    assert mask.flatten().tolist() == [1.0, 0.0, 0.0]

    # Masked pixels do not count: a student wrong only there has zero consistency loss.
    teacher = torch.zeros(1, c, 1, 3)
    teacher[0, 1] = 10.0
    student = teacher.clone()
    student[0, 3, 0, 1:] = 20.0
    assert masked_softmax_mse(student, teacher, mask).item() == 0.0
    student[0, 3, 0, 0] = 20.0
    assert masked_softmax_mse(student, teacher, mask).item() > 0.1


def test_ua_mt_batched_teacher_passes_without_noise_give_the_plain_entropy() -> None:
    torch.manual_seed(0)
    model = UncertaintyAwareMeanTeacher(network=TINY, noise_std=0.0, mc_passes=3, teacher_dropout=False)
    image = torch.rand(2, 1, 32, 32)
    logits, uncertainty = model.teacher_with_uncertainty(image)
    expected_logits = model.teacher_forward(image).logits
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(uncertainty, predictive_entropy(torch.softmax(expected_logits, 1)[None]),
                               rtol=1e-4, atol=1e-5)
