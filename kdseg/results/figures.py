"""The figures per setting: ``qualitative_<setting>.png`` (two test cases: image, ground truth and
each method's prediction by its tested checkpoint, lowest finished seed with a run folder, made once
by ``kdseg predict`` into ``<out>/figures/<key>/``; a failed prediction leaves its error in the panel) and
``val_dice_curves_<setting>.png`` (validation Dice and the monitor against the last stage's step,
mean over finished seeds and all version folders).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from kdseg.callbacks.prediction_writer import overlay_labels
from kdseg.results.curves import curve_metrics, mean_curve, record_curves, run_curve
from kdseg.reproduce.execute import RunResult, fit_versions
from kdseg.reproduce.spec import Matrix, Setting


def write_figures(figures_dir: Path, matrix: Matrix, results: list[RunResult], cache_dir: Path,
                  warn: Callable[[str], None] = print) -> list[Path]:
    """Both figures for every setting with at least one finished run; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    figures_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for setting in matrix.settings.values():
        mine = [r for r in results if r.plan.setting.name == setting.name and r.has_metrics and r.folder]
        if not mine:
            continue
        # A figure that would leave out finished runs is not redrawn: restored runs keep no checkpoint
        # and older records no curve (kdseg.reproduce.records); the figure already there stays.
        curves_path = figures_dir / f"val_dice_curves_{setting.name}.png"
        if without := [r.plan.label for r in mine if r.status == "restored" and not any(record_curves(r).values())]:
            warn(f"figures: {curves_path.name} not redrawn (kept as it was): no curve in the records of "
                 f"{', '.join(without)}")
        else:
            written.append(curves_figure(curves_path, setting, mine))
        qualitative_path = figures_dir / f"qualitative_{setting.name}.png"
        with_folder = [r for r in mine if r.status != "restored"]
        if lacking := sorted({r.plan.method.label for r in mine} - {r.plan.method.label for r in with_folder}):
            warn(f"figures: {qualitative_path.name} not redrawn (kept as it was): no run folder with a checkpoint "
                 f"for {', '.join(lacking)}")
        else:
            written.append(qualitative_figure(qualitative_path, setting, with_folder, cache_dir, warn))
    return written


def curves_figure(path: Path, setting: Setting, results: list[RunResult]) -> Path:
    import matplotlib.pyplot as plt

    monitors = list(dict.fromkeys(m for r in results for m in curve_metrics(r)))
    fig, axes = plt.subplots(1, len(monitors), figsize=(6.0 * len(monitors), 4.0), squeeze=False)
    for ax, metric in zip(axes[0], monitors):
        for method in setting.methods.values():
            runs = [r for r in results if r.plan.method.name == method.name]
            curves = [c for c in (run_curve(r, metric) for r in runs) if c]
            if not curves:
                continue
            final = runs[0].plan.final
            label = method.label + (f" (stage {final.index}/{final.count})" if final.count > 1 else "")
            ax.plot(*mean_curve(curves), marker="o", markersize=3,
                    label=f"{label}, {len(curves)} seed{'s' if len(curves) > 1 else ''}")
        ax.set(xlabel="training step (last stage)", ylabel=metric,
               title=f"{setting.name}: {metric} on the validation set")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run_config(result: RunResult) -> tuple[Path, Path]:
    """The saved config of the run's newest fit version and the checkpoint its test used."""
    assert result.folder is not None
    configs = [v / "config.yaml" for v in fit_versions(result.folder) if (v / "config.yaml").is_file()]
    if not configs or not result.result.get("checkpoint"):
        raise FileNotFoundError(f"{result.folder}: no saved config or tested checkpoint")
    return configs[-1], relocated_checkpoint(Path(result.result["checkpoint"]), result.folder)


def relocated_checkpoint(recorded: Path, folder: Path) -> Path:
    """The tested checkpoint of the run in ``folder``: ``result.json``'s absolute path, or when the run
    folder was moved (another ``--out``) the same path below ``folder``; else ``recorded`` unchanged."""
    if recorded.exists() or folder.name not in recorded.parts:
        return recorded
    parts = recorded.parts
    below = parts[len(parts) - parts[::-1].index(folder.name):]
    candidate = folder.joinpath(*below)
    return candidate if candidate.exists() else recorded


