"""The one method base (kdseg.methods.method): construction hooks in order, the teacher copying
the heads, one learning-rate schedule, and the evaluators' gather across DDP ranks."""

from __future__ import annotations

import datetime
import math
import os
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdseg.evaluation import InstanceEvaluator, VolumeEvaluator
from kdseg.evaluation.instance import unpack_masks
from kdseg.methods import MMTPSM, NetworkConfig, TeacherStudentMethod
from kdseg.networks.mask_rcnn import DetectorConfig
from kdseg.schedules import warmup_poly

TINY3 = NetworkConfig(encoder_depth=3, decoder_channels=[16, 8, 8])
TINY_DETECTOR = DetectorConfig(
    backbone="resnet18", fpn_channels=16, box_representation_size=32, mask_head_channels=8,
    min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128],
)


class _Probe(TeacherStudentMethod):
    """Records what each construction hook sees."""

    def __init__(self, head_channels: int = 3, **kwargs: Any) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []  # bookkeeping of the probe only
        super().__init__(**kwargs)

    def configure_models(self) -> None:
        self.seen.append(("models", dict(self.hparams)))
        super().configure_models()

    def configure_heads(self, network: nn.Module) -> None:
        self.seen.append(("heads", dict(self.hparams)))
        network.add_head("probe", nn.Conv2d(network.decoder_channels[-1], self.hparams.head_channels, 1))

    def configure_teacher(self) -> None:
        self.seen.append(("teacher", {}))
        super().configure_teacher()


def test_hooks_run_in_order_after_save_hyperparameters_and_the_teacher_copies_the_heads() -> None:
    model = _Probe(head_channels=5, network=TINY3, ema_decay=0.9)
    assert [name for name, _ in model.seen] == ["models", "heads", "teacher"]
    for name, hparams in model.seen[:2]:  # every constructor argument, the subclass's included
        assert hparams["head_channels"] == 5 and hparams["ema_decay"] == 0.9, name
    head, teacher_head = model.student.heads["probe"], model.ema_teacher.heads["probe"]
    assert head.out_channels == teacher_head.out_channels == 5
    torch.testing.assert_close(head.weight, teacher_head.weight, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.ema_teacher.parameters())
    trained = {id(p) for p in model.trainable_parameters()}
    assert id(head.weight) in trained and id(teacher_head.weight) not in trained
    assert model.ema_decay == 0.9 and model.ema_teacher.training is False


def test_instance_teacher_copies_the_mgd_adaptors() -> None:
    model = MMTPSM(detector=TINY_DETECTOR, adaptor_channels=6)
    assert len(model.student.mgd_adaptors) == len(model.ema_teacher.mgd_adaptors) == 5
    assert model.ema_teacher.mgd_adaptors[0].out_channels == 6
    torch.testing.assert_close(
        model.student.mgd_adaptors[0].weight, model.ema_teacher.mgd_adaptors[0].weight, rtol=0, atol=0
    )


def test_warmup_poly_is_both_families_schedule() -> None:
    # Semantic methods: no warm-up, (1 - t / T) ** p.
    assert warmup_poly(0, 10, 0.9) == 1.0
    assert warmup_poly(5, 10, 0.9) == pytest.approx(0.5**0.9)
    assert warmup_poly(12, 10, 0.9) == 0.0
    # Instance methods: linear from the factor to 1, then the poly decay.
    assert warmup_poly(0, 100, 0.9, warmup_steps=10, warmup_factor=1 / 3) == pytest.approx(1 / 3)
    assert warmup_poly(5, 100, 0.9, warmup_steps=10, warmup_factor=1 / 3) == pytest.approx(2 / 3)
    assert warmup_poly(10, 100, 0.9, warmup_steps=10, warmup_factor=1 / 3) == pytest.approx(0.9**0.9)


# ----------------------------------------------------------------------------- DDP gather


def _volume_row(evaluator: VolumeEvaluator, case_id: str, shift: int) -> dict[str, Any]:
    label = torch.zeros(2, 8, 8, dtype=torch.long)
    label[:, 2:6, 2:6] = 1
    batch = {"label": label, "spacing": torch.tensor([1.0, 1.0, 1.0]), "case_id": case_id}
    return evaluator.score(label.roll(shift, dims=-1), batch, surface=False)


def _instance_record(evaluator: InstanceEvaluator, image_id: str) -> None:
    masks = torch.zeros(1, 1, 8, 8)
    masks[0, 0, 1:5, 1:5] = 1.0
    out = {"masks": masks, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    target = {"masks": masks[:, 0] > 0.5, "labels": torch.tensor([1])}
    evaluator.add_batch([out], [(torch.zeros(1, 8, 8), target, image_id)])


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        volumes = VolumeEvaluator(num_classes=2, convention="medpy")
        # A DistributedSampler's padding: rank 1 repeats case "a" of rank 0.
        for case_id, shift in [("c", 0), ("a", 1)] if rank == 0 else [("b", 2), ("a", 1)]:
            volumes.add(_volume_row(volumes, case_id, shift))
        instances = InstanceEvaluator()
        for image_id in ["img0"] if rank == 0 else ["img1", "img0"]:
            _instance_record(instances, image_id)
        summary = instances.accumulate({1: "cell"}, score_threshold=0.5, max_detections=10).compute()
        torch.save({"volumes": volumes.gathered(), "instances": [r[0] for r in instances.gathered()],
                    "masks": unpack_masks(instances.gathered()[0][1]["masks"]), "aji": summary["aji_mean"],
                    "num_images": summary["num_images"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_evaluators_gather_every_rank_once(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for result in ranks:
        assert [row["case_id"] for row in result["volumes"]] == ["a", "b", "c"]
        dice = {row["case_id"]: row["metrics"][1]["dice"] for row in result["volumes"]}
        assert dice["c"] == 1.0 and dice["a"] == pytest.approx(2 * 12 / 32) and dice["b"] == pytest.approx(0.5)
        assert result["instances"] == ["img0", "img1"]
        assert result["masks"].shape == (1, 8, 8) and result["masks"].sum() == 16
        assert int(result["num_images"]) == 2 and math.isclose(result["aji"], 1.0)
    dice = [[row["metrics"][1]["dice"] for row in result["volumes"]] for result in ranks]
    assert dice[0] == dice[1]
    assert np.array_equal(ranks[0]["masks"], ranks[1]["masks"])
