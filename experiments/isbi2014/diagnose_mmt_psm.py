"""Two probes of a teacher-student Mask R-CNN checkpoint (MMT-PSM, detection Mean Teacher).

They produced the measurements behind two choices (see ``InstanceTeacherStudentMethod`` and
``MMTPSM`` docstrings, README "results"):

- ``bn``: validation AJI / mAP of the checkpoint, then again after ``--batches`` gradient-free
  train-mode forwards of the student's backbone on labeled, clean unlabeled and perturbed
  unlabeled views (the state is restored before each). Only BatchNorm running statistics can
  change in those forwards, so a drop isolates what the views do to them.
- ``grad``: on ``--batches`` training batches, the gradient norms (over the student's trainable
  parameters) of ``L_sup``, of ``lambda * w_psm * L_psm`` and of ``lambda * (w_psm * L_psm +
  w_mgd * L_mgd)``, ``lambda`` being the method's ``consistency_weight``.

Usage (a run folder of ``make reproduce-table`` has the resolved config and the checkpoints)::

    python experiments/isbi2014/diagnose_mmt_psm.py bn \\
        --config runs/reproduce/cpu/runs/<run>/resolved_config.yaml \\
        --checkpoint runs/reproduce/cpu/runs/<run>/fit/version_0/checkpoints/<best>.ckpt --batches 20
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

#: Top-level keys of a saved ``fit`` / ``test`` config that belong to the subcommand, not the run.
SUBCOMMAND_KEYS = ("ckpt_path", "weights_only")


def load_method(config: str | Path, checkpoint: str | Path | None, overrides: list[str] | None = None):  # type: ignore[no-untyped-def]
    """``(model, datamodule)`` of a kdseg config (datamodule set up for ``fit``), with the
    checkpoint's weights when given."""
    from kdseg.cli import main

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config not found")
    content = yaml.safe_load(path.read_text())
    if not isinstance(content, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    for key in SUBCOMMAND_KEYS:
        content.pop(key, None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(content, handle)
    cli = main([f"--config={handle.name}", *(overrides or [])], run=False)
    Path(handle.name).unlink()
    model, datamodule = cli.model, cli.datamodule
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["state_dict"])
    datamodule.setup("fit")
    return model, datamodule


def _training_batches(datamodule: Any) -> Iterator[dict[str, Any]]:
    while True:  # the labeled loader is short: start it again
        for batch in datamodule.train_dataloader():
            yield batch[0] if isinstance(batch, tuple) else batch


def validation_scores(model: Any, datamodule: Any) -> dict[str, float]:
    """``aji_mean`` and ``map_mean`` of the model's evaluated network on the validation images."""
    model.eval()
    model.on_validation_epoch_start()
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            model.evaluate_batch(batch, "val")
    metrics, _ = model.summarise(model.evaluator.gathered(), "val")
    return {"aji_mean": metrics["aji_mean"], "map_mean": metrics["map_mean"]}


def probe_batchnorm(model: Any, datamodule: Any, batches: int) -> dict[str, dict[str, float]]:
    """Validation scores before and after ``batches`` gradient-free train-mode student forwards
    of each kind of view (labeled, unlabeled clean, unlabeled perturbed)."""
    from kdseg.networks.mask_rcnn import preprocess

    results = {"checkpoint": validation_scores(model, datamodule)}
    state = copy.deepcopy(model.state_dict())
    for view in ("labeled", "unlabeled_clean", "unlabeled_perturbed"):
        model.load_state_dict(state)
        model.train()
        stream = _training_batches(datamodule)
        with torch.no_grad():
            for _ in range(batches):
                batch = next(stream)
                if view == "labeled":
                    images = [item[0] for item in batch["labeled"]]
                else:
                    images = list(batch["unlabeled"])
                    if view == "unlabeled_perturbed":
                        images = [model.perturb(image) for image in images]
                image_list, _ = preprocess(model.student, images)
                model.student.backbone(image_list.tensors)
        results[f"after_{view}"] = validation_scores(model, datamodule)
    model.load_state_dict(state)
    return results


def probe_gradient_norms(model: Any, datamodule: Any, batches: int) -> list[dict[str, float]]:
    """Per training batch: the loss values and gradient norms of the supervised term and of the
    weighted unlabeled terms (``lambda`` = the method's ``consistency_weight``)."""
    params = model.trainable_parameters()

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))

    model.train()
    lam, w_mgd = float(model.consistency_weight), float(model.mgd_weight)
    stream = _training_batches(datamodule)
    rows = []
    try:
        for _ in range(batches):
            batch = next(stream)
            supervised, _ = model.supervised_loss(batch["labeled"])
            torch.manual_seed(0)  # the same views for both unlabeled terms
            full, logs = model.unlabeled_loss(batch["unlabeled"])
            model.mgd_weight = 0.0
            torch.manual_seed(0)
            psm_only, _ = model.unlabeled_loss(batch["unlabeled"])
            model.mgd_weight = w_mgd
            rows.append({
                "L_sup": float(supervised.detach()), "L_psm": float(logs["train/L_psm"]), "L_mgd": float(logs["train/L_mgd"]),
                "grad_sup": norm(supervised), "grad_psm": norm(lam * psm_only), "grad_unlabeled": norm(lam * full),
            })
    finally:
        model.mgd_weight = w_mgd
    return rows


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("bn", "grad"))
    parser.add_argument("--config", required=True, help="a kdseg config (e.g. a run's resolved_config.yaml)")
    parser.add_argument("--checkpoint", default=None, help="weights to load (default: the config's initial weights)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args, overrides = parser.parse_known_args(argv)  # the rest: kdseg CLI arguments (--key=value)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, datamodule = load_method(args.config, args.checkpoint, overrides)
    if args.probe == "bn":
        result: Any = probe_batchnorm(model, datamodule, args.batches)
    else:
        if not hasattr(model, "mgd_weight"):
            raise SystemExit("the grad probe needs an MMT-PSM model")
        result = probe_gradient_norms(model, datamodule, args.batches)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