@contextlib.contextmanager
def _quiet() -> Any:
    """Keeps Lightning's info lines and the CLI's prints of ``kdseg predict`` out of the runner's log."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def predict_once(result: RunResult, cache_dir: Path, extra: list[str]) -> Path:
    """``kdseg predict`` of the tested checkpoint into a new ``cache_dir/<key>/predictions-<n>`` unless
    an earlier call completed one (recorded in ``done``); returns the folder."""
    from kdseg.cli import main

    config, ckpt = _run_config(result)
    target = cache_dir / str(result.plan.final.key)
    done = target / "done"
    if done.is_file():
        return Path(done.read_text().strip())
    target.mkdir(parents=True, exist_ok=True)
    predictions = target / f"predictions-{1 + sum(1 for _ in target.glob('predictions-*'))}"
    with _quiet():
        main([
            "predict", f"--config={config}", f"--ckpt_path={ckpt}", f"--prediction_writer.output_dir={predictions}",
            "--trainer.logger=false", f"--trainer.default_root_dir={target}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *extra,
        ])
    done.write_text(str(predictions))
    return predictions


def _datamodule(config: Path, **changes: Any) -> Any:
    content = yaml.safe_load(config.read_text())
    data = content["data"]
    module, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**(data.get("init_args") or {}), **changes})


def _acdc_cases(first: RunResult, setting: Setting, cache_dir: Path) -> tuple[list[Any], list[str]]:
    """Two test volumes of the first test patient, each at its slice with the most labelled pixels:
    (fixed panels, prediction file name, reader) per case, and the ``kdseg predict`` arguments. A
    panel is an RGB image, a (gray image, row label) pair, or a text."""
    import h5py

    assert first.plan.data is not None
    split_file = cache_dir / f"figure_cases_{setting.name}.txt"
    cache_dir.mkdir(parents=True, exist_ok=True)
    split_file.write_text(f"{first.plan.data.splits['test'][0]}\n")
    # The figure's cases as the predict split: a test_split here would change the data module's protocol.
    dm = _datamodule(_run_config(first)[0], predict_split=str(split_file))
    dm.setup("predict")
    cases = []
    for volume in dm.predict_volumes[:2]:
        label_volume = np.asarray(volume.label)
        z = int(np.argmax((label_volume > 0).reshape(label_volume.shape[0], -1).sum(axis=1)))
        image = np.asarray(volume.image[z], dtype=np.float32)

        def read_volume(file: Path, z: int = z, image: np.ndarray = image) -> np.ndarray:
            with h5py.File(file) as f:
                return overlay_labels(image, np.asarray(f["prediction"][z]))

        cases.append(([(image, f"{volume.case_id} z={z}"), overlay_labels(image, label_volume[z])],
                      f"{volume.case_id}.h5", read_volume))
    return cases, [f"--data.init_args.predict_split={split_file}"]


def _instance_cases(first: RunResult, setting: Setting, cache_dir: Path) -> tuple[list[Any], list[str]]:
    """The first two test images by id, as :func:`_acdc_cases`."""
    from kdseg.callbacks.instance_prediction_writer import overlay_instances, safe_name

    dm = _datamodule(_run_config(first)[0])
    dm.load()
    cases = []
    for sample in sorted(dm.test_samples, key=lambda s: s.image_id)[:2]:
        def read_instances(file: Path, sample: Any = sample) -> np.ndarray:
            with np.load(file) as f:
                return overlay_instances(sample.image, f["masks"], f["labels"])

        cases.append(([(sample.image, str(sample.image_id)),
                       overlay_instances(sample.image, sample.masks, sample.labels)],
                      f"{safe_name(sample.image_id)}.npz", read_instances))
    return cases, []


def _prediction_panel(found: Path | str, filename: str, read: Callable[[Path], np.ndarray]) -> np.ndarray | str:
    """One method's panel: ``read`` of its prediction file, or the text saying why there is none."""
    if isinstance(found, str):
        return found
    file = Path(found) / filename
    return read(file) if file.is_file() else f"no prediction file {file.name}"


def qualitative_figure(path: Path, setting: Setting, results: list[RunResult], cache_dir: Path,
                       warn: Callable[[str], None]) -> Path:
    import matplotlib.pyplot as plt

    methods = [(m.label, min(runs, key=lambda r: r.plan.seed)) for m in setting.methods.values()
               if (runs := [r for r in results if r.plan.method.name == m.name])]  # lowest finished seed
    cases, extra = (_acdc_cases if setting.task == "semantic" else _instance_cases)(methods[0][1], setting, cache_dir)
    predictions: dict[str, Path | str] = {}
    for label, result in methods:  # a method without predictions gets the reason in its panels
        try:
            predictions[label] = predict_once(result, cache_dir, extra)
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            predictions[label] = f"prediction failed: {reason}"
            warn(f"figures: {setting.name} {label}: {predictions[label]}")
    columns = ["image", "ground truth"] + [label for label, _ in methods]
    rows = [[*fixed, *(_prediction_panel(predictions[label], filename, read) for label, _ in methods)]
            for fixed, filename, read in cases]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.4 * len(columns), 2.5 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if isinstance(panel, str):
                ax.text(0.5, 0.5, panel, ha="center", va="center", wrap=True, fontsize=7)
            elif isinstance(panel, tuple):
                ax.imshow(panel[0], cmap="gray", vmin=0, vmax=1)
                ax.set_ylabel(panel[1], fontsize=7)
            else:
                ax.imshow(panel)
            if i == 0:
                ax.set_title(columns[j], fontsize=8)
    fig.suptitle(f"{setting.name}: {setting.title} (tested checkpoints, lowest finished seed)", fontsize=9)
    return _save(fig, path)
