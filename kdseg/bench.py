"""``make bench``: training-step time and peak memory of each method on the same batch, relative
to the supervised method of its family and to its own baseline, and inference throughput; CPU
always, CUDA too when present.

Two families, each timed on its own phantom and printed as its own table (ratios never cross
families; the JSON keeps every run):

- ``semantic``: the 2D U-Net methods on the cardiac phantom (``experiments/phantom``); reference
  ``supervised``; sizes ``--image-size`` / ``--batch-size``; inference in slices/s through
  :func:`~kdseg.networks.inference.predict_volume`.
- ``instance``: the Mask R-CNN methods on the cytology phantom (``experiments/cytology_phantom``);
  reference ``instance_supervised``; sizes ``--instance-image-size`` (the phantom is generated at
  that size, and the detector's ``min_size`` / ``max_size`` are set to it so it does not rescale)
  and ``--instance-batch-size`` (labeled and unlabeled images per step); inference in images/s
  through the evaluated network (``inference_network()``) in eval mode, on the data module's
  held-out phantom images. The detections per image are recorded too: after a few steps from
  scratch the detector's post-processing load (mask head on up to 100 detections per image) is
  not that of a trained one.

Each method runs in its own subprocess (``--one``), so that the peak resident memory (CPU) of one
method is not inflated by another; how one method is measured, on which batch and with which
settings changed, is :mod:`kdseg.bench_measure`'s docstring.

CUDA variants: fp32, bf16 autocast and (semantic family only) bf16 + channels-last; CPU: fp32.
``--variants`` replaces them on every device (e.g. ``32-true bf16-mixed 32-true+cl`` to try bf16
autocast and channels-last on the CPU). Channels-last is skipped for the instance family (see
:mod:`kdseg.bench_measure`).

Results go to ``experiments/results/bench/<device>-<timestamp>.json`` (never overwritten) and are
printed as tables, followed by ACTION stage 3's cost over ``mean_teacher`` on the same batch (the
extra peak memory of its L_unsup + L_anco over mean_teacher's consistency) and, when
``action_no_anco`` (stage 3 with ``anco_weight: 0``) is run too, the cost of L_anco alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from kdseg.bench_measure import bench_one
from kdseg.method_configs import METHOD_CONFIGS, phantom_config
from kdseg.reports import machine, write_new_report

REPO = Path(__file__).resolve().parents[1]

#: method name -> the baseline it is compared with: the methods bench runs, in this order.
BASELINES: dict[str, str] = {
    "supervised": "supervised",
    "mean_teacher": "supervised",
    "ua_mt": "mean_teacher",
    "action_stage3": "mean_teacher",
    "action_no_anco": "mean_teacher",
    "pce": "supervised",
    "scribsd_plus": "pce",
    "scribsd": "pce",
    "dmpls": "pce",
    "ustm": "pce",
    "instance_supervised": "instance_supervised",
    "instance_mean_teacher": "instance_supervised",
    "mmt_psm": "instance_supervised",
}

#: method name -> (phantom config that defines it, the baseline it is compared with).
METHODS: dict[str, tuple[str, str]] = {name: (phantom_config(name), base) for name, base in BASELINES.items()}

#: family -> the method every run of the family is compared with ("x sup" in the table).
FAMILY_REFERENCE: dict[str, str] = {"semantic": "supervised", "instance": "instance_supervised"}


def method_family(name: str) -> str:
    """``semantic`` (U-Net) or ``instance`` (Mask R-CNN)."""
    return METHOD_CONFIGS[name][0]


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
    kind = "cuda" if any(r["device"] == "cuda" for r in results) else "cpu"
    write_new_report(args.out, kind, {"machine": machine(), "settings": vars(args) | {"out": str(args.out)},
                                      "results": results, "table": text})


if __name__ == "__main__":
    main()
