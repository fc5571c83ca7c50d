"""How ``make bench`` measures one method (:func:`bench_one`): training-step time and extra peak
memory on one fixed batch, then inference throughput. :mod:`kdseg.bench` runs it per method,
each in its own subprocess, and prints the tables.

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

On CUDA the peak is ``torch.cuda.max_memory_allocated``, on CPU the peak resident set. The extra
peak is measured from the moment model and batch exist, so it is the cost of the training step
itself (activations, gradients, optimizer state, teacher passes). The step is ``training_step`` +
backward + SGD step (+ the EMA update of the teacher for teacher-student methods).

Channels-last does not apply to the detectors: torchvision's Mask R-CNN re-batches its list of
images into a new contiguous NCHW tensor in its own transform, so only the weights could be
converted and the run would measure a mixed-format network; :func:`bench_one` refuses it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["bench_one", "config_family"]

REPO = Path(__file__).resolve().parents[1]

#: batches of images pushed through the detector for the instance inference throughput (after
#: one untimed batch).
INSTANCE_INFERENCE_BATCHES = 2


@functools.lru_cache(maxsize=None)
def config_family(config: str) -> str:
    """``instance`` for a run of experiments/stacks.yaml whose data module is the cervical-cell
    one, else ``semantic``."""
    import yaml

    from kdseg.cli import stack_layers

    class_path = ""
    for layer in stack_layers(config):  # the last layer that names the data module decides
        data = (yaml.safe_load(layer.read_text()) or {}).get("data") or {}
        class_path = data.get("class_path", class_path) if isinstance(data, dict) else class_path
    return "instance" if class_path.endswith("CervicalCellDataModule") else "semantic"


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
    from kdseg.methods.instance_base import InstanceSegmentationMethod, InstanceTeacherStudentMethod
    from kdseg.networks.mask_rcnn import to_rgb
    from kdseg.networks.inference import predict_volume

    if threads:
        torch.set_num_threads(threads)
    family = config_family(config)
    if family == "instance" and channels_last:
        raise ValueError("channels-last does not apply to the Mask R-CNN methods (see kdseg.bench_measure's docstring)")
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
        if isinstance(model, InstanceTeacherStudentMethod) and "train/L_unlabeled" not in logged:
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
