"""Compare detectors on one split: accuracy, a paired bootstrap CI of mAP differences, speed, plots.

:func:`compare` loads every checkpoint (``training.saving.load_model``), runs each model once over the split
(eval mode, no grad, optional CUDA autocast) and scores the per-image detections with the project's
evaluator (``detectors.evaluation``: pycocotools-exact COCO metrics, VOC07/VOC2010 AP@0.5). It writes
``comparison.md``, ``comparison.csv`` (one row per model), ``comparison.json`` (everything, with the settings
and the pairwise differences) and four PNG plots to the output folder, and prints the tables.

Paired bootstrap (:func:`paired_bootstrap`, :func:`bootstrap_maps`): ``B`` resamples of the split's image
indices with replacement, drawn as ``numpy.random.default_rng(seed).integers(0, n, size=(B, n))``; the same
indices serve every model, and a repeated image counts as a separate image. Each resample's mAP is
pycocotools' own, re-accumulated from one per-image matching of each model
(:class:`~detectors.evaluation.ResampledCocoMap`). The 95% interval of ``mAP_A - mAP_B`` is the 2.5..97.5th
percentile of the ``B`` resampled differences (percentile bootstrap); the reported difference is the one
measured on the whole split. An interval that excludes 0 says the ranking is unlikely to be an accident of
which images happen to be in the split. Cost: one COCO matching per model, then ``B`` pycocotools
``accumulate()`` calls per model (about 0.02 s each for 60 images of 100 detections on one CPU core, growing
with images x classes), so ``resamples`` is worth lowering on large splits.

Speed (:func:`measure_speed`): images already on the device (no decoding, no host-to-device copy),
``warmup`` untimed calls, then the median of ``repeats`` timed calls (CUDA synchronised); latency at batch 1
in ms/image, throughput in images/s at the given batch size. Image size is the model's own resize
(``min_size``/``max_size`` of its transform), stated per model in the report.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.progress import Progress, track
from rich.table import Table

from training.saving import atomic_write, load_model

from .evaluation import CocoResult, ResampledCocoMap, coco_evaluate, evaluate_detections

__all__ = ["BootstrapResult", "ModelEntry", "bootstrap_maps", "compare", "difference_interval",
           "load_detectors", "measure_speed", "paired_bootstrap", "resample_indices",
           "run_inference"]  # fmt: skip

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["32", "bf16", "16"]
DETECTOR_TYPES = {"fasterrcnn": "two-stage", "retinanet": "one-stage"}
# evaluator key -> column header (COCO's abbreviations: AP50 = AP at IoU 0.5, APs = small objects, ...)
METRIC_KEYS = {"map": "mAP", "map_50": "AP50", "map_75": "AP75", "map_small": "APs", "map_medium": "APm",
               "map_large": "APl", "mar_100": "AR100", "voc07_ap50": "VOC07 AP50",
               "voc10_ap50": "VOC2010 AP50"}  # fmt: skip
PLOTS = ("pr_curves.png", "ap_vs_iou.png", "per_class_ap.png", "speed_accuracy.png")


# --------------------------------------------------------------------------------------------- bootstrap


@dataclass
class BootstrapResult:
    """``observed``: mAP_A - mAP_B on the whole split; ``low``/``high``: percentile interval of the
    resampled differences ``deltas`` [B] (NaN for a resample without any ground truth)."""

    observed: float
    low: float
    high: float
    resamples: int
    seed: int
    confidence: float
    deltas: np.ndarray = field(repr=False)

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


def resample_indices(num_images: int, resamples: int, seed: int) -> np.ndarray:
    """Indices drawn with replacement, int [resamples, num_images]; row b is resample b of every model."""
    return np.random.default_rng(seed).integers(0, num_images, size=(resamples, num_images))


def bootstrap_maps(
    preds_per_model: Sequence[Sequence[dict]],
    targets: Sequence[dict],
    class_names: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
    step: Callable[[], object] | None = None,
) -> np.ndarray:
    """mAP of every model on every resample (:func:`resample_indices`), float64 [models, resamples].

    ``preds_per_model[m][i]`` and ``targets[i]`` are per-image dicts (``detectors.evaluation``) of image i.
    ``step`` is called after each resample (progress display).
    """
    return _resampled_maps(_evaluators(preds_per_model, targets, class_names), len(targets), resamples, seed,
                           step)  # fmt: skip


def _evaluators(preds_per_model: Sequence[Sequence[dict]], targets: Sequence[dict],
                class_names: Sequence[str]) -> list[ResampledCocoMap]:  # fmt: skip
    if any(len(p) != len(targets) for p in preds_per_model):
        raise ValueError(f"every model needs one prediction dict per image ({len(targets)} images)")
    return [ResampledCocoMap(preds, targets, class_names) for preds in preds_per_model]


def _resampled_maps(evaluators: list[ResampledCocoMap], num_images: int, resamples: int, seed: int,
                    step: Callable[[], object] | None = None) -> np.ndarray:  # fmt: skip
    maps = np.empty((len(evaluators), resamples))
    for b, idx in enumerate(resample_indices(num_images, resamples, seed)):
        for m, evaluator in enumerate(evaluators):
            maps[m, b] = evaluator.map(idx)
        if step is not None:
            step()
    return np.where(maps < 0, math.nan, maps)  # -1: no ground truth in the resample


def difference_interval(
    observed: float, maps_a: np.ndarray, maps_b: np.ndarray, seed: int, confidence: float = 0.95
) -> BootstrapResult:
    """Percentile interval of ``maps_a - maps_b`` (paired: the same resamples) around ``observed``."""
    deltas = np.asarray(maps_a, dtype=np.float64) - np.asarray(maps_b, dtype=np.float64)
    tail = 100 * (1 - confidence) / 2
    low = high = math.nan
    if np.isfinite(deltas).any():
        low, high = (float(v) for v in np.nanpercentile(deltas, [tail, 100 - tail]))
    return BootstrapResult(observed, low, high, len(deltas), seed, confidence, deltas)


def paired_bootstrap(
    preds_a: Sequence[dict],
    preds_b: Sequence[dict],
    targets: Sequence[dict],
    class_names: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap over images of mAP_A - mAP_B (module docstring) for two models' detections."""
    evaluators = _evaluators([preds_a, preds_b], targets, class_names)
    map_a, map_b = (e.map(np.arange(len(targets))) for e in evaluators)
    observed = map_a - map_b if min(map_a, map_b) >= 0 else math.nan
    maps = _resampled_maps(evaluators, len(targets), resamples, seed)
    return difference_interval(observed, maps[0], maps[1], seed, confidence)


