"""``make bench``: training-step time and peak memory of each method on the same batch, relative
to ``supervised``, and inference throughput; CPU always, CUDA too when present.

Each method runs in its own subprocess so that the peak resident memory (CPU) of one method is
not inflated by another; on CUDA the peak is ``torch.cuda.max_memory_allocated``. The extra peak
is measured from the moment model and batch exist, so it is the cost of the training step itself
(activations, gradients, optimizer state, teacher passes).

Results go to ``experiments/results/bench/<device>-<timestamp>.json`` (never overwritten) and are
printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

#: method name -> (phantom config that defines it, the baseline it is compared with).
METHODS: dict[str, tuple[str, str]] = {
    "supervised": ("experiments/phantom/supervised.yaml", "supervised"),
    "mean_teacher": ("experiments/phantom/mean_teacher.yaml", "supervised"),
    "pce": ("experiments/phantom/pce.yaml", "supervised"),
    "scribsd_plus": ("experiments/phantom/scribsd_plus.yaml", "pce"),
    "scribsd": ("experiments/phantom/scribsd.yaml", "pce"),
    "dmpls": ("experiments/phantom/dmpls.yaml", "pce"),
    "ustm": ("experiments/phantom/ustm.yaml", "pce"),
}


def _rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_one(
    config: str, device: str, image_size: int, batch_size: int, steps: int, warmup: int,
    precision: str, channels_last: bool,
) -> dict[str, Any]:
    """Times ``steps`` optimizer steps of one method on one fixed batch."""
    from kdseg.callbacks.ema import ema_update_
    from kdseg.cli import main
    from kdseg.networks.inference import predict_volume

    torch.manual_seed(0)
    cli = main(
        [f"--config={REPO / config}", f"--data.init_args.image_size={image_size}",
         f"--data.init_args.batch_size={batch_size}", "--trainer.logger=false"],
        run=False,
    )
    model, data = cli.model, cli.datamodule
    if getattr(data, "unlabeled_batch_size", 0) > 0:
        data.unlabeled_batch_size = batch_size
    data.augment = False
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))[0]
    model = model.to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)

    def to_device(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.to(device)
            return x.contiguous(memory_format=memory_format) if x.ndim == 4 else x
        if isinstance(x, dict):
            return {k: to_device(v) for k, v in x.items()}
        return x

    batch = to_device(batch)
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1e-3, momentum=0.9)
    autocast = torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                              enabled=precision == "bf16-mixed")
    model.train()

    def step() -> None:
        with autocast:
            loss = model.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(model, "ema_teacher"):
            ema_update_(model.ema_teacher, model.student, 0.99)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss_mib()
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    step_s = (time.perf_counter() - start) / steps
    if device.startswith("cuda"):
        extra_peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        extra_peak = _rss_mib() - base

    # Inference throughput: slices per second through the evaluated network.
    model.eval()
    volume = torch.rand(32, image_size, image_size, device=device)
    with torch.no_grad(), autocast:
        predict_volume(model.inference_network(), volume, image_size, batch_size)
        sync()
        start = time.perf_counter()
        predict_volume(model.inference_network(), volume, image_size, batch_size)
        sync()
    slices_per_s = volume.shape[0] / (time.perf_counter() - start)
    labeled = batch["labeled"]["image"].shape[0]
    unlabeled = batch["unlabeled"]["image"].shape[0] if "unlabeled" in batch else 0
    return {
        "config": config, "device": device, "precision": precision, "channels_last": channels_last,
        "image_size": image_size, "labeled_batch": labeled, "unlabeled_batch": unlabeled,
        "step_s": step_s, "extra_peak_mib": extra_peak, "inference_slices_per_s": slices_per_s,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    variants = [("32-true", False)]
    results = []
    for device in devices:
        device_variants = variants + ([("bf16-mixed", False), ("bf16-mixed", True)] if device == "cuda" else [])
        for precision, channels_last in device_variants:
            for name in args.methods:
                command = [
                    sys.executable, "-m", "kdseg.bench", "--one", METHODS[name][0], "--device", device,
                    "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", precision,
                ] + (["--channels-last"] if channels_last else [])
                print(f"bench: {name} on {device} ({precision}{', channels-last' if channels_last else ''}) ...", flush=True)
                out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                if out.returncode != 0:
                    raise RuntimeError(f"benchmark of {name} failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                result["method"] = name
                results.append(result)
    return results


def _ratio(a: float, b: float | None) -> float:
    return a / b if b else float("nan")


def table(results: list[dict[str, Any]]) -> str:
    """One line per run: absolute numbers, ratios to ``supervised`` and to the method's own
    baseline (``pce`` for the scribble methods, ...), on the same device and precision."""
    lines = [
        f"{'method':<14} {'device':<6} {'precision':<11} {'batch l+u':>9} {'step s':>7} {'x sup':>6} "
        f"{'peak MiB':>9} {'x sup':>6} {'baseline':>12} {'step x':>7} {'peak x':>7} {'infer sl/s':>10}"
    ]

    def find(method: str, like: dict[str, Any]) -> dict[str, Any] | None:
        return next((x for x in results if x["method"] == method and x["device"] == like["device"]
                     and x["precision"] == like["precision"] and x["channels_last"] == like["channels_last"]), None)

    for r in results:
        sup = find("supervised", r)
        base_name = METHODS.get(r["method"], ("", "supervised"))[1]
        base = find(base_name, r)
        r["step_ratio_vs_supervised"] = _ratio(r["step_s"], sup and sup["step_s"])
        r["peak_ratio_vs_supervised"] = _ratio(r["extra_peak_mib"], sup and sup["extra_peak_mib"])
        r["baseline"] = base_name
        r["step_ratio_vs_baseline"] = _ratio(r["step_s"], base and base["step_s"])
        r["peak_ratio_vs_baseline"] = _ratio(r["extra_peak_mib"], base and base["extra_peak_mib"])
        precision = r["precision"] + ("+cl" if r["channels_last"] else "")
        lines.append(
            f"{r['method']:<14} {r['device']:<6} {precision:<11} {str(r['labeled_batch']) + '+' + str(r['unlabeled_batch']):>9} "
            f"{r['step_s']:>7.3f} {r['step_ratio_vs_supervised']:>6.2f} {r['extra_peak_mib']:>9.1f} "
            f"{r['peak_ratio_vs_supervised']:>6.2f} {base_name:>12} {r['step_ratio_vs_baseline']:>7.2f} "
            f"{r['peak_ratio_vs_baseline']:>7.2f} {r['inference_slices_per_s']:>10.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/bench")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="32-true", help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = bench_one(args.one, args.device, args.image_size, args.batch_size, args.steps, args.warmup,
                           args.precision, args.channels_last)
        print(json.dumps(result))
        return
    results = run_all(args)
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    kind = "cuda" if any(r["device"] == "cuda" for r in results) else "cpu"
    path = args.out / f"{kind}-{stamp}.json"
    if path.exists():
        raise FileExistsError(f"{path} exists")
    path.write_text(json.dumps({"machine": machine(), "settings": vars(args) | {"out": str(args.out)}, "results": results,
                                "table": text}, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
