"""Compare detectors on one split: accuracy, a paired bootstrap CI of mAP differences, speed, plots.

:func:`compare` loads every checkpoint (``training.saving.load_model``), runs each model once over the split
(eval mode, no grad, optional CUDA autocast) and scores the per-image detections with the project's
evaluator (``detectors.evaluation``: pycocotools-exact COCO metrics, VOC07/VOC2010 AP@0.5) and counts its
confusion matrix (``detectors.confusion``: predicted against true class at one IoU and score threshold). It
then draws the paired bootstrap of every pair's mAP difference (``detectors.bootstrap``), measures each
model's speed, and writes the report (``detectors.report``: ``comparison.md``, ``.csv``, ``.json``, four PNG
plots and each model's confusion matrix as PNG and CSV in the output folder; the tables printed).
:func:`compare_command` is ``python train.py compare``.

Speed (:func:`measure_speed`): images already on the device (no decoding, no host-to-device copy),
``warmup`` untimed calls, then the median of ``repeats`` timed calls (CUDA synchronised); latency at batch 1
in ms/image, throughput in images/s at the given batch size. Image size is the model's own resize
(``min_size``/``max_size`` of its transform), stated per model in the report.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress, track

from training.errors import BadValueError
from training.saving import load_model

from .bootstrap import bootstrap_maps, difference_interval
from .confusion import Confusion, check_thresholds, confusion_matrix
from .evaluation import CocoResult, coco_evaluate, evaluate_detections
from .report import check_report_folder, write_report

__all__ = ["ModelEntry", "compare", "compare_command", "load_detectors", "measure_speed", "run_inference"]

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["32", "bf16", "16"]
DETECTOR_TYPES = {"fasterrcnn": "two-stage", "retinanet": "one-stage"}


@dataclass
class ModelEntry:
    """One compared checkpoint, filled step by step by :func:`compare` and read by ``detectors.report``.

    ``info``: the report's description (model, checkpoint, class, detector kind, backbone, parameter counts,
    ``min_size``/``max_size``); ``preds``: one dict per image of the split, ``boxes: FloatTensor[D, 4]`` x1 y1
    x2 y2 absolute pixels, ``scores: FloatTensor[D]``, ``labels: Int64Tensor[D]`` in 1..K (CPU);
    ``metrics``: ``detectors.evaluation.evaluate_detections`` keys (-1: no ground truth); ``coco``: the COCO
    evaluation behind them (PR curves, AP per IoU); ``confusion``: its confusion matrix
    (``detectors.confusion``); ``latency_ms`` at batch 1 and ``throughput`` in images/s.
    """

    name: str
    checkpoint: str
    module: torch.nn.Module = field(repr=False)
    info: dict = field(default_factory=dict)
    preds: list[dict] = field(default_factory=list, repr=False)
    metrics: dict[str, float] = field(default_factory=dict)
    coco: CocoResult | None = field(default=None, repr=False)
    confusion: Confusion | None = field(default=None, repr=False)
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
    """File stems; when stems repeat, the path parts that tell the files apart
    (runs/NAME/checkpoints/best.ckpt -> NAME)."""
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
        raise BadValueError("compare needs at least one checkpoint")
    entries: list[ModelEntry] = []
    for name, path in zip(_model_names(checkpoints), map(str, checkpoints), strict=True):
        module = load_model(path, map_location="cpu")
        if not hasattr(module, "class_names") or not hasattr(module, "parameter_counts"):
            raise BadValueError(f"{path}: {type(module).__name__} is not a detector (detectors.module)")
        if entries and list(module.class_names) != list(entries[0].module.class_names):
            raise BadValueError(
                f"{path}: its class list {list(module.class_names)} differs from {entries[0].checkpoint}'s "
                f"class list {list(entries[0].module.class_names)}; only models trained on the same classes, "
                "in the same order, can be compared"
            )
        entries.append(ModelEntry(name, path, module.eval(), _describe(name, path, module)))
    if list(entries[0].module.class_names) != list(class_names):
        raise BadValueError(
            f"{entries[0].checkpoint}: the models' class list {list(entries[0].module.class_names)} differs "
            f"from the class list {list(class_names)} of the data ({data_name}); evaluate on data with the "
            "classes the models were trained on"
        )
    return entries


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(device)


def autocast(device: torch.device, precision: Precision):
    """Mixed precision for inference: torch.autocast on CUDA for "bf16"/"16", nothing for "32"."""
    if precision == "32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise BadValueError(
            f"--precision {precision} needs a CUDA device; on {device.type} use --precision 32"
        )
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
    confusion_score: float = 0.25,
    confusion_iou: float = 0.5,
    console: Console | None = None,
) -> dict:
    """Evaluate ``checkpoints`` on one split of ``data`` (a ``DetectionDataModule``, or a LightningDataModule
    with ``class_names`` and ``(images, targets)`` batches) and write the report to ``out`` (module
    docstring). ``batch_size`` (throughput) defaults to the data's; ``resamples=0`` skips the bootstrap;
    the confusion matrices count detections scoring >= ``confusion_score`` matched at IoU >=
    ``confusion_iou``. Returns the content of ``comparison.json``."""
    console = console or Console()
    if resamples < 0 or warmup < 0 or repeats < 1:
        raise BadValueError(f"need resamples >= 0, warmup >= 0, repeats >= 1; got {resamples}, {warmup}, "
                            f"{repeats}")  # fmt: skip
    check_thresholds(confusion_iou, confusion_score, ("--confusion_iou", "--confusion_score"))
    hp = getattr(data, "hparams", {})
    split_name = hp.get("val_split", "val") if split == "val" else hp.get("test_split") or hp.get("val_split")
    data_name = f"{type(data).__name__}(root={hp.get('root', '?')!r}), split {split_name!r}"
    check_report_folder(Path(out))  # refused before any model is loaded or run, not after the work
    dev = resolve_device(device)
    autocast(dev, precision)  # refuse an unsupported precision before any work
    class_names = list(data.class_names)
    entries = load_detectors(checkpoints, class_names, data_name)
    batch_size = batch_size or int(hp.get("batch_size", 1))
    data.prepare_data()
    data.setup("validate" if split == "val" else "test")
    loader = data.val_dataloader() if split == "val" else data.test_dataloader()
    targets, images = run_inference(entries, loader, dev, precision, keep=batch_size)
    if not targets:
        raise BadValueError(f"{data_name}: no images to evaluate")
    for e in entries:
        e.coco = coco_evaluate(e.preds, targets, class_names)
        e.metrics = evaluate_detections(e.preds, targets, class_names, coco=e.coco)  # COCO evaluated once
        e.confusion = confusion_matrix(e.preds, targets, class_names, confusion_iou, confusion_score)
        e.latency_ms, e.throughput = measure_speed(e.module, images, dev, precision, batch_size, warmup,
                                                   repeats)  # fmt: skip
    maps = np.full((len(entries), 0), math.nan)
    if resamples:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("bootstrap", total=resamples)
            maps = bootstrap_maps([e.preds for e in entries], targets, class_names, resamples, seed,
                                  step=lambda: progress.advance(task))  # fmt: skip
    settings = _settings(data_name, len(targets), class_names, entries, dev, precision, batch_size, warmup,
                         repeats, resamples, seed, confusion_iou, confusion_score)  # fmt: skip
    return write_report(Path(out), entries, _pairs(entries, maps, seed), settings, class_names, console)


def _pairs(entries: Sequence[ModelEntry], maps: np.ndarray, seed: int) -> list[dict]:
    """Every pair A, B (A listed first): mAP_A - mAP_B on the split and its interval from ``maps``
    [models, resamples] (no resamples: NaN interval)."""
    pairs = []
    for i, a in enumerate(entries):
        for j, b in enumerate(entries[i + 1 :], i + 1):
            ma, mb = a.metrics["map"], b.metrics["map"]
            ci = difference_interval(ma - mb if min(ma, mb) >= 0 else math.nan, maps[i], maps[j], seed)
            pairs.append({"a": a.name, "b": b.name, "map_a": ma, "map_b": mb, "difference": ci.observed,
                          "ci_low": ci.low, "ci_high": ci.high,
                          "excludes_zero": ci.excludes_zero})  # fmt: skip
    return pairs


def _settings(
    data_name: str, images: int, class_names: Sequence[str], entries: Sequence[ModelEntry], dev: torch.device,
    precision: Precision, batch_size: int, warmup: int, repeats: int, resamples: int, seed: int,
    confusion_iou: float, confusion_score: float,
) -> dict:  # fmt: skip
    """How the comparison was made, as the report states it (its first lines and ``settings`` in JSON)."""
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    return {
        "data": data_name, "images": images, "classes": ", ".join(class_names),
        "device": f"{dev.type} ({where})", "precision": precision, "batch_size": batch_size,
        "image_size": "; ".join(f"{e.name} {e.info['min_size']}/{e.info['max_size']}" for e in entries)
                      + " (each model's resize, min_size/max_size)",
        "timing": f"median of {repeats} calls after {warmup} warm-up call{'s' * (warmup != 1)}, images "
                  f"already on the device; latency at batch 1, throughput at batch {batch_size}",
        "bootstrap_resamples": resamples, "bootstrap_seed": seed,
        "bootstrap": f"paired over images: {resamples} resamples of the {images} images with "
                     f"replacement (numpy default_rng({seed})), the same resamples for every model; 95% CI = "
                     "2.5-97.5 percentiles of the resampled mAP differences. A CI excluding 0: the "
                     "difference is unlikely to come from which images happen to be in the split.",
        "confusion": f"IoU >= {confusion_iou:g}, score >= {confusion_score:g}; per image, detections by "
                     "descending score take the untaken object of their class with the highest IoU (COCO's "
                     "matching; crowd and difficult objects ignored); a detection that took none and "
                     "overlaps an object of another class counts as wrong class on it (found or not); other "
                     "detections: background false positives; objects neither taken nor overlapped by a "
                     "wrong class: missed",
    }  # fmt: skip


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
    confusion_score: float = 0.25,
    confusion_iou: float = 0.5,
) -> dict:
    """Compare detector checkpoints on one split: metrics, bootstrap CIs of mAP differences, speed, plots,
    confusion matrices.

    Writes OUT/comparison.md, .csv, .json, PNG plots and each model's confusion matrix (confusion_MODEL.png,
    .csv); detectors.compare describes the method, detectors.confusion the matrix.

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
        confusion_score: the confusion matrices count the detections scoring at least this.
        confusion_iou: the IoU at which a detection takes an object in the confusion matrices.
    """
    return compare(checkpoints, data, out, split, device, precision, batch_size, resamples, seed, warmup,
                   repeats, confusion_score, confusion_iou)  # fmt: skip