# ------------------------------------------------------------------------------------ models, inference


@dataclass
class ModelEntry:
    """One compared checkpoint: its description (``info``), per-image detections, metrics and speed."""

    name: str
    checkpoint: str
    module: torch.nn.Module = field(repr=False)
    info: dict = field(default_factory=dict)
    preds: list[dict] = field(default_factory=list, repr=False)
    metrics: dict[str, float] = field(default_factory=dict)
    coco: CocoResult | None = field(default=None, repr=False)
    latency_ms: float = math.nan
    throughput: float = math.nan


def _describe(name: str, path: str, m: torch.nn.Module) -> dict:
    total, trainable = m.parameter_counts()
    transform = m.model.transform  # torchvision's GeneralizedRCNNTransform: the resize the model applies
    return {"model": name, "checkpoint": path, "class": type(m).__name__,
            "detector": DETECTOR_TYPES.get(getattr(m, "arch", ""), "unknown"),
            "backbone": m.hparams.get("backbone", ""), "params": total, "trainable_params": trainable,
            "min_size": int(transform.min_size[-1]), "max_size": int(transform.max_size)}  # fmt: skip


def _model_names(paths: Sequence[str]) -> list[str]:
    """File stems; when stems repeat, the path parts that tell the files apart (runs/NAME/checkpoints/best.ckpt
    -> NAME)."""
    names = [Path(p).stem for p in paths]
    if len(set(names)) < len(names):
        full = [Path(p).resolve().with_suffix("") for p in paths]
        parts = [f.relative_to(os.path.commonpath(full)).parts for f in full]
        while all(len(q) > 1 for q in parts) and len({q[-1] for q in parts}) == 1:
            parts = [q[:-1] for q in parts]  # drop trailing parts all paths share ("checkpoints/best")
        names = ["/".join(q) or n for q, n in zip(parts, names, strict=True)]
    if len(set(names)) < len(names):  # the same file twice
        names = [f"{n}#{i + 1}" for i, n in enumerate(names)]
    return names


