"""Usage: PYTHONPATH=$PWD python experiments/results/bench/cmp_channels_last.py acdc/supervised

channels-last vs default on the cpu profile's network (MobileNetV3-small U-Net, 128 px), one process,
alternating, 1 thread: training step (fwd+bwd+SGD) on a fixed batch of real ACDC slices."""
import sys, time, copy, torch
from kdseg.cli import main, stack_arguments
from kdseg.bench_measure import _first_batch
from kdseg.callbacks.ema import ema_update_
torch.set_num_threads(1)
run = sys.argv[1]
torch.manual_seed(0)
cli = main([*stack_arguments(run), "--config=experiments/budgets/cpu_scribble.yaml", "--data.init_args.batch_size=8",
            "--data.init_args.fallback_val_patients=5", "--trainer.logger=false"] + sys.argv[2:], run=False)
model, data = cli.model, cli.datamodule
if getattr(data, "unlabeled_batch_size", 0) > 0: data.unlabeled_batch_size = 8
data.augment = False; data.setup("fit")
batch = _first_batch(data)
models = {"default": model, "channels_last": copy.deepcopy(model).to(memory_format=torch.channels_last)}
opts = {k: torch.optim.SGD(m.trainable_parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
def step(k):
    m = models[k]; m.train(); loss = m.training_step(batch, 0)
    opts[k].zero_grad(set_to_none=True); loss.backward(); opts[k].step()
    if hasattr(m, "ema_teacher"): ema_update_(m.ema_teacher, m.student, 0.99)
    return float(loss)
times = {k: [] for k in models}
for k in models: step(k); step(k)
for r in range(4):
    for k in models:
        t = time.perf_counter(); step(k); step(k); times[k].append((time.perf_counter() - t) / 2)
print(run, {k: round(sorted(v)[len(v)//2], 3) for k, v in times.items()}, "min:", {k: round(min(v), 3) for k, v in times.items()})
