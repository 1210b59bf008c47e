"""The report of a detector comparison: tables, files and plots from the compared models' results.

:func:`write_report` takes the :class:`~detectors.compare.ModelEntry` list that ``detectors.compare.compare``
fills (each model's description, per-image detections, metrics, COCO evaluation and speed), the pairwise
mAP differences with their bootstrap intervals, and the settings, and writes into the output folder:

    comparison.md    the settings, the tables below as markdown, the confusion readings, links to the plots
    comparison.csv   one row per model: description, metrics, per-class AP, speed, device, precision, the
                     shares of its errors (wrong class, background false positives, missed objects)
    comparison.json  {"settings", "models" (the CSV rows plus mAP at each IoU threshold and the confusion
                     matrix), "pairs", "plots"}; NaN written as null
    pr_curves.png, ap_vs_iou.png, per_class_ap.png, speed_accuracy.png
    confusion_MODEL.png, confusion_MODEL.csv   per model: its confusion matrix (``detectors.confusion``),
                     normalised by true class with the counts annotated, and its counts

Tables (printed with rich, and in the markdown): models (detector kind, backbone, parameters, resize, speed),
accuracy (the :data:`METRIC_KEYS` columns), per-class AP, and the mAP differences A - B with their 95%
interval. Every file is written atomically (``training.checkpoint_io.atomic_write``): a report is never half
written. Plots are drawn on matplotlib Figures with the Agg canvas (no pyplot state, no display).
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from training.checkpoint_io import atomic_write
from training.errors import BadFileError, FileTakenError

if TYPE_CHECKING:
    from .compare import ModelEntry
    from .confusion import Confusion

__all__ = ["METRIC_KEYS", "PLOTS", "check_report_folder", "confusion_stems",
           "plot_ap_vs_iou", "plot_confusion", "plot_per_class_ap", "plot_pr_curves",
           "plot_speed_accuracy", "write_report"]  # fmt: skip

# evaluator key -> column header (COCO's abbreviations: AP50 = AP at IoU 0.5, APs = small objects, ...)
METRIC_KEYS = {"map": "mAP", "map_50": "AP50", "map_75": "AP75", "map_small": "APs", "map_medium": "APm",
               "map_large": "APl", "mar_100": "AR100", "voc07_ap50": "VOC07 AP50",
               "voc10_ap50": "VOC2010 AP50"}  # fmt: skip
PLOTS = ("pr_curves.png", "ap_vs_iou.png", "per_class_ap.png", "speed_accuracy.png")

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


def plot_confusion(confusion: Confusion, name: str, path: Path) -> None:
    """The matrix as a heat map normalised by true class (``Confusion.normalised``: a class column per object
    of that class, the background column per false positive), every cell annotated with its count and that
    share; rows predicted class, columns true class, background last."""
    shares, counts = confusion.normalised(), confusion.matrix
    labels = [*confusion.class_names, "background"]

    def draw(fig):
        fig.set_layout_engine("constrained")  # "tight" cuts the row labels once a colorbar is added
        ax = fig.add_subplot()
        image = ax.imshow(np.ma.masked_invalid(shares), cmap="Blues", vmin=0, vmax=1)
        fig.colorbar(image, ax=ax, shrink=0.8, label="count / objects of the true class (background: / FPs)")
        for (p, t), count in np.ndenumerate(counts):
            if p == t == len(labels) - 1:
                continue  # background on background: not counted
            share = shares[p, t]
            text = f"{count}\n{share:.0%}" if math.isfinite(share) else f"{count}"
            dark = math.isfinite(share) and share > 0.6  # white text on the dark cells
            ax.text(t, p, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        many = len(labels) > 8
        ax.set_xticks(
            range(len(labels)), labels, rotation=45 if many else 0, ha="right" if many else "center"
        )
        ax.set_yticks(range(len(labels)), labels)
        ax.set(
            xlabel="true class",
            ylabel="predicted class",
            title=f"{name}: IoU >= {confusion.iou_threshold:g}, score >= {confusion.score_threshold:g}",
        )

    side = max(5.0, 0.6 * len(labels) + 3)
    _figure(path, draw, (side + 1.5, side))


# ------------------------------------------------------------------------------------------------ report


def confusion_stems(names: Sequence[str]) -> list[str]:
    """File stems ``confusion_NAME`` of the models' confusion files: characters other than letters, digits,
    ``-`` ``_`` ``.`` replaced by ``_`` (model names may hold ``/``); a stem two names share gets the model's
    position appended."""
    safe = ["confusion_" + "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in n)
            for n in names]  # fmt: skip
    return [s if safe.count(s) == 1 else f"{s}_{i + 1}" for i, s in enumerate(safe)]


def _atomic_write(path: Path, write: Callable, binary: bool = False) -> None:
    """``write(file)`` through ``training.checkpoint_io.atomic_write`` (never a half-written report); text is
    UTF-8."""

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


def _confusion_title(entries: Sequence[ModelEntry]) -> str:
    c = entries[0].confusion
    return f"Confusion at IoU >= {c.iou_threshold:g}, score >= {c.score_threshold:g}"


def _markdown(tables: list[Table], settings: dict, entries: Sequence[ModelEntry], stems: list[str]) -> str:
    lines = ["# Detector comparison", "", *(f"- {k.replace('_', ' ')}: {v}" for k, v in settings.items())]
    for table in tables:
        cells = [list(c.cells) for c in table.columns]
        lines += ["", f"## {table.title}", "", "| " + " | ".join(str(c.header) for c in table.columns) + " |",
                  "|" + "---|" * len(cells)]  # fmt: skip
        lines += ["| " + " | ".join(str(col[i]) for col in cells) + " |" for i in range(table.row_count)]
    lines += ["", f"## {_confusion_title(entries)}", "",
              "Rows: predicted class; columns: true class. Background column: detections on no object (or "
              "duplicates); background row: objects no detection found or lay on. The PNGs divide each class "
              "column by the objects of the class (diagonal: recall) and the background column by its sum "
              "(docs/compare.md, \"Confusion matrices\").", "",
              *(f"- {e.confusion.reading(e.name)} ([matrix]({s}.png), [counts]({s}.csv))"
                for e, s in zip(entries, stems, strict=True)), "",
              *(f"![{s}.png]({s}.png)" for s in stems)]  # fmt: skip
    return "\n".join([*lines, "", "## Plots", "", *(f"![{p}]({p})" for p in PLOTS)]) + "\n"


def _json_safe(value):
    """NaN/inf are not JSON: written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return [_json_safe(v) for v in value] if isinstance(value, list) else value


