"""detectors.compare: the paired bootstrap on cases with a known answer and against pycocotools, and the
``train.py compare`` command end to end on tiny detectors."""

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.compare import _model_names, autocast, load_detectors, paired_bootstrap
from detectors.module import FasterRCNNModule, RetinaNetModule
from training.saving import save_model

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["rectangle", "ellipse", "triangle"]


# ------------------------------------------------------------------------------------------ constructed data


def _targets(n: int, seed: int) -> list[dict]:
    """n images with 1-3 objects each: integer XYXY boxes (exact in float32), labels 1..3."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        xy = rng.integers(0, 200, size=(k, 2))
        wh = rng.integers(20, 100, size=(k, 2))
        boxes = torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
        out.append({"boxes": boxes, "labels": torch.tensor(rng.integers(1, 4, size=k), dtype=torch.int64)})
    return out


def _perfect(targets: list[dict]) -> list[dict]:
    return [{"boxes": t["boxes"].clone(), "scores": torch.ones(len(t["labels"])),
             "labels": t["labels"].clone()} for t in targets]  # fmt: skip


def _empty(targets: list[dict]) -> list[dict]:
    return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64)} for _ in targets]  # fmt: skip


def _noisy(targets: list[dict], seed: int, detect: float = 0.8, jitter: int = 12) -> list[dict]:
    """Each object found with probability ``detect`` (integer jitter), plus one false positive per image;
    distinct scores so no ranking depends on tie-breaking."""
    rng = np.random.default_rng(seed)
    out = []
    for t in targets:
        keep = rng.random(len(t["labels"])) < detect
        boxes = t["boxes"][keep] + torch.tensor(rng.integers(-jitter, jitter + 1, (int(keep.sum()), 4)))
        fp = torch.tensor([[250.0, 250.0, 290.0, 290.0]])
        labels = torch.cat([t["labels"][keep], torch.tensor([int(rng.integers(1, 4))])])
        scores = torch.tensor(rng.random(len(labels)), dtype=torch.float32)
        out.append({"boxes": torch.cat([boxes.float(), fp]), "scores": scores, "labels": labels})
    return out


def _pycocotools_map(preds: list[dict], targets: list[dict]) -> float:
    """pycocotools COCOeval mAP, each list position its own image (a repeated image counts again)."""
    images, anns, dets = [], [], []
    for i, (p, t) in enumerate(zip(preds, targets, strict=True), start=1):
        images.append({"id": i, "width": 400, "height": 400})
        for b, c in zip(t["boxes"].tolist(), t["labels"].tolist(), strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "bbox": [b[0], b[1], w, h],
                         "area": w * h, "iscrowd": 0})  # fmt: skip
        for b, s, c in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist(), strict=True):
            dets.append({"image_id": i, "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "score": s})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
    categories = [{"id": k, "name": str(k)} for k in (1, 2, 3)]
    gt.dataset = {"images": images, "annotations": anns, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


# -------------------------------------------------------------------------------------------- bootstrap


def test_identical_models_differ_by_exactly_zero():
    targets = _targets(12, seed=1)
    preds = _noisy(targets, seed=2)
    r = paired_bootstrap(preds, preds, targets, CLASSES, resamples=30, seed=0)
    assert r.observed == 0.0
    assert (r.low, r.high) == (0.0, 0.0)
    assert np.all(r.deltas == 0.0) and r.resamples == 30 and not r.excludes_zero


def test_perfect_against_nothing_differs_by_exactly_one():
    targets = _targets(10, seed=3)
    r = paired_bootstrap(_perfect(targets), _empty(targets), targets, CLASSES, resamples=25, seed=5)
    assert (r.observed, r.low, r.high) == (1.0, 1.0, 1.0) and r.excludes_zero
    r = paired_bootstrap(_empty(targets), _perfect(targets), targets, CLASSES, resamples=25, seed=5)
    assert (r.observed, r.low, r.high) == (-1.0, -1.0, -1.0) and r.excludes_zero


def test_half_the_iou_thresholds_gives_a_difference_of_one_half():
    # B's boxes keep 72% of each object's height: IoU 0.72 matches at thresholds 0.50..0.70 (5 of 10) and
    # fails at 0.75..0.95, so B's AP is 1 at five thresholds and 0 at five: mAP 0.5 on any resample.
    targets = _targets(8, seed=4)
    short = _perfect(targets)
    for p in short:
        p["boxes"][:, 3] = p["boxes"][:, 1] + 0.72 * (p["boxes"][:, 3] - p["boxes"][:, 1])
    assert _pycocotools_map(short, targets) == pytest.approx(0.5, abs=1e-12)
    r = paired_bootstrap(_perfect(targets), short, targets, CLASSES, resamples=20, seed=0)
    assert r.observed == pytest.approx(0.5, abs=1e-12)
    assert r.low == pytest.approx(0.5, abs=1e-12) and r.high == pytest.approx(0.5, abs=1e-12)


def test_resampled_differences_match_pycocotools():
    # Independent computation: the documented resampling (default_rng(seed).integers(0, n, (B, n)), same rows
    # for both models), each resample scored by pycocotools itself, the interval by np.percentile.
    n, resamples, seed = 10, 6, 7
    targets = _targets(n, seed=8)
    a, b = _noisy(targets, seed=9, detect=0.9), _noisy(targets, seed=10, detect=0.6, jitter=20)
    r = paired_bootstrap(a, b, targets, CLASSES, resamples=resamples, seed=seed)
    expected = []
    for idx in np.random.default_rng(seed).integers(0, n, size=(resamples, n)):
        t = [targets[i] for i in idx]
        expected.append(_pycocotools_map([a[i] for i in idx], t) - _pycocotools_map([b[i] for i in idx], t))
    np.testing.assert_allclose(r.deltas, expected, rtol=0, atol=1e-12)  # pycocotools' own float64 numbers
    assert np.ptp(expected) > 0.01  # the resamples really differ: not a constant case
    np.testing.assert_allclose([r.low, r.high], np.percentile(expected, [2.5, 97.5]), rtol=0, atol=1e-12)
    assert r.observed == pytest.approx(_pycocotools_map(a, targets) - _pycocotools_map(b, targets), abs=1e-12)


def _population():
    """400 images and two models' detections on them; the true mAP difference is measured on all 400."""
    population = _targets(400, seed=11)
    a, b = _noisy(population, seed=12, detect=0.9), _noisy(population, seed=13, detect=0.7, jitter=16)
    return population, a, b, _pycocotools_map(a, population) - _pycocotools_map(b, population)


