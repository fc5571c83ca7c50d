"""ACTION's representation head, forward + backward, before (F.interpolate after each projection) and after
(kdseg.networks.resize matrix products; thinner levels upsampled first), interleaved in one process, 1 thread.

    PYTHONPATH=$PWD python experiments/results/bench/cmp_representation_head.py
"""
import time, torch, torch.nn.functional as F
from kdseg.networks.projection_heads import RepresentationHead
torch.set_num_threads(1)
def old_fused(self, features):
    size = features[-1].shape[-2:]; total = None
    for p, f in zip(self.level_projections, features):
        x = p(f)
        if x.shape[-2:] != size: x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        total = x if total is None else total + x
    return total
new_fused = RepresentationHead.fused
for name, chans in (("phantom", [128, 64, 32, 16]), ("cpu", [128, 64, 32, 16, 16])):
    n = len(chans); sizes = [128 // 2**(n-1-i) for i in range(n)]
    torch.manual_seed(0)
    head = RepresentationHead(chans, 64)
    feats = [torch.randn(8, c, s, s, requires_grad=True) for c, s in zip(chans, sizes)]
    g = torch.zeros(8, 64, 128, 128); g.view(-1)[torch.randint(0, g.numel(), (20000,))] = 1.0
    res = {}
    for label, fn in (("old", old_fused), ("new", new_fused), ("old", old_fused), ("new", new_fused)):
        RepresentationHead.fused = fn
        for _ in range(1): head(feats).backward(g)
        t = time.perf_counter()
        for _ in range(4): head(feats).backward(g)
        res.setdefault(label, []).append((time.perf_counter() - t) / 4)
    print(name, {k: [round(v, 3) for v in vs] for k, vs in res.items()})
