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
from detectors.confusion import confusion_matrix
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
    confusion = confusion_matrix(preds, TARGETS, CLASSES)
    return ModelEntry(name, f"{name}.ckpt", torch.nn.Identity(), info, preds, metrics, coco, confusion,
                      latency, 10.0)  # fmt: skip


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
    confusion_pngs = ["confusion_exact.png", "confusion_blind.png"]
    assert report["settings"] == SETTINGS and report["plots"] == [*PLOTS, *confusion_pngs]
    assert report["pairs"][1]["ci_low"] is None  # NaN written as null
    exact = report["models"][0]
    assert exact["latency_ms"] is None and exact["map"] == pytest.approx(1.0)
    assert exact["ap/triangle"] == -1  # no ground truth: -1 in the files, n/a in the tables
    assert np.mean(list(exact["ap_per_iou"].values())) == pytest.approx(1.0)
    with open(tmp_path / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["exact", "blind"] and rows[0]["latency_ms"] == "nan"
    assert "ap_per_iou" not in rows[0] and [k for k in METRIC_KEYS if k not in rows[0]] == []
    # the blind model's two errors are the two missed objects; the exact one has none (shares n/a)
    shares = [rows[1][f"errors/{k}"] for k in ("wrong_class", "background_fp", "missed")]
    assert shares == ["0.0", "0.0", "1.0"]
    assert rows[0]["errors/missed"] == "nan" and "confusion" not in rows[0]
    blind = report["models"][1]["confusion"]  # rows predicted, columns true: the background row holds both
    assert blind["matrix"] == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
    assert blind["labels"] == [*CLASSES, "background"] and blind["csv"] == "confusion_blind.csv"
    assert (blind["missed"], blind["errors"]) == (2, 2)
    assert (blind["iou_threshold"], blind["score_threshold"]) == (0.5, 0.25)
    assert exact["confusion"]["matrix"][0][0] == exact["confusion"]["matrix"][1][1] == 1
    assert exact["confusion"]["shares"]["missed"] is None  # no errors: NaN, written as null
    with open(tmp_path / "confusion_blind.csv", newline="") as f:
        assert list(csv.reader(f))[-1] == ["background", "1", "1", "0", "0"]

    md = (tmp_path / "comparison.md").read_text()
    assert "| triangle | n/a | n/a |" in md
    assert "| exact | two-stage | resnet18_fpn | 1.23 | 64/64 | n/a |" in md
    assert "## mAP differences A - B: paired bootstrap over images, 8 resamples" in md
    assert "| exact | blind | 1.000 | 0.000 | +1.0000 | [+1.0000, +1.0000] | yes |" in md
    assert "| exact | exact | 1.000 | 1.000 | +0.0000 | n/a | no |" in md  # no resamples: no interval
    assert "- bootstrap resamples: 8" in md and all(f"![{p}]({p})" in md for p in PLOTS)
    assert "## Confusion at IoU >= 0.5, score >= 0.25" in md
    assert ("- blind: of its 2 errors, 0% wrong class, 0% background false positives, 100% missed objects; "
            "0 of 2 objects found with the right class ([matrix](confusion_blind.png), "
            "[counts](confusion_blind.csv))" in md)  # fmt: skip
    assert "- exact: no errors; 2 of 2 objects found with the right class" in md
    assert all(f"![{p}]({p})" in md for p in confusion_pngs)
    printed = console.export_text()
    assert "Per-class AP" in printed and "blind: of its 2 errors" in printed
    for name in [*PLOTS, *confusion_pngs]:
        with Image.open(tmp_path / name) as im:
            im.verify()
            assert im.format == "PNG"


def test_one_model_has_no_difference_table():
    row = {**_entry("exact", True, 1.0).info, "latency_ms": 1.0, "throughput_ips": 10.0,
           **dict.fromkeys(METRIC_KEYS, 1.0), **{f"ap/{n}": 1.0 for n in CLASSES}}  # fmt: skip
    assert [t.title for t in _tables([row], [], CLASSES, 0)] == [
        "Models", "Accuracy (AP over IoU 0.50:0.95 unless stated; n/a: no ground truth)", "Per-class AP"]
