"""Memory banks under torch.distributed: 2 CPU processes (gloo) end with identical banks."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD = 2
D = 4


def _rank_inputs(rank: int):
    """Different data on each rank. Sampler: B=1, H=1, W=3 with classes [0, 1, rank]."""
    g = torch.Generator().manual_seed(100 + rank)
    flat = torch.randn(3, D, generator=g)  # FeatureMemoryBank rows
    emb = torch.randn(1, D, 1, 3, generator=g)
    labels = torch.tensor([0, 1, rank]).view(1, 1, 3)
    return flat, emb, labels


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    from kdseg.losses.contrastive_distillation import FeatureMemoryBank
    from kdseg.losses.hard_negative_sampling import HardNegativeSampler

    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        flat, emb, labels = _rank_inputs(rank)
        bank = FeatureMemoryBank(dim=D, size=8)
        bank.enqueue(flat)

        sampler = HardNegativeSampler(
            num_queries=2, num_negatives=3, memory_size_per_class=8, num_classes=3,
            embedding_dim=D, memory_push_per_class=8,
        )
        probs = torch.full((1, 3, 1, 3), 1 / 3)
        valid = torch.ones(1, 1, 3, dtype=torch.bool)
        # training-mode forward: samples from the local batch, then the collective update
        samples = sampler(emb, labels, probs, valid, generator=torch.Generator().manual_seed(rank))
        assert len(samples) >= 1
        torch.save(
            {
                "bank": bank.get().clone(),
                "memory": {c: sampler.memory_entries(c).clone() for c in range(3)},
                "counts": sampler.memory_count.clone(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_feature_memory_bank_identical_across_ranks(rank_results):
    expected = F.normalize(torch.cat([_rank_inputs(r)[0] for r in range(WORLD)]), dim=1)
    for result in rank_results:
        assert torch.allclose(result["bank"], expected, atol=1e-6)
    assert torch.equal(rank_results[0]["bank"], rank_results[1]["bank"])


def test_hard_negative_bank_identical_across_ranks(rank_results):
    # class c holds, in rank order, the pixels of class c of every rank (pixel order within)
    expected = {c: [] for c in range(3)}
    for r in range(WORLD):
        _, emb, labels = _rank_inputs(r)
        rows = F.normalize(emb[0, :, 0].T, dim=1)
        for c in range(3):
            expected[c].append(rows[labels.view(-1) == c])
    for result in rank_results:
        assert result["counts"].tolist() == [3, 3, 0]  # rank 0: [0, 1, 0]; rank 1: [0, 1, 1]
        for c in range(3):
            assert torch.allclose(result["memory"][c], torch.cat(expected[c]), atol=1e-6)
    for c in range(3):
        assert torch.equal(rank_results[0]["memory"][c], rank_results[1]["memory"][c])
