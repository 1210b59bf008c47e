"""detectors.report: the files and tables of a comparison, written from constructed model entries (no
detector runs here; tests/detectors/test_compare.py checks the report of the real command)."""

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from detectors.compare import ModelEntry
from detectors.evaluation import coco_evaluate, evaluate_detections
from detectors.report import METRIC_KEYS, PLOTS, _tables, write_report

CLASSES = ["rectangle", "ellipse", "triangle"]  # no "triangle" in the ground truth below
TARGETS = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])},
           {"boxes": torch.tensor([[20.0, 30.0, 60.0, 90.0]]), "labels": torch.tensor([2])}]  # fmt: skip
SETTINGS = {"data": "constructed", "images": 2, "device": "cpu (1 threads)", "precision": "32",
            "batch_size": 2, "bootstrap_resamples": 8, "bootstrap_seed": 0}  # fmt: skip


def _entry(name: str, found: bool, latency: float) -> ModelEntry:
    """A model that finds every object exactly (mAP 1) or nothing (mAP 0)."""
    preds = [{"boxes": t["boxes"].clone() if found else torch.zeros(0, 4),
              "scores": torch.tensor([0.9] if found else []),
              "labels": t["labels"].clone() if found else torch.zeros(0, dtype=torch.int64)}
             for t in TARGETS]  # fmt: skip
    coco = coco_evaluate(preds, TARGETS, CLASSES)
    info = {"model": name, "checkpoint": f"{name}.ckpt", "class": "FasterRCNNModule", "detector": "two-stage",
            "backbone": "resnet18_fpn", "params": 1_234_567, "trainable_params": 1_000, "min_size": 64,
            "max_size": 64}  # fmt: skip
    metrics = evaluate_detections(preds, TARGETS, CLASSES, coco=coco)
    return ModelEntry(name, f"{name}.ckpt", torch.nn.Identity(), info, preds, metrics, coco, latency, 10.0)


def _pair(a: str, b: str, map_a: float, map_b: float, low: float, high: float, excludes_zero: bool) -> dict:
    return {"a": a, "b": b, "map_a": map_a, "map_b": map_b, "difference": map_a - map_b, "ci_low": low,
            "ci_high": high, "excludes_zero": excludes_zero}  # fmt: skip


def test_report_files(tmp_path):
    entries = [_entry("exact", True, latency=math.nan), _entry("blind", False, latency=2.0)]  # NaN: not JSON
    pairs = [_pair("exact", "blind", 1.0, 0.0, 1.0, 1.0, True),
             _pair("exact", "exact", 1.0, 1.0, math.nan, math.nan, False)]  # fmt: skip
    console = Console(record=True, file=io.StringIO(), width=120)
    write_report(tmp_path, entries, pairs, SETTINGS, CLASSES, console)

    report = json.loads((tmp_path / "comparison.json").read_text())
    assert report["settings"] == SETTINGS and report["plots"] == list(PLOTS)
    assert report["pairs"][1]["ci_low"] is None  # NaN written as null
    exact = report["models"][0]
    assert exact["latency_ms"] is None and exact["map"] == pytest.approx(1.0)
    assert exact["ap/triangle"] == -1  # no ground truth: -1 in the files, n/a in the tables
    assert np.mean(list(exact["ap_per_iou"].values())) == pytest.approx(1.0)
    with open(tmp_path / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["exact", "blind"] and rows[0]["latency_ms"] == "nan"
    assert "ap_per_iou" not in rows[0] and [k for k in METRIC_KEYS if k not in rows[0]] == []

    md = (tmp_path / "comparison.md").read_text()
    assert "| triangle | n/a | n/a |" in md
    assert "| exact | two-stage | resnet18_fpn | 1.23 | 64/64 | n/a |" in md
    assert "## mAP differences A - B: paired bootstrap over images, 8 resamples" in md
    assert "| exact | blind | 1.000 | 0.000 | +1.0000 | [+1.0000, +1.0000] | yes |" in md
    assert "| exact | exact | 1.000 | 1.000 | +0.0000 | n/a | no |" in md  # no resamples: no interval
    assert "- bootstrap resamples: 8" in md and all(f"![{p}]({p})" in md for p in PLOTS)
    assert "Per-class AP" in console.export_text()
    for name in PLOTS:
        with Image.open(tmp_path / name) as im:
            im.verify()
            assert im.format == "PNG"


def test_one_model_has_no_difference_table():
    row = {**_entry("exact", True, 1.0).info, "latency_ms": 1.0, "throughput_ips": 10.0,
           **dict.fromkeys(METRIC_KEYS, 1.0), **{f"ap/{n}": 1.0 for n in CLASSES}}  # fmt: skip
    assert [t.title for t in _tables([row], [], CLASSES, 0)] == [
        "Models", "Accuracy (AP over IoU 0.50:0.95 unless stated; n/a: no ground truth)", "Per-class AP"]