def load_detectors(
    checkpoints: Sequence[str], class_names: Sequence[str], data_name: str
) -> list[ModelEntry]:
    """Load every checkpoint (eval mode, CPU); refuse class lists that differ between models or from data."""
    if not checkpoints:
        raise ValueError("compare needs at least one checkpoint")
    entries: list[ModelEntry] = []
    for name, path in zip(_model_names(checkpoints), map(str, checkpoints), strict=True):
        module = load_model(path, map_location="cpu")
        if not hasattr(module, "class_names") or not hasattr(module, "parameter_counts"):
            raise ValueError(f"{path}: {type(module).__name__} is not a detector (detectors.module)")
        if entries and list(module.class_names) != list(entries[0].module.class_names):
            raise ValueError(
                f"{path}: its class list {list(module.class_names)} differs from {entries[0].checkpoint}'s "
                f"class list {list(entries[0].module.class_names)}; only models trained on the same classes, "
                "in the same order, can be compared"
            )
        entries.append(ModelEntry(name, path, module.eval(), _describe(name, path, module)))
    if list(entries[0].module.class_names) != list(class_names):
        raise ValueError(
            f"{entries[0].checkpoint}: the models' class list {list(entries[0].module.class_names)} differs "
            f"from the class list {list(class_names)} of the data ({data_name}); evaluate on data with the "
            "classes the models were trained on"
        )
    return entries


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(device)


def autocast(device: torch.device, precision: Precision):
    """Mixed precision for inference: torch.autocast on CUDA for "bf16"/"16", nothing for "32"."""
    if precision == "32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a CUDA device; on {device.type} use --precision 32")
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def run_inference(
    entries: Sequence[ModelEntry], loader, device: torch.device, precision: Precision, keep: int
) -> tuple[list[dict], list[torch.Tensor]]:
    """One pass over ``loader``'s ``(images, targets)`` batches, every model on every batch; fills
    ``entry.preds`` (CPU: float32 boxes XYXY pixels and scores, int64 labels). Returns the targets (plain
    CPU tensors) and the first ``keep`` images (CPU) for timing."""
    targets, kept = [], []
    for entry in entries:
        entry.module.to(device)
    for images, batch_targets in track(loader, description="inference", transient=True):
        if len(images) == 0:  # every image of the batch was skipped as unreadable
            continue
        on_device = [im.to(device) for im in images]
        for entry in entries:
            with autocast(device, precision):
                dets = entry.module(on_device)
            entry.preds += [{"boxes": d["boxes"].float().cpu(), "scores": d["scores"].float().cpu(),
                             "labels": d["labels"].long().cpu()} for d in dets]  # fmt: skip
        keys = ("boxes", "labels", "iscrowd", "area", "difficult")
        targets += [{k: t[k].as_subclass(torch.Tensor).cpu() for k in keys if k in t} for t in batch_targets]
        kept += [im.cpu() for im in images[: max(0, keep - len(kept))]]
    return targets, kept


