"""``make bench``: training-step time and peak memory of each method on the same batch, relative
to the supervised method of its family and to its own baseline, and inference throughput; CPU
always, CUDA too when present.

Two families, each timed on its own phantom and printed as its own table (ratios never cross
families; the JSON keeps every run):

- ``semantic``: the 2D U-Net methods on the cardiac phantom (the ``phantom/*`` runs of ``experiments/stacks.yaml``); reference
  ``supervised``; sizes ``--image-size`` / ``--batch-size``; inference in slices/s through
  :func:`~kdseg.networks.inference.predict_volume`.
- ``instance``: the Mask R-CNN methods on the cytology phantom (the ``cytology_phantom/*`` runs);
  reference ``instance_supervised``; sizes ``--instance-image-size`` (the phantom is generated at
  that size, and the detector's ``min_size`` / ``max_size`` are set to it so it does not rescale)
  and ``--instance-batch-size`` (labeled and unlabeled images per step); inference in images/s
  through the evaluated network (``inference_network()``) in eval mode, on the data module's
  held-out phantom images. The detections per image are recorded too: after a few steps from
  scratch the detector's post-processing load (mask head on up to 100 detections per image) is
  not that of a trained one.

Same batch: every method is built through the real CLI (``main([...], run=False)``) from its
phantom config, and the first batch of each training stream (labeled, unlabeled) is drawn with the
global seed reset to 0 just before that stream's loader is iterated. A stream's batch therefore
depends only on its data settings, not on how many random numbers the model's construction drew
nor on whether the other stream exists: ``mean_teacher``, ``ua_mt`` and ``action_stage3`` see the
same labeled + unlabeled images, and ``supervised`` the same labeled ones (likewise
``instance_supervised`` / ``instance_mean_teacher`` / ``mmt_psm``). Each run records a digest of
its batch's images; ``same_batch_as_baseline`` in the JSON compares them with the baseline's
(images only: the targets may legitimately differ, e.g. scribbles for ``pce``).

Instance teacher-student methods (``instance_mean_teacher``, ``mmt_psm``), so that every timed
step runs the full method (teacher detection, the K teacher views, PSM, MGD), two settings are
changed on the model after it is built:

- warm-up: their unlabeled losses start after ``warmup_steps`` optimizer steps, and outside a
  trainer ``global_step`` is 0, so the bench sets ``warmup_steps = 0``. The unlabeled weight is
  then the ramp-up's first value ``consistency_weight * exp(-5) > 0`` (checked; the weight only
  scales the loss), and the run fails if the unlabeled loss did not run.
- pseudo-labels: a freshly initialised teacher scores no detection at the configs'
  ``pseudo_label_score`` (0.5), which leaves the shared RoIs without positives, PSM without mined
  negatives and MGD without foreground (about 20 % less step time and peak at 128 px than with
  pseudo-labels). ``--instance-pseudo-label-score`` (default 0) replaces it: every detection the
  teacher keeps after its own score threshold and NMS (``box_score_thresh``, at most
  ``box_detections_per_img`` = 100 per image) is a pseudo-label, an upper bound of that work (a
  trained teacher on the phantom keeps a few per image). ``0.5`` restores the configs' value. The
  last step's logged values (``train/pseudo_labels``, ``train/positive_rois``, ...) are kept in
  ``last_step_logs``.

Each method runs in its own subprocess so that the peak resident memory (CPU) of one method is
not inflated by another; on CUDA the peak is ``torch.cuda.max_memory_allocated``. The extra peak
is measured from the moment model and batch exist, so it is the cost of the training step itself
(activations, gradients, optimizer state, teacher passes). The step is ``training_step`` +
backward + SGD step (+ the EMA update of the teacher for teacher-student methods).

CUDA variants: fp32, bf16 autocast and (semantic family only) bf16 + channels-last; CPU: fp32.
``--variants`` replaces them on every device (e.g. ``32-true bf16-mixed 32-true+cl`` to try bf16
autocast and channels-last on the CPU). Channels-last
does not apply to the detectors: torchvision's Mask R-CNN re-batches its list of images into a
new contiguous NCHW tensor in its own transform, so only the weights could be converted and the
run would measure a mixed-format network; it is skipped for the instance family.

Results go to ``experiments/results/bench/<device>-<timestamp>.json`` (never overwritten) and are
printed as tables, followed by ACTION stage 3's cost over ``mean_teacher`` on the same batch (the
extra peak memory of its L_unsup + L_anco over mean_teacher's consistency) and, when
``action_no_anco`` (stage 3 with ``anco_weight: 0``) is run too, the cost of L_anco alone.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
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

#: method name -> (phantom run of experiments/stacks.yaml that defines it, the baseline it is compared with).
METHODS: dict[str, tuple[str, str]] = {
    "supervised": ("phantom/supervised", "supervised"),
    "mean_teacher": ("phantom/mean_teacher", "supervised"),
    "ua_mt": ("phantom/ua_mt", "mean_teacher"),
    "action_stage3": ("phantom/action_stage3", "mean_teacher"),
    "action_no_anco": ("phantom/action_no_anco", "mean_teacher"),
    "pce": ("phantom/pce", "supervised"),
    "scribsd_plus": ("phantom/scribsd_plus", "pce"),
    "scribsd": ("phantom/scribsd", "pce"),
    "dmpls": ("phantom/dmpls", "pce"),
    "ustm": ("phantom/ustm", "pce"),
    "instance_supervised": ("cytology_phantom/supervised", "instance_supervised"),
    "instance_mean_teacher": ("cytology_phantom/mean_teacher", "instance_supervised"),
    "mmt_psm": ("cytology_phantom/mmt_psm", "instance_supervised"),
}

#: family -> the method every run of the family is compared with ("x sup" in the table).
FAMILY_REFERENCE: dict[str, str] = {"semantic": "supervised", "instance": "instance_supervised"}

#: batches of images pushed through the detector for the instance inference throughput (after
#: one untimed batch).
INSTANCE_INFERENCE_BATCHES = 2


@functools.lru_cache(maxsize=None)
def config_family(config: str) -> str:
    """``instance`` for a run whose data module is the cervical-cell one, else ``semantic``."""
    import yaml

    from kdseg.cli import stack_layers

    class_path = ""
    for layer in stack_layers(config):  # the last layer that names the data module decides
        data = (yaml.safe_load(layer.read_text()) or {}).get("data") or {}
        class_path = data.get("class_path", class_path) if isinstance(data, dict) else class_path
    return "instance" if class_path.endswith("CervicalCellDataModule") else "semantic"


def method_family(name: str) -> str:
    return config_family(METHODS[name][0])


def _rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _digest(tensors: list[torch.Tensor]) -> str | None:
    """A short hash of the shapes and values of ``tensors`` (None for no tensor)."""
    if not tensors:
        return None
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


def _first_batch(data: Any) -> dict[str, Any]:
    """The first batch of each training stream, the global seed reset to 0 before each stream is
    iterated (see the module docstring), combined as the training loop's ``CombinedLoader`` does."""
    # StatefulDataLoader's shuffling sampler draws its seed when it is built, not when iterated.
    torch.manual_seed(0)
    loaders = data.train_dataloader()
    iterables = getattr(loaders, "iterables", loaders)
    batch = {}
    for key, loader in iterables.items():
        torch.manual_seed(0)
        batch[key] = next(iter(loader))
    return batch