def check_report_folder(folder: Path) -> None:
    """Refuse, before any work, a report folder that cannot be written: an existing file, a path through a
    file, or a place where no file can be created (tried with a temporary file, removed at once). An existing
    folder is fine: its report files are replaced, nothing else in it is touched."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileTakenError(f"{folder} is a file: --out names the folder the report is written into")
    existing = folder
    while not (existing.exists() or existing.is_symlink()):
        existing = existing.parent
    if not existing.is_dir():
        raise BadFileError(f"{folder}: the report folder cannot be created, {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise BadFileError(f"{folder}: the report cannot be written there ({existing}: {e.strerror})") from e


def write_report(
    folder: Path, entries: Sequence[ModelEntry], pairs: list[dict], settings: dict,
    class_names: Sequence[str], console: Console,
) -> dict:  # fmt: skip
    """comparison.{md,csv,json}, the plots, and the tables on ``console``; returns the JSON content (NaN
    where the file has null).

    ``pairs``: one dict per compared pair, keys a, b, map_a, map_b, difference, ci_low, ci_high (NaN: no
    interval), excludes_zero. ``settings`` are printed first, key by key; it needs device, precision and
    batch_size (repeated in every CSV row, the conditions of the speed numbers) and bootstrap_resamples.
    Every entry needs its ``confusion`` (``detectors.confusion.confusion_matrix``), all at the same
    thresholds."""
    common = {k: settings[k] for k in ("device", "precision", "batch_size")}
    rows = [{**e.info, **{k: e.metrics[k] for k in METRIC_KEYS},
             **{f"ap/{n}": e.metrics[f"ap/{n}"] for n in class_names},
             "latency_ms": e.latency_ms, "throughput_ips": e.throughput, **common,
             **{f"errors/{k}": v for k, v in e.confusion.shares().items()}}
            for e in entries]  # fmt: skip
    tables = _tables(rows, pairs, class_names, settings["bootstrap_resamples"])
    stems = confusion_stems([e.name for e in entries])
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "comparison.md", lambda f: f.write(_markdown(tables, settings, entries, stems)))

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    _atomic_write(folder / "comparison.csv", write_csv)
    for row, e, stem in zip(rows, entries, stems, strict=True):  # JSON only: mAP per IoU, confusion matrix
        row["ap_per_iou"] = dict(zip((f"{t:.2f}" for t in e.coco.iou_thresholds),
                                     _class_mean(e.coco.ap_per_iou()).tolist(), strict=True))  # fmt: skip
        row["confusion"] = {**e.confusion.to_dict(), "png": f"{stem}.png", "csv": f"{stem}.csv"}
        _atomic_write(folder / f"{stem}.csv", lambda f, c=e.confusion: csv.writer(f).writerows(c.table()))
        plot_confusion(e.confusion, e.name, folder / f"{stem}.png")
    plots = [*PLOTS, *(f"{s}.png" for s in stems)]
    report = {"settings": settings, "models": rows, "pairs": pairs, "plots": plots}
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
    console.print(_confusion_title(entries), style="italic", highlight=False)
    for e in entries:
        console.print(e.confusion.reading(e.name), highlight=False)
    matrices = ", ".join(f"{s}.png" for s in stems)
    console.print(f"report: {folder}/comparison.md, .csv, .json and {len(plots)} PNG plots (confusion "
                  f"matrices: {matrices}, counts in .csv)", highlight=False)  # fmt: skip
    return report
