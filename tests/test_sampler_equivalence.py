"""HardNegativeSampler's batch-only fast path (one query gather, negatives gathered without the
scatter) against the per-class loop it replaced: same samples bit for bit, same gradients, same
random draws."""

from __future__ import annotations

import torch

from kdseg.losses import hard_negative_sampling as hns
from kdseg.losses.anatomical_contrast import anatomical_contrast_loss


def _reference(sampler: hns.HardNegativeSampler, embeddings, labels, probs, valid, generator):
    """The sampler's forward before the fast path (no memory bank), kept verbatim in substance."""
    num_classes = probs.shape[1]
    b, d, h, w = embeddings.shape
    view = embeddings.flatten(2)
    safe, ok = hns._checked_valid(labels.reshape(-1), valid.reshape(-1), num_classes)
    own = probs.detach().gather(1, safe.view(b, 1, h, w)).reshape(-1)
    with torch.no_grad():
        pools = hns._ClassPools(safe, ok, num_classes)
        rows = embeddings.detach().permute(0, 2, 3, 1).reshape(-1, d)
        row_class = torch.where(ok, safe, torch.full_like(safe, num_classes))
        sums = torch.zeros(num_classes + 1, d).index_add_(0, row_class, rows.float())[:num_classes]
        prototypes = sums / pools.counts.clamp_min(1).unsqueeze(1).float()
        relation = hns.class_relation_weights(prototypes, pools.counts > 0, sampler.temperature)
    queries = hns._select_hard(safe, own, ok, num_classes, sampler.num_queries, sampler.hard_threshold,
                               generator, sampler.fill_with_easy)
    samples = []
    for c, q_idx in queries.items():
        row = relation[c]
        if not bool((row > 0).any()):
            continue
        n_total = q_idx.numel() * sampler.num_negatives
        with torch.no_grad():
            classes = hns._multinomial(row, n_total, generator)
            u = hns._rand(n_total, generator, embeddings.device)
            avail = pools.counts[classes]
            r = torch.minimum((u * avail).long(), avail - 1)
            negatives = torch.empty(n_total, d, dtype=embeddings.dtype)
            bi = (r < pools.counts[classes]).nonzero().flatten()
            negatives[bi] = rows[pools.sorted_idx[pools.offsets[classes[bi]] + r[bi]]]
        samples.append(hns.ContrastSample(c, hns.HardNegativeSampler._gather(view, q_idx), prototypes[c],
                                          negatives.view(q_idx.numel(), sampler.num_negatives, d)))
    return samples


def test_fast_path_equals_per_class_loop() -> None:
    torch.manual_seed(0)
    b, d, h, w, c = 2, 8, 12, 10, 4
    labels = torch.randint(0, c, (b, h, w))
    labels[labels == 2] = 1  # class 2 absent
    probs = torch.softmax(torch.randn(b, c, h, w), 1)
    valid = torch.rand(b, h, w) < 0.8
    sampler = hns.HardNegativeSampler(num_queries=7, num_negatives=5, hard_threshold=0.6)
    base = torch.randn(b, d, h, w)
    results = []
    for run in (_reference, lambda s, *args: s(*args)):
        embeddings = base.clone().requires_grad_()
        generator = torch.Generator().manual_seed(3)
        samples = run(sampler, embeddings, labels, probs, valid, generator)
        loss = anatomical_contrast_loss(samples, 0.5, reference=embeddings)
        loss.backward()
        after = torch.rand(1, generator=generator)  # the same number of draws were consumed
        results.append((samples, loss.detach(), embeddings.grad, after))
    (old, old_loss, old_grad, old_after), (new, new_loss, new_grad, new_after) = results
    assert [s.class_index for s in new] == [s.class_index for s in old] == [0, 1, 3]
    for x, y in zip(old, new):
        assert torch.equal(x.queries, y.queries) and torch.equal(x.negatives, y.negatives)
        assert torch.equal(x.prototype, y.prototype)
    assert torch.equal(old_loss, new_loss) and torch.equal(old_grad, new_grad) and torch.equal(old_after, new_after)