def _batch_images(batch: dict[str, Any], family: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The labeled and unlabeled images of a training batch, as lists of tensors."""
    if family == "instance":
        return [item[0] for item in batch["labeled"]], list(batch.get("unlabeled") or [])
    unlabeled = [batch["unlabeled"]["image"]] if "unlabeled" in batch else []
    return [batch["labeled"]["image"]], unlabeled


def bench_one(
    config: str, device: str, image_size: int, batch_size: int, steps: int, warmup: int,
    precision: str, channels_last: bool, instance_image_size: int = 256, instance_batch_size: int = 2,
    threads: int | None = None, instance_pseudo_label_score: float | None = 0.0,
) -> dict[str, Any]:
    """Times ``steps`` optimizer steps of one method on one fixed batch (after ``warmup`` steps);
    ``threads``: torch's intra-op CPU threads (None: torch's default);
    ``instance_pseudo_label_score``: replaces the instance teacher's pseudo-label threshold (None:
    the config's; see the module docstring)."""
    from kdseg.callbacks.ema import ema_update_
    from kdseg.cli import main, stack_arguments
    from kdseg.methods.instance_base import InstanceSegmentationMethod, InstanceTeacherStudentMethod, to_rgb
    from kdseg.networks.inference import predict_volume

    if threads:
        torch.set_num_threads(threads)
    family = config_family(config)
    if family == "instance" and channels_last:
        raise ValueError("channels-last does not apply to the Mask R-CNN methods (see kdseg.bench's docstring)")
    torch.manual_seed(0)
    if family == "instance":
        size, batch_size = instance_image_size, instance_batch_size
        overrides = [
            f"--data.init_args.phantom_size={size}", f"--data.init_args.batch_size={batch_size}",
            f"--model.init_args.detector.min_size={size}", f"--model.init_args.detector.max_size={size}",
        ]
    else:
        size = image_size
        overrides = [f"--data.init_args.image_size={size}", f"--data.init_args.batch_size={batch_size}"]
    cli = main([*stack_arguments(config), *overrides, "--trainer.logger=false"], run=False)
    model, data = cli.model, cli.datamodule
    if (family == "instance") != isinstance(model, InstanceSegmentationMethod):
        raise TypeError(f"{config}: {type(model).__name__} with {type(data).__name__} is not a {family} method")
    logged: dict[str, Any] = {}
    if family == "instance":
        # Keep the last step's logged values (pseudo-labels, RoIs, weights): outside a trainer
        # self.log() records nothing. Converted to floats after the timing.
        def log_train(values: dict[str, Any], batch_size: int) -> None:
            logged.clear()
            logged.update(values)

        model.log_train = log_train
    if isinstance(model, InstanceTeacherStudentMethod):
        model.warmup_steps = 0  # time the full method from the first step (see the module docstring)
        if instance_pseudo_label_score is not None:
            model.pseudo_label_score = instance_pseudo_label_score
        if not model.unlabeled_weight(model.global_step) > 0:
            raise RuntimeError(f"{config}: the unlabeled losses would be skipped at step {model.global_step}")
    if getattr(data, "unlabeled_batch_size", 0) > 0:
        data.unlabeled_batch_size = batch_size
    data.augment = False
    data.setup("fit")
    batch = _first_batch(data)
    labeled_images, unlabeled_images = _batch_images(batch, family)
    model = model.to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)

    def to_device(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.to(device)
            return x.contiguous(memory_format=memory_format) if x.ndim == 4 else x
        if isinstance(x, dict):
            return {k: to_device(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(to_device(v) for v in x)
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

    model.eval()
    result: dict[str, Any] = {
        "config": config, "family": family, "device": device, "precision": precision,
        "channels_last": channels_last, "image_size": size, "torch_threads": torch.get_num_threads(),
        "labeled_batch": sum(int(t.shape[0]) for t in labeled_images) if family == "semantic" else len(labeled_images),
        "unlabeled_batch": (sum(int(t.shape[0]) for t in unlabeled_images) if family == "semantic"
                            else len(unlabeled_images)),
        "labeled_digest": _digest(labeled_images), "unlabeled_digest": _digest(unlabeled_images),
        "step_s": step_s, "extra_peak_mib": extra_peak,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if family == "instance":
        result["last_step_logs"] = {k: float(v) for k, v in logged.items()}
        result["pseudo_label_score"] = getattr(model, "pseudo_label_score", None)
        if isinstance(model, InstanceTeacherStudentMethod) and "train/unlabeled" not in logged:
            raise RuntimeError(f"{config}: the unlabeled loss did not run in the timed steps")
        # Inference throughput: images per second through the evaluated detector in eval mode.
        pool = [s.image for s in data.val_samples + data.test_samples + data.labeled_samples]
        images = [torch.from_numpy(pool[i % len(pool)])[None].float().to(device)
                  for i in range(INSTANCE_INFERENCE_BATCHES * batch_size)]
        chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        network = model.inference_network()
        with torch.no_grad(), autocast:
            network(to_rgb(chunks[0]))
            sync()
            start = time.perf_counter()
            detections = [d for chunk in chunks for d in network(to_rgb(chunk))]
            sync()
        result["inference_images_per_s"] = len(images) / (time.perf_counter() - start)
        result["inference_detections_per_image"] = sum(int(d["boxes"].shape[0]) for d in detections) / len(images)
    else:
        # Inference throughput: slices per second through the evaluated network.
        volume = torch.rand(32, size, size, device=device)
        with torch.no_grad(), autocast:
            predict_volume(model.inference_network(), volume, size, batch_size)
            sync()
            start = time.perf_counter()
            predict_volume(model.inference_network(), volume, size, batch_size)
            sync()
        result["inference_slices_per_s"] = volume.shape[0] / (time.perf_counter() - start)
    return result


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
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_variant(text: str) -> tuple[str, bool]:
    """``"32-true"`` / ``"bf16-mixed"``, with ``+cl`` for channels-last -> ``(precision, channels_last)``."""
    precision, _, suffix = text.partition("+")
    if precision not in ("32-true", "bf16-mixed") or suffix not in ("", "cl"):
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected 32-true or bf16-mixed, optionally +cl")
    return precision, suffix == "cl"


def variants_for(device: str, family: str, requested: list[tuple[str, bool]] | None = None) -> list[tuple[str, bool]]:
    """``(precision, channels_last)`` runs of a family on a device (see the module docstring);
    ``requested`` (``--variants``) replaces the device's defaults, channels-last dropped for the
    instance family."""
    if requested is not None:
        return [v for v in requested if family == "semantic" or not v[1]]
    if device != "cuda":
        return [("32-true", False)]
    return [("32-true", False), ("bf16-mixed", False)] + ([("bf16-mixed", True)] if family == "semantic" else [])


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        runs = []
        requested = args.variants
        for precision, channels_last in dict.fromkeys(v for f in FAMILY_REFERENCE
                                                      for v in variants_for(device, f, requested)):
            runs += [(precision, channels_last, name) for name in args.methods
                     if (precision, channels_last) in variants_for(device, method_family(name), requested)]
        for precision, channels_last, name in runs:
            command = [
                sys.executable, "-m", "kdseg.bench", "--one", METHODS[name][0], "--device", device,
                "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
                "--instance-image-size", str(args.instance_image_size),
                "--instance-batch-size", str(args.instance_batch_size),
                "--instance-pseudo-label-score", str(args.instance_pseudo_label_score),
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", precision,
            ]
            command += ["--channels-last"] if channels_last else []
            command += ["--threads", str(args.threads)] if args.threads else []
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


def _same_batch(r: dict[str, Any], base: dict[str, Any] | None) -> bool | None:
    """Whether ``r`` saw its baseline's images (labeled; unlabeled where both have them)."""
    if base is None:
        return None
    same = r.get("labeled_digest") == base.get("labeled_digest")
    if r.get("unlabeled_digest") and base.get("unlabeled_digest"):
        same = same and r["unlabeled_digest"] == base["unlabeled_digest"]
    return same


def _variant(r: dict[str, Any]) -> str:
    return r["precision"] + ("+cl" if r["channels_last"] else "")


def table(results: list[dict[str, Any]]) -> str:
    """One table per family, one line per run: absolute numbers, ratios to the family's
    supervised method (``x sup``) and to the method's own baseline (``pce`` for the scribble
    methods, ``mean_teacher`` for UA-MT and ACTION, ...), on the same device and precision. Then
    ACTION stage 3's cost over ``mean_teacher`` (and, when run, over ``action_no_anco``: L_anco
    alone). Adds the ratios and ``same_batch_as_baseline`` to ``results``."""

    def find(method: str, like: dict[str, Any]) -> dict[str, Any] | None:
        return next((x for x in results if x["method"] == method and x["device"] == like["device"]
                     and x["precision"] == like["precision"] and x["channels_last"] == like["channels_last"]), None)

    lines: list[str] = []
    families = list(dict.fromkeys([*FAMILY_REFERENCE, *(r.get("family", "semantic") for r in results)]))
    for family in families:
        rows = [r for r in results if r.get("family", "semantic") == family]
        if not rows:
            continue
        reference = FAMILY_REFERENCE.get(family, "supervised")
        unit = "img/s" if family == "instance" else "sl/s"
        if lines:
            lines.append("")
        lines.append(f"{family} (x sup: vs {reference}; size {rows[0]['image_size']})")
        lines.append(
            f"{'method':<21} {'device':<6} {'precision':<11} {'batch l+u':>9} {'step s':>7} {'x sup':>6} "
            f"{'peak MiB':>9} {'x sup':>6} {'baseline':>19} {'step x':>7} {'peak x':>7} {'infer ' + unit:>11}"
        )
        for r in rows:
            sup = find(reference, r)
            base_name = METHODS.get(r["method"], ("", reference))[1]
            base = find(base_name, r)
            r["reference"] = reference
            r["step_ratio_vs_supervised"] = _ratio(r["step_s"], sup and sup["step_s"])
            r["peak_ratio_vs_supervised"] = _ratio(r["extra_peak_mib"], sup and sup["extra_peak_mib"])
            r["baseline"] = base_name
            r["step_ratio_vs_baseline"] = _ratio(r["step_s"], base and base["step_s"])
            r["peak_ratio_vs_baseline"] = _ratio(r["extra_peak_mib"], base and base["extra_peak_mib"])
            r["same_batch_as_baseline"] = _same_batch(r, base)
            throughput = r.get("inference_images_per_s" if family == "instance" else "inference_slices_per_s",
                               float("nan"))
            mark = " (other batch!)" if r["same_batch_as_baseline"] is False else ""
            lines.append(
                f"{r['method']:<21} {r['device']:<6} {_variant(r):<11} "
                f"{str(r['labeled_batch']) + '+' + str(r['unlabeled_batch']):>9} "
                f"{r['step_s']:>7.3f} {r['step_ratio_vs_supervised']:>6.2f} {r['extra_peak_mib']:>9.1f} "
                f"{r['peak_ratio_vs_supervised']:>6.2f} {base_name:>19} {r['step_ratio_vs_baseline']:>7.2f} "
                f"{r['peak_ratio_vs_baseline']:>7.2f} {throughput:>11.1f}{mark}"
            )

    summary = []
    for r in results:
        if r["method"] != "action_stage3":
            continue
        for other, what in (("mean_teacher", "ACTION stage 3 (L_sup + L_unsup + L_anco) vs mean_teacher"),
                            ("action_no_anco", "L_anco alone (action_stage3 vs action_no_anco)")):
            o = find(other, r)
            if o is None:
                continue
            same = "same batch" if _same_batch(r, o) else "OTHER batch"
            summary.append(
                f"{what}, {same} {r['labeled_batch']}+{r['unlabeled_batch']} ({r['device']}, {_variant(r)}): "
                f"step {r['step_s']:.3f} vs {o['step_s']:.3f} s (x{_ratio(r['step_s'], o['step_s']):.2f}); "
                f"extra peak {r['extra_peak_mib']:.1f} vs {o['extra_peak_mib']:.1f} MiB "
                f"({r['extra_peak_mib'] - o['extra_peak_mib']:+.1f} MiB, "
                f"x{_ratio(r['extra_peak_mib'], o['extra_peak_mib']):.2f})"
            )
    if summary:
        lines += ["", *summary]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--image-size", type=int, default=128, help="semantic family: slice size")
    parser.add_argument("--batch-size", type=int, default=8, help="semantic family: labeled (and unlabeled) slices")
    parser.add_argument("--instance-image-size", type=int, default=256,
                        help="instance family: phantom image size (the detector does not rescale)")
    parser.add_argument("--instance-batch-size", type=int, default=2,
                        help="instance family: labeled (and unlabeled) images per step")
    parser.add_argument("--instance-pseudo-label-score", type=float, default=0.0,
                        help="instance teacher-student methods: pseudo-label threshold used by the bench "
                             "(0: every kept detection, so that an untrained teacher yields pseudo-labels; "
                             "0.5: the configs' value)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per method (default: torch's, one per core); 1 gives steadier "
                             "numbers on a machine whose cores are busy with other work")
    parser.add_argument("--variants", nargs="+", type=parse_variant, default=None,
                        help="precision variants on every device, e.g. 32-true bf16-mixed 32-true+cl (+cl: "
                             "channels-last, semantic family only); default: 32-true on CPU, 32-true, "
                             "bf16-mixed and bf16-mixed+cl on CUDA")
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/bench")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="32-true", help=argparse.SUPPRESS)
    parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        result = bench_one(args.one, args.device, args.image_size, args.batch_size, args.steps, args.warmup,
                           args.precision, args.channels_last, args.instance_image_size, args.instance_batch_size,
                           args.threads, args.instance_pseudo_label_score)
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
