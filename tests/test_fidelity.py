"""Methods against the reference code they cite (issue 13 §1): each test pins a value or a
computation that the cited script uses (file named in the test's docstring)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import STACKS, stack_config

from kdseg.losses.entropy import entropy_map
from kdseg.losses.segmentation import partial_cross_entropy
from kdseg.methods import USTM, NetworkConfig, PartialCEEntropyMinimization
from test_scribble_methods import scribble_batch

REPO = Path(__file__).resolve().parents[1]
TINY4 = NetworkConfig(encoder_depth=4, decoder_channels=[32, 16, 8, 8])


def _init_args(run: str) -> dict:
    return stack_config(run)["model"]["init_args"]



def test_ustm_consistency_ramps_to_one() -> None:
    """WSL4MIS train_weakly_supervised_ustm_2D.py: ``1.0 * sigmoid_rampup(iter // 1000, 60)``."""
    assert USTM(network=TINY4).consistency_weight == 1.0
    for config in ("acdc/ustm", "phantom/ustm"):
        assert _init_args(config)["consistency_weight"] == 1.0, config


def test_pce_em_divides_the_entropy_by_ln_c() -> None:
    """WSL4MIS train_weakly_supervised_pCE_Entropy_Mini_2D.py: ``ce + 0.1 * entropy_loss(p, C=4)``,
    ``entropy_loss`` = mean entropy / ln C (utils/losses.py)."""
    torch.manual_seed(0)
    model = PartialCEEntropyMinimization(network=TINY4)
    model.train()
    batch = scribble_batch()
    loss = model.training_step(batch, 0)
    logits = model.student(batch["labeled"]["image"]).logits
    pce = partial_cross_entropy(logits, batch["labeled"]["target"], 4)
    expected = pce + 0.1 * entropy_map(logits).mean() / math.log(4)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_action_stage3_uses_the_released_weight_and_batch() -> None:
    """ACTION released code/train_2D_action.py: ``loss = k1 * reco_loss + unsup + sup`` with
    ``--k1 0.01``; code/train_2D.sh: ``--batch_size 4`` for both the labeled and unlabeled loader."""
    from kdseg.methods.action import ActionAnatomicalContrast

    assert ActionAnatomicalContrast(network=TINY4).anco_weight == 0.01
    for name in ("action_stage3", "action_no_unsup", "action_no_stage2"):
        assert _init_args(f"acdc/{name}")["anco_weight"] == 0.01, name
    for name in ("action_stage3", "action_no_anco", "action_no_unsup", "action_no_stage2"):
        data = stack_config(f"acdc/{name}")["data"]["init_args"]
        assert (data["batch_size"], data["unlabeled_batch_size"]) == (4, 4), name


def test_detector_optimiser_follows_the_public_mmt_psm_code() -> None:
    """Amandaynzhou/MMT-PSM: warm-up 500 steps from 1/3 (maskrcnn-benchmark defaults.py, not
    overridden), weight decay 1e-4 (configs/pap/e2e_mask_rcnn_R_50_FPN_1x.yaml), no gradient
    clipping (engine/MTtrainer.py). The cpu profile keeps the clipping its tables were run with."""
    import inspect

    from kdseg.methods.instance_base import InstanceSegmentationMethod

    defaults = inspect.signature(InstanceSegmentationMethod.__init__).parameters
    assert defaults["lr_warmup_steps"].default == 500
    assert defaults["lr_warmup_factor"].default == pytest.approx(1 / 3)
    assert defaults["weight_decay"].default == 1e-4
    runs = [run for run in STACKS if run.startswith("isbi2014/")]
    assert runs
    for run in runs:
        text = stack_config(run)
        assert "gradient_clip_val" not in text["trainer"], run
        assert text["model"]["init_args"].get("lr_warmup_steps", 500) == 500, run
    cpu = yaml.safe_load((REPO / "experiments/reproduce/profiles/cpu.yaml").read_text())
    assert "--trainer.gradient_clip_val=10.0" in str(cpu)


def test_encoder_dropout_logits_is_the_network_without_dropout_and_random_with_it() -> None:
    """SSL4MIS / WSL4MIS teachers run in train mode: their encoder dropout (0.05 ... 0.5,
    code/networks/unet.py) makes the T passes differ."""
    from kdseg.losses.uncertainty import encoder_dropout_logits
    from kdseg.methods.ua_mt import UncertaintyAwareMeanTeacher

    torch.manual_seed(0)
    model = UncertaintyAwareMeanTeacher(network=TINY4)
    teacher = model.ema_teacher
    assert not teacher.training
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        plain = teacher(image).logits
        torch.testing.assert_close(encoder_dropout_logits(teacher, image, rates=(0.0,) * 4), plain)
        first, second = encoder_dropout_logits(teacher, image), encoder_dropout_logits(teacher, image)
    assert not torch.allclose(first, plain) and not torch.allclose(first, second)
    with pytest.raises(ValueError, match="dropout rates"):
        encoder_dropout_logits(teacher, image, rates=(0.1, 0.2))


@pytest.mark.parametrize("method", ["ua_mt", "ustm"])
def test_teacher_passes_differ_by_dropout_even_without_input_noise(method: str) -> None:
    """With noise off, the passes of a dropout-free teacher agree (uncertainty = the entropy of one
    pass); SSL4MIS's and WSL4MIS's passes do not, because their teacher's dropout is active."""
    from kdseg.losses.uncertainty import noisy_teacher_passes, predictive_entropy
    from kdseg.methods.ua_mt import UncertaintyAwareMeanTeacher

    torch.manual_seed(0)
    cls = UncertaintyAwareMeanTeacher if method == "ua_mt" else USTM
    model = cls(network=TINY4, noise_std=0.0)
    assert model.teacher_dropout
    image = torch.rand(2, 1, 32, 32)
    _, uncertainty = noisy_teacher_passes(model.teacher_pass, image, 4, 0.0, 0.0)
    with torch.no_grad():
        single = predictive_entropy(torch.softmax(model.teacher_forward(image).logits, 1)[None])
    assert (uncertainty - single).abs().max() > 1e-3
    model.teacher_dropout = False
    _, uncertainty = noisy_teacher_passes(model.teacher_pass, image, 4, 0.0, 0.0)
    torch.testing.assert_close(uncertainty, single, rtol=1e-4, atol=1e-5)


def test_ua_mt_threshold_scale_is_ln_2() -> None:
    """SSL4MIS train_uncertainty_aware_mean_teacher_2D.py: ``(0.75 + 0.25 * ramp) * np.log(2)``."""
    from kdseg.methods.ua_mt import UncertaintyAwareMeanTeacher

    assert UncertaintyAwareMeanTeacher(network=TINY4).max_entropy == pytest.approx(math.log(2))
    for config in ("acdc/ua_mt", "phantom/ua_mt"):
        assert _init_args(config)["max_entropy"] == pytest.approx(math.log(2)), config


def test_dmpls_auxiliary_dropout_zeroes_whole_channels() -> None:
    """WSL4MIS code/networks/unet.py UNet_CCT: ``torch.nn.functional.dropout2d(x, p=0.5)`` on every
    encoder feature before the auxiliary decoder: channel-wise, not element-wise."""
    from kdseg.methods import DMPLS

    torch.manual_seed(0)
    aux = DMPLS(network=TINY4).student.heads["aux_decoder"]
    aux.train()
    features = torch.ones(4, 64, 8, 8)
    dropped = aux.dropout(features)
    per_channel = dropped.flatten(2)
    # every channel map is either all zero or all 1 / (1 - p) = 2
    assert torch.all((per_channel == 0).all(-1) | (per_channel == 2).all(-1))
    zero_fraction = (per_channel == 0).all(-1).float().mean().item()
    assert 0.35 < zero_fraction < 0.65
