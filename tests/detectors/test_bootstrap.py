"""detectors.bootstrap: the paired bootstrap on cases with a known answer and against pycocotools."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.bootstrap import paired_bootstrap

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
