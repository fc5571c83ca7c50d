"""Interleaved CPU-time comparison of L_anco (head + sampler + loss, forward + backward) before / after,
in one process on the same inputs: old = nn.Conv2d last conv + per-class sampler loop (tests' reference)."""
import time, torch, copy, sys, statistics
sys.path.insert(0, "tests")
torch.set_num_threads(1)
from test_sampler_equivalence import _reference
from kdseg.losses.hard_negative_sampling import HardNegativeSampler
from kdseg.losses.anatomical_contrast import anatomical_contrast_loss
from kdseg.methods.action import RepresentationHead
import torch.nn as nn
torch.manual_seed(0)
B,H,D,C=8,128,256,4
chans=[128,64,32,16]
feats=[torch.randn(B,c,H>>(3-i),H>>(3-i),requires_grad=True) for i,c in enumerate(chans)]
new=RepresentationHead(chans,D)
old=copy.deepcopy(new); conv=nn.Conv2d(D,D,1); conv.load_state_dict(old.out[2].state_dict()); old.out[2]=conv
labels=torch.randint(0,C,(B,H,H)); probs=torch.softmax(torch.randn(B,C,H,H),1); valid=torch.rand(B,H,H)<0.8
sampler=HardNegativeSampler(256,512,0.97,0.5)
def run(head, samp):
    head.zero_grad()
    g=torch.Generator().manual_seed(1)
    t=time.process_time()
    e=head(feats); l=anatomical_contrast_loss(samp(e,g),0.5,reference=e); l.backward()
    return time.process_time()-t
olds=lambda e,g: _reference(sampler,e,labels,probs,valid,g)
news=lambda e,g: sampler(e,labels,probs,valid,generator=g)
parts={"old (dense conv, loop)":(old,olds),"sparse conv only":(new,olds),"sampler only":(old,news),"new (both)":(new,news)}
times={k:[] for k in parts}
for k,(h,s) in parts.items(): run(h,s)
for r in range(int(sys.argv[1]) if len(sys.argv)>1 else 5):
    for k,(h,s) in parts.items(): times[k].append(run(h,s))
for k,v in times.items(): print(f"{k:<24} median {statistics.median(v):.3f} s  min {min(v):.3f} s  n={len(v)}")