@torch.no_grad()
def measure_speed(
    module: torch.nn.Module, images: Sequence[torch.Tensor], device: torch.device, precision: Precision,
    batch_size: int, warmup: int, repeats: int,
) -> tuple[float, float]:  # fmt: skip
    """(median ms per image at batch 1, images/s at ``batch_size``), ``images`` cycled (module docstring)."""
    imgs = [im.to(device) for im in images]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(size: int) -> float:
        times = []
        for r in range(warmup + repeats):
            batch = [imgs[(r * size + j) % len(imgs)] for j in range(size)]
            sync()
            start = time.perf_counter()
            with autocast(device, precision):
                module(batch)
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times[warmup:])

    return 1000 * seconds(1), batch_size / seconds(batch_size)


# ------------------------------------------------------------------------------------------------ plots


def _class_mean(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis (classes) of the entries > -1 (classes with ground truth); NaN where none."""
    valid = values > -1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, values, 0).sum(-1) / np.where(valid.any(-1), valid.sum(-1), np.nan)


def _figure(path: Path, draw: Callable, size: tuple[float, float]) -> None:
    """``draw(fig)`` on a new Figure rendered by the Agg canvas (no pyplot state, no display); PNG file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="tight")
    FigureCanvasAgg(fig)
    draw(fig)
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)


def plot_pr_curves(entries: Sequence[ModelEntry], path: Path) -> None:
    """Class-averaged interpolated precision vs recall at IoU 0.5 and 0.75 (its mean is AP at that IoU)."""

    def draw(fig):
        for i, iou in enumerate((0.5, 0.75)):
            ax = fig.add_subplot(1, 2, i + 1)
            for e in entries:
                t = int(np.argmin(np.abs(np.asarray(e.coco.iou_thresholds) - iou)))
                curve = _class_mean(e.coco.precision[t, :, :, 0, -1])  # [R, K] -> [R]
                ax.plot(e.coco.rec_thresholds, curve, label=f"{e.name} (AP {_fmt(float(np.mean(curve)))})")
            ax.set(title=f"IoU {iou}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
            ax.legend(fontsize=8)

    _figure(path, draw, (11, 4.5))


def plot_ap_vs_iou(entries: Sequence[ModelEntry], path: Path) -> None:
    """AP at each IoU threshold 0.50:0.05:0.95; the mean of each curve is the model's mAP."""

    def draw(fig):
        ax = fig.add_subplot()
        for e in entries:
            ax.plot(e.coco.iou_thresholds, _class_mean(e.coco.ap_per_iou()), marker="o",
                    label=f"{e.name} (mAP {_fmt(e.metrics['map'])})")  # fmt: skip
        ax.set(xlabel="IoU threshold", ylabel="AP", title="AP vs IoU threshold", ylim=(0, 1.02))
        ax.legend(fontsize=8)

    _figure(path, draw, (6.5, 4.5))


def plot_per_class_ap(entries: Sequence[ModelEntry], class_names: Sequence[str], path: Path) -> None:
    """Grouped bars: COCO AP per class, one bar per model (no bar for a class without ground truth)."""

    def draw(fig):
        ax = fig.add_subplot()
        x, width = np.arange(len(class_names)), 0.8 / len(entries)
        for i, e in enumerate(entries):
            ap = [v if v >= 0 else math.nan for v in (e.metrics[f"ap/{n}"] for n in class_names)]
            ax.bar(x + (i - (len(entries) - 1) / 2) * width, ap, width, label=e.name)
        many = len(class_names) > 8  # long class lists: slanted labels
        ax.set_xticks(x, class_names, rotation=45 if many else 0, ha="right" if many else "center")
        ax.set(ylabel="AP (IoU 0.50:0.95)", title="Per-class AP", ylim=(0, 1.02))
        ax.legend(fontsize=8)

    _figure(path, draw, (max(6.5, 0.3 * len(class_names) * len(entries) + 2), 4.5))


def plot_speed_accuracy(entries: Sequence[ModelEntry], path: Path, setting: str) -> None:
    """mAP against batch-1 latency; circles two-stage, triangles one-stage."""

    def draw(fig):
        ax = fig.add_subplot()
        for e in entries:
            kind, y = e.info["detector"], e.metrics["map"] if e.metrics["map"] >= 0 else math.nan
            marker = {"two-stage": "o", "one-stage": "^"}.get(kind, "s")
            ax.scatter(e.latency_ms, y, marker=marker, s=60, label=f"{e.name} ({kind})")
            ax.annotate(e.name, (e.latency_ms, y), textcoords="offset points", xytext=(5, 5))
        ax.set(xlabel="latency, ms/image (batch 1)", ylabel="mAP", title=f"Speed vs accuracy\n{setting}")
        ax.legend(fontsize=8)

    _figure(path, draw, (6.5, 4.5))


# ------------------------------------------------------------------------------------------------ report


def _atomic_write(path: Path, write: Callable, binary: bool = False) -> None:
    """``write(file)`` through ``training.saving.atomic_write`` (never a half-written report); text is UTF-8."""

    def write_to(f) -> None:
        if binary:
            write(f)
            return
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        write(text)
        text.flush()
        text.detach()  # leave the binary file open for atomic_write's fsync

    atomic_write(path, write_to)


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) or v < 0 else f"{v:.{digits}f}"