def _sample_interval(population, a, b, seed: int, n: int = 40, resamples: int = 100):
    idx = np.random.default_rng(seed).choice(len(population), n, replace=False)
    sample = [population[i] for i in idx]
    return paired_bootstrap([a[i] for i in idx], [b[i] for i in idx], sample, CLASSES, resamples, seed=0)


def test_interval_contains_the_population_difference():
    # The interval computed from a sample of 40 images alone must contain the population's difference.
    population, a, b, truth = _population()
    r = _sample_interval(population, a, b, seed=14)
    assert r.low <= truth <= r.high
    assert 0 < r.high - r.low < 0.5  # an informative interval, not [-1, 1]
    assert r.low < r.observed < r.high


@pytest.mark.slow
def test_interval_coverage_over_samples():
    # 95% intervals from 20 independent samples: about 19 should contain the truth; fewer than 16 would
    # happen with probability < 2% for a correct 95% interval (binomial), so it flags a broken bootstrap.
    population, a, b, truth = _population()
    intervals = [_sample_interval(population, a, b, seed=100 + s) for s in range(20)]
    assert sum(r.low <= truth <= r.high for r in intervals) >= 16


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def tiny_setup(shapes_dir, tmp_path_factory):
    """Two tiny detectors of the shapes classes, one of other classes, a data config for shapes_dir."""
    root = tmp_path_factory.mktemp("compare")
    small = dict(backbone="resnet18_fpn", min_size=64, max_size=64)
    torch.manual_seed(0)
    models = {
        "frcnn": FasterRCNNModule(class_names=CLASSES, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30,
                                  **small),  # fmt: skip
        "retina": RetinaNetModule(class_names=CLASSES, **small),
        "other": RetinaNetModule(class_names=["cat", "dog"], **small),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = str(root / f"{name}.ckpt")
        save_model(model, paths[name])
    data = root / "data.yaml"
    data.write_text(
        "class_path: detectors.data.DetectionDataModule\n"
        f"init_args:\n  root: {shapes_dir}\n  batch_size: 2\n  num_workers: 0\n  generate: false\n"
    )
    params = {n: sum(p.numel() for p in m.model.parameters()) for n, m in models.items()}
    return {"root": root, "paths": paths, "data": str(data), "params": params}


def test_compare_command_writes_the_report(tiny_setup):
    s, out = tiny_setup, tiny_setup["root"] / "report"
    cmd = [sys.executable, "train.py", "compare", "--checkpoints", s["paths"]["frcnn"], s["paths"]["retina"],
           "--data", s["data"], "--out", str(out), "--device", "cpu", "--resamples", "8", "--seed", "3",
           "--warmup", "1", "--repeats", "2", "--batch_size", "2"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    metrics = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100", "voc07_ap50",
               "voc10_ap50"]  # fmt: skip
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["frcnn", "retina"]
    for col in ("detector", "backbone", "params", "min_size", "max_size", "latency_ms", "throughput_ips",
                "device", "precision", *metrics, *(f"ap/{c}" for c in CLASSES)):  # fmt: skip
        assert col in rows[0], col
    assert [r["detector"] for r in rows] == ["two-stage", "one-stage"]
    assert [int(r["params"]) for r in rows] == [s["params"]["frcnn"], s["params"]["retina"]]
    assert all(r["min_size"] == r["max_size"] == "64" and r["device"].startswith("cpu") for r in rows)
    assert all(float(r["latency_ms"]) > 0 and float(r["throughput_ips"]) > 0 for r in rows)
    assert all(-1 <= float(r[k]) <= 1 for r in rows for k in metrics)

    report = json.loads((out / "comparison.json").read_text())
    settings = report["settings"]
    assert settings["bootstrap_resamples"] == 8 and settings["bootstrap_seed"] == 3
    assert settings["images"] == 4 and settings["precision"] == "32" and settings["batch_size"] == 2
    (pair,) = report["pairs"]
    assert (pair["a"], pair["b"]) == ("frcnn", "retina")
    assert pair["difference"] == pytest.approx(pair["map_a"] - pair["map_b"])
    assert pair["ci_low"] <= pair["ci_high"]
    for model in report["models"]:
        curve = list(model["ap_per_iou"].values())
        assert list(model["ap_per_iou"]) == [f"{t:.2f}" for t in np.linspace(0.5, 0.95, 10)]
        assert np.mean(curve) == pytest.approx(model["map"], abs=1e-6)  # mAP is the mean of the AP-IoU curve

    md = (out / "comparison.md").read_text()
    for text in ("| model |", "| mAP |", "VOC07 AP50", "VOC2010 AP50", "95% CI", "8 resamples", "default_rng(3)",
                 "frcnn 64/64"):  # fmt: skip
        assert text in md, text
    assert "95% CI" in run.stdout and "frcnn" in run.stdout
    for name in ("pr_curves.png", "ap_vs_iou.png", "per_class_ap.png", "speed_accuracy.png"):
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300


def test_compare_refuses_models_with_different_classes(tiny_setup, capsys):
    import train

    s = tiny_setup
    with pytest.raises(SystemExit) as exc:
        train.main(["compare", "--checkpoints", s["paths"]["frcnn"], s["paths"]["other"], "--data", s["data"],
                    "--out", str(s["root"] / "refused")])  # fmt: skip
    message = str(exc.value.code)
    assert s["paths"]["other"] in message and s["paths"]["frcnn"] in message
    assert str(CLASSES) in message and "['cat', 'dog']" in message
    assert not (s["root"] / "refused").exists()


def test_models_must_match_the_data_classes(tiny_setup):
    with pytest.raises(ValueError, match=r"\['cat', 'dog'\].*\['a', 'b', 'c'\]"):
        load_detectors([tiny_setup["paths"]["other"]], ["a", "b", "c"], "my data")


def test_model_names_tell_checkpoints_apart():
    assert _model_names(["runs/faster_rcnn/checkpoints/best.ckpt", "runs/retinanet/checkpoints/best.ckpt"]) == [
        "faster_rcnn", "retinanet"]  # fmt: skip
    assert _model_names(["a/best.ckpt", "b/last.ckpt"]) == ["best", "last"]
    assert _model_names(["x/best.ckpt", "x/best.ckpt"]) == ["best#1", "best#2"]


def test_half_precision_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast(torch.device("cpu"), "16")
