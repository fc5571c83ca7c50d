"""torch.profiler table of one method's training step on the cpu profile's network (cpu_scribble layer,
real ACDC slices, fixed batch, 1 thread). The 2026-12-06 figure (README here) came from:

    PYTHONPATH=$PWD python experiments/results/bench/profile_step.py acdc/mean_teacher 128 8 fp32 22
"""
import sys, time, torch
from torch.profiler import profile, ProfilerActivity
from kdseg.cli import main, stack_arguments
from kdseg.bench_measure import _first_batch
from kdseg.callbacks.ema import ema_update_
torch.set_num_threads(1)
config, size, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cl = len(sys.argv) > 4 and "cl" in sys.argv[4]
bf = len(sys.argv) > 4 and "bf16" in sys.argv[4]
torch.manual_seed(0)
cli = main([*stack_arguments(config), "--config=experiments/budgets/cpu_scribble.yaml", "--data.init_args.fallback_val_patients=5", f"--data.init_args.image_size={size}", f"--data.init_args.batch_size={bs}", "--trainer.logger=false"], run=False)
model, data = cli.model, cli.datamodule
if getattr(data, "unlabeled_batch_size", 0) > 0:
    data.unlabeled_batch_size = bs
data.augment = False
data.setup("fit")
batch = _first_batch(data)
mf = torch.channels_last if cl else torch.contiguous_format
model = model.to(memory_format=mf)
def conv(x):
    if isinstance(x, torch.Tensor): return x.contiguous(memory_format=mf) if x.ndim == 4 else x
    if isinstance(x, dict): return {k: conv(v) for k, v in x.items()}
    return x
batch = conv(batch)
opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-3, momentum=0.9)
model.train()
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf):
        loss = model.training_step(batch, 0)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if hasattr(model, "ema_teacher"): ema_update_(model.ema_teacher, model.student, 0.99)
for _ in range(2): step()
t = time.perf_counter()
for _ in range(3): step()
print("step_s", (time.perf_counter() - t) / 3)
with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
    for _ in range(2): step()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=int(sys.argv[5]) if len(sys.argv) > 5 else 25))