def _signed(v: float) -> str:
    return f"{v:+.4f}" if math.isfinite(v) else "n/a"


def _table(title: str, headers: Sequence[str], rows: list[list[str]], left: int = 1) -> Table:
    table = Table(title=title, box=box.SIMPLE, pad_edge=False, collapse_padding=True)  # fits 80 columns
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _tables(rows: list[dict], pairs: list[dict], class_names: Sequence[str], resamples: int) -> list[Table]:
    models = _table(
        "Models", ("model", "detector", "backbone", "params (M)", "min/max size", "ms/image", "images/s"),
        [[r["model"], r["detector"], r["backbone"], f"{r['params'] / 1e6:.2f}",
          f"{r['min_size']}/{r['max_size']}", _fmt(r["latency_ms"], 1), _fmt(r["throughput_ips"], 1)]
         for r in rows], left=3,
    )  # fmt: skip
    accuracy = _table("Accuracy (AP over IoU 0.50:0.95 unless stated; n/a: no ground truth)",
                      ("model", *METRIC_KEYS.values()),
                      [[r["model"], *(_fmt(r[k]) for k in METRIC_KEYS)] for r in rows])  # fmt: skip
    per_class = _table("Per-class AP", ("class", *(r["model"] for r in rows)),
                       [[n, *(_fmt(r[f"ap/{n}"]) for r in rows)] for n in class_names])  # fmt: skip
    diff = _table(
        f"mAP differences A - B: paired bootstrap over images, {resamples} resamples",
        ("A", "B", "mAP A", "mAP B", "A - B", "95% CI", "excludes 0"),
        [[p["a"], p["b"], _fmt(p["map_a"]), _fmt(p["map_b"]), _signed(p["difference"]),
          f"[{_signed(p['ci_low'])}, {_signed(p['ci_high'])}]" if math.isfinite(p["ci_low"]) else "n/a",
          "yes" if p["excludes_zero"] else "no"] for p in pairs], left=2,
    )  # fmt: skip
    return [models, accuracy, per_class, *([diff] if pairs else [])]  # one model: no pairs to compare


def _markdown(tables: list[Table], settings: dict) -> str:
    lines = ["# Detector comparison", "", *(f"- {k.replace('_', ' ')}: {v}" for k, v in settings.items())]
    for table in tables:
        cells = [list(c.cells) for c in table.columns]
        lines += ["", f"## {table.title}", "", "| " + " | ".join(str(c.header) for c in table.columns) + " |",
                  "|" + "---|" * len(cells)]  # fmt: skip
        lines += ["| " + " | ".join(str(col[i]) for col in cells) + " |" for i in range(table.row_count)]
    return "\n".join([*lines, "", "## Plots", "", *(f"![{p}]({p})" for p in PLOTS)]) + "\n"


def _json_safe(value):
    """NaN/inf are not JSON: written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return [_json_safe(v) for v in value] if isinstance(value, list) else value


def write_report(
    folder: Path, entries: Sequence[ModelEntry], pairs: list[dict], settings: dict,
    class_names: Sequence[str], console: Console,
) -> dict:  # fmt: skip
    """comparison.{md,csv,json}, the plots, and the tables on ``console``; returns the JSON content."""
    common = {k: settings[k] for k in ("device", "precision", "batch_size")}
    rows = [{**e.info, **{k: e.metrics[k] for k in METRIC_KEYS},
             **{f"ap/{n}": e.metrics[f"ap/{n}"] for n in class_names},
             "latency_ms": e.latency_ms, "throughput_ips": e.throughput, **common}
            for e in entries]  # fmt: skip
    tables = _tables(rows, pairs, class_names, settings["bootstrap_resamples"])
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "comparison.md", lambda f: f.write(_markdown(tables, settings)))

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    _atomic_write(folder / "comparison.csv", write_csv)
    for row, e in zip(rows, entries, strict=True):  # JSON only: mAP at each IoU threshold (ap_vs_iou.png)
        row["ap_per_iou"] = dict(zip((f"{t:.2f}" for t in e.coco.iou_thresholds),
                                     _class_mean(e.coco.ap_per_iou()).tolist(), strict=True))  # fmt: skip
    report = {"settings": settings, "models": rows, "pairs": pairs, "plots": list(PLOTS)}
    _atomic_write(folder / "comparison.json", lambda f: json.dump(_json_safe(report), f, indent=2))
    plot_pr_curves(entries, folder / PLOTS[0])
    plot_ap_vs_iou(entries, folder / PLOTS[1])
    plot_per_class_ap(entries, class_names, folder / PLOTS[2])
    setting = f"{settings['device']}, precision {settings['precision']}"
    plot_speed_accuracy(entries, folder / PLOTS[3], setting)
    for key, value in settings.items():
        console.print(f"{key.replace('_', ' ')}: {value}", highlight=False)
    for table in tables:
        console.print(table)
    console.print(f"report: {folder}/comparison.md, .csv, .json and {len(PLOTS)} PNG plots", highlight=False)
    return report


def compare(
    checkpoints: Sequence[str],
    data,
    out: str | os.PathLike = "comparison",
    split: Literal["val", "test"] = "val",
    device: Device = "auto",
    precision: Precision = "32",
    batch_size: int | None = None,
    resamples: int = 1000,
    seed: int = 0,
    warmup: int = 3,
    repeats: int = 20,
    console: Console | None = None,
) -> dict:
    """Evaluate ``checkpoints`` on one split of ``data`` (a ``DetectionDataModule``, or a LightningDataModule
    with ``class_names`` and ``(images, targets)`` batches) and write the report to ``out`` (module
    docstring). ``batch_size`` (throughput) defaults to the data's; ``resamples=0`` skips the bootstrap.
    Returns the content of ``comparison.json``."""
    console = console or Console()
    if resamples < 0 or warmup < 0 or repeats < 1:
        raise ValueError(f"need resamples >= 0, warmup >= 0, repeats >= 1; got {resamples}, {warmup}, "
                         f"{repeats}")
    hp = getattr(data, "hparams", {})
    split_name = hp.get("val_split", "val") if split == "val" else hp.get("test_split") or hp.get("val_split")
    data_name = f"{type(data).__name__}(root={hp.get('root', '?')!r}), split {split_name!r}"
    class_names = list(data.class_names)
    entries = load_detectors(checkpoints, class_names, data_name)
    dev = resolve_device(device)
    autocast(dev, precision)  # refuse an unsupported precision before any work
    batch_size = batch_size or int(hp.get("batch_size", 1))
    data.prepare_data()
    data.setup("validate" if split == "val" else "test")
    loader = data.val_dataloader() if split == "val" else data.test_dataloader()
    targets, images = run_inference(entries, loader, dev, precision, keep=batch_size)
    if not targets:
        raise ValueError(f"{data_name}: no images to evaluate")
    for e in entries:
        e.coco = coco_evaluate(e.preds, targets, class_names)
        e.metrics = evaluate_detections(e.preds, targets, class_names, coco=e.coco)  # COCO evaluated once
        speed = measure_speed(e.module, images, dev, precision, batch_size, warmup, repeats)
        e.latency_ms, e.throughput = speed
    maps = np.full((len(entries), 0), math.nan)
    if resamples:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("bootstrap", total=resamples)
            maps = bootstrap_maps([e.preds for e in entries], targets, class_names, resamples, seed,
                                  step=lambda: progress.advance(task))  # fmt: skip
    pairs = []
    for i, a in enumerate(entries):
        for j, b in enumerate(entries[i + 1 :], i + 1):
            ma, mb = a.metrics["map"], b.metrics["map"]
            ci = difference_interval(ma - mb if min(ma, mb) >= 0 else math.nan, maps[i], maps[j], seed)
            pairs.append({"a": a.name, "b": b.name, "map_a": ma, "map_b": mb, "difference": ci.observed,
                          "ci_low": ci.low, "ci_high": ci.high,
                          "excludes_zero": ci.excludes_zero})  # fmt: skip
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    settings = {
        "data": data_name, "images": len(targets), "classes": ", ".join(class_names),
        "device": f"{dev.type} ({where})", "precision": precision, "batch_size": batch_size,
        "image_size": "; ".join(f"{e.name} {e.info['min_size']}/{e.info['max_size']}" for e in entries)
                      + " (each model's resize, min_size/max_size)",
        "timing": f"median of {repeats} calls after {warmup} warm-up call{'s' * (warmup != 1)}, images already on the device; "
                  f"latency at batch 1, throughput at batch {batch_size}",
        "bootstrap_resamples": resamples, "bootstrap_seed": seed,
        "bootstrap": f"paired over images: {resamples} resamples of the {len(targets)} images with "
                     f"replacement (numpy default_rng({seed})), the same resamples for every model; 95% CI = "
                     "2.5-97.5 percentiles of the resampled mAP differences. A CI excluding 0: the "
                     "difference is unlikely to come from which images happen to be in the split.",
    }  # fmt: skip
    return write_report(Path(out), entries, pairs, settings, class_names, console)


def compare_command(
    checkpoints: list[str],
    data: object,
    out: str = "comparison",
    split: Literal["val", "test"] = "val",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    precision: Literal["32", "bf16", "16"] = "32",
    batch_size: int | None = None,
    resamples: int = 1000,
    seed: int = 0,
    warmup: int = 3,
    repeats: int = 20,
) -> dict:
    """Compare detector checkpoints on one split: metrics, bootstrap CIs of mAP differences, speed, plots.

    Writes OUT/comparison.md, .csv, .json and PNG plots (detectors.compare describes the method).

    Args:
        checkpoints: model files (best.ckpt, last.ckpt, model.save() files) trained on the same classes.
        data: data config in LightningCLI form (class_path + init_args), e.g. configs/data/shapes.yaml;
            override fields with --data.init_args.NAME VALUE.
        out: output folder.
        split: evaluate on the data's val split or its test split.
        device: auto (CUDA when available), cpu or cuda.
        precision: 32, or bf16 / 16 through torch.autocast on CUDA.
        batch_size: batch size of the throughput measurement (default: the data's batch_size).
        resamples: bootstrap resamples of the images (0 skips the confidence intervals).
        seed: seed of the bootstrap resampling.
        warmup: untimed calls before timing.
        repeats: timed calls; their median is reported.
    """
    try:
        return compare(checkpoints, data, out, split, device, precision, batch_size, resamples, seed,
                           warmup, repeats)  # fmt: skip
    except ValueError as e:  # bad input: the message names the file and what is wrong, no traceback
        raise SystemExit(f"train.py compare: error: {e}") from None
