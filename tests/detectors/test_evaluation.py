"""detectors.evaluation: COCO numbers against pycocotools (run here), VOC AP against hand-worked cases."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params
from rich.console import Console

from detectors import evaluation as ev
from detectors.evaluation import (
    COCO_KEYS,
    DetectionEvaluator,
    coco_evaluate,
    coco_map_metric,
    evaluate,
    evaluate_detections,
    format_class_table,
    format_metrics_table,
    load_coco_ground_truth,
    load_coco_predictions,
    voc_ap,
    voc_evaluate,
)

COCO100 = Path(
    os.environ.get(
        "LITVISION_COCO100", Path(__file__).resolve().parents[2] / ".." / "shared/data/coco-val2014-100"
    )
)
GT100 = COCO100 / "instances_val2014_100.json"
DT100 = COCO100 / "instances_val2014_fakebbox100_results.json"
needs_coco100 = pytest.mark.skipif(not GT100.is_file(), reason=f"real COCO subset not found at {COCO100}")
# stats[0..11] printed in the data set's README (pycocotools COCOeval on the two files).
README_STATS = [
    0.5045806987, 0.6969727247, 0.5729816670, 0.5856257209, 0.5193996948, 0.5013978986,
    0.3868127796, 0.5936795763, 0.5953529829, 0.6398109626, 0.5664205979, 0.5642905983,
]  # fmt: skip


# ------------------------------------------------------------------------------------ reference


def pycocotools_eval(gt: dict, dets: list) -> tuple[np.ndarray, dict[str, float], COCOeval]:
    """pycocotools COCOeval(bbox) on in-memory dicts: (stats[12], per-class AP by category name, eval)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        else:  # loadRes indexes anns[0]; build what it would return for an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        E = COCOeval(coco_gt, coco_dt, "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    names = {c["id"]: c["name"] for c in gt["categories"]}
    per_class = {}
    for k, cat in enumerate(E.params.catIds):  # what summarize() gives with params.catIds = [cat]
        p = E.eval["precision"][:, :, k, 0, -1]
        per_class[names[cat]] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return np.asarray(E.stats), per_class, E


def assert_matches_pycocotools(metrics: dict, gt: dict, dets: list) -> tuple[np.ndarray, dict]:
    stats, per_class, _ = pycocotools_eval(gt, dets)
    ours = np.array([metrics[k] for k in COCO_KEYS])
    np.testing.assert_allclose(
        ours, stats, rtol=0, atol=1e-6, err_msg=str(dict(zip(COCO_KEYS, stats, strict=True)))
    )
    assert {k[3:] for k in metrics if k.startswith("ap/")} == set(per_class)
    for name, ap in per_class.items():
        assert metrics[f"ap/{name}"] == pytest.approx(ap, abs=1e-6), name
    return stats, per_class


def write_files(folder: Path, gt: dict, dets: list) -> tuple[Path, Path]:
    gt_path, dt_path = Path(folder, "gt.json"), Path(folder, "dt.json")
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(dets))
    return gt_path, dt_path


def score_files(tmp_path: Path, gt: dict, dets: list, **kwargs) -> dict:
    return evaluate(*write_files(tmp_path, gt, dets), **kwargs)


def load_dicts(folder: Path, gt: dict, dets: list, box_format: str = "xyxy"):
    """(ground truth, per-image prediction dicts) through the module's own COCO readers."""
    gt_path, dt_path = write_files(folder, gt, dets)
    gt_data = load_coco_ground_truth(gt_path, box_format=box_format)
    return gt_data, load_coco_predictions(dt_path, gt_data)


# --------------------------------------------------------------------------------- synthetic data


def synthetic(seed: int, n_images: int = 14) -> tuple[dict, list]:
    """A COCO ground truth + results pair exercising every rule at once: non-contiguous category ids, image ids
    listed out of order, images without ground truth (with and without detections), crowd regions, annotation
    areas different from box areas across the small/medium/large limits, a category with detections but no
    ground truth, an image with > 100 detections of two classes, and tied scores across images."""
    rng = np.random.default_rng(seed)
    cats = [
        {"id": 3, "name": "car"},
        {"id": 17, "name": "cat"},
        {"id": 42, "name": "kite"},
        {"id": 90, "name": "tb"},
    ]
    image_ids = [int(i) for i in rng.permutation(np.arange(100, 100 + 7 * n_images, 7))]
    images = [{"id": i, "width": 640, "height": 480} for i in image_ids]
    anns, dets = [], []

    def box(lo=4.0, hi=300.0):
        w, h = np.exp(rng.uniform(np.log(lo), np.log(hi), size=2))
        return [float(rng.uniform(0, 300)), float(rng.uniform(0, 200)), float(w), float(h)]

    for n, img in enumerate(image_ids):
        n_gt = 0 if n % 5 == 0 else int(rng.integers(1, 8))
        for _ in range(n_gt):
            b = box()
            anns.append({
                "id": len(anns) + 1, "image_id": img, "category_id": int(rng.choice([3, 17, 42])), "bbox": b,
                "area": b[2] * b[3] * float(rng.uniform(0.4, 1.0)), "iscrowd": int(rng.random() < 0.12),
            })  # fmt: skip
        for a in [a for a in anns if a["image_id"] == img]:
            for _ in range(int(rng.integers(0, 3))):  # jittered copies: TPs at various IoUs and duplicates
                x, y, w, h = a["bbox"]
                j = rng.normal(0, 0.12, 4) * [w, h, w, h]
                dets.append(
                    {
                        "image_id": img,
                        "category_id": a["category_id"] if rng.random() < 0.9 else 42,
                        "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                        "score": round(float(rng.random()), 2),
                    }
                )
        for _ in range(int(rng.integers(0, 4)) if n % 10 != 5 else 0):  # false positives, some class 90
            dets.append({"image_id": img, "category_id": int(rng.choice([3, 17, 42, 90])), "bbox": box(),
                         "score": round(float(rng.random()), 2)})  # fmt: skip
    crowded = image_ids[1]
    for cat, count in ((3, 130), (17, 110)):  # > maxDets per class in one image
        for _ in range(count):
            dets.append(
                {
                    "image_id": crowded,
                    "category_id": cat,
                    "bbox": box(),
                    "score": round(float(rng.random()), 2),
                }
            )
    gt = {"images": images, "annotations": anns, "categories": cats}
    return gt, list(rng.permutation(np.array(dets, dtype=object)))


# ----------------------------------------------------------------------------------- COCO exactness


def test_thresholds_are_pycocotools_own():
    metric = coco_map_metric()
    p = Params(iouType="bbox")
    assert metric.iou_thresholds == p.iouThrs.tolist()  # exact float64 equality, not torch's float32 linspace
    assert metric.rec_thresholds == p.recThrs.tolist()
    assert metric.max_detection_thresholds == p.maxDets
    assert metric.class_metrics and metric._coco_backend.backend == "faster_coco_eval"
    assert coco_map_metric(class_metrics=False).class_metrics is False


def test_box_iou_is_torchvisions():
    assert ev.box_iou is torchvision.ops.box_iou


@needs_coco100
def test_real_coco_subset_matches_pycocotools(tmp_path):
    out = tmp_path / "sub" / "metrics.json"
    metrics = evaluate(GT100, DT100, out=out)
    gt, dets = json.loads(GT100.read_text()), json.loads(DT100.read_text())
    stats, per_class = assert_matches_pycocotools(metrics, gt, dets)
    np.testing.assert_allclose(stats, README_STATS, atol=1e-9)  # the reference itself is the published one
    assert (
        sum(v == -1 for v in per_class.values()) == 10
    )  # categories without ground truth in these 100 images
    assert all(type(v) is float for v in metrics.values())
    assert "classes" not in metrics and "map_per_class" not in metrics
    assert json.loads(out.read_text()) == metrics
    assert not [p for p in out.parent.iterdir() if p.name != "metrics.json"]  # no temp file left


@needs_coco100
def test_precision_array_and_ap_per_iou_match_pycocotools():
    gt100 = load_coco_ground_truth(GT100)
    preds = load_coco_predictions(DT100, gt100)
    result = coco_evaluate(preds, gt100.targets, gt100.class_names)
    _, _, E = pycocotools_eval(json.loads(GT100.read_text()), json.loads(DT100.read_text()))
    assert E.params.catIds == gt100.category_ids  # class index k <-> category_ids[k] in both
    assert result.precision.shape == E.eval["precision"].shape == (10, 101, 80, 4, 3)
    np.testing.assert_allclose(result.precision, E.eval["precision"], atol=1e-12)
    np.testing.assert_allclose(result.recall, E.eval["recall"], atol=1e-12)
    ap_t = result.ap_per_iou()
    person = gt100.class_names.index("person")
    expected = [E.eval["precision"][t, :, person, 0, -1].mean() for t in range(10)]
    np.testing.assert_allclose(ap_t[:, person], expected, atol=1e-12)
    assert result.metrics["ap/person"] == pytest.approx(np.mean(expected), abs=1e-6)
    rec, prec = result.pr_curve(person, 0.75)
    np.testing.assert_allclose(rec, np.linspace(0, 1, 101))
    np.testing.assert_allclose(prec, E.eval["precision"][5, :, person, 0, -1])
    assert (ap_t[:, gt100.class_names.index("fire hydrant")] == -1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_edge_cases_match_pycocotools(tmp_path, seed):
    gt, dets = synthetic(seed)
    metrics = score_files(tmp_path, gt, dets)
    _, per_class = assert_matches_pycocotools(metrics, gt, dets)
    # category 90 has detections but no ground truth: -1 per class, left out of the mean (pycocotools' rule)
    assert per_class["tb"] == -1 and metrics["ap/tb"] == -1
    assert metrics["map"] == pytest.approx(np.mean([v for v in per_class.values() if v > -1]), abs=1e-6)


def test_per_class_ap_from_precision_array_equals_torchmetrics_class_metrics(tmp_path):
    gt, dets = synthetic(8)
    gt_data, preds = load_dicts(tmp_path, gt, dets)
    ours = coco_evaluate(preds, gt_data.targets, gt_data.class_names).metrics
    tm = coco_evaluate(
        preds, gt_data.targets, gt_data.class_names, extended_summary=False, class_metrics=True
    )
    assert (tm.precision == -1).all()  # no arrays without the extended summary
    for name in gt_data.class_names:
        assert ours[f"ap/{name}"] == pytest.approx(tm.metrics[f"ap/{name}"], abs=1e-6)
    fast = coco_evaluate(preds, gt_data.targets, gt_data.class_names, extended_summary=False).metrics
    assert fast == {k: v for k, v in ours.items() if not k.startswith("ap/")}


def test_more_than_100_detections_per_image_are_cut_per_class(tmp_path):
    """pycocotools keeps the top 100 of each class in each image, so all 150 cars and 150 cats can count."""
    gt = {
        "images": [{"id": 1}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [],
    }
    dets = []
    for i in range(150):
        x = float(i * 10)
        for cat in (1, 2):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 1, "category_id": cat,
                                      "bbox": [x, 0.0, 8.0, 8.0], "area": 64.0, "iscrowd": 0})  # fmt: skip
            dets.append(
                {"image_id": 1, "category_id": cat, "bbox": [x, 0.0, 8.0, 8.0], "score": 1 - i / 1000}
            )
    metrics = score_files(tmp_path, gt, dets)
    assert_matches_pycocotools(metrics, gt, dets)
    assert metrics["mar_100"] == pytest.approx(100 / 150, abs=1e-6)  # not 50/150: the cut is per class


def test_crowd_regions_absorb_detections(tmp_path):
    gt = {
        "images": [{"id": 5}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0},
            {
                "id": 2,
                "image_id": 5,
                "category_id": 1,
                "bbox": [100, 100, 200, 200],
                "area": 30000,
                "iscrowd": 1,
            },
        ],
    }
    dets = [{"image_id": 5, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.5}] + [
        {"image_id": 5, "category_id": 1, "bbox": [110 + i, 110, 40, 40], "score": 0.9} for i in range(5)
    ]
    metrics = score_files(tmp_path, gt, dets)
    assert_matches_pycocotools(metrics, gt, dets)
    assert metrics["map"] == pytest.approx(1.0)  # the higher-scored detections inside the crowd are ignored


def test_annotation_area_decides_size_bucket(tmp_path):
    """A 40x40 box whose annotation area is 900 (< 32**2) is 'small' for pycocotools, and area 0 is kept."""
    gt = {
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 7, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 40, 40], "area": 900.0, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [0, 0, 40, 40], "area": 0.0, "iscrowd": 0},
        ],
    }
    dets = [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 40, 40], "score": 0.9}]
    metrics = score_files(tmp_path, gt, dets)
    assert_matches_pycocotools(metrics, gt, dets)
    assert metrics["map_medium"] == -1 and metrics["mar_small"] == pytest.approx(0.5)


def test_empty_prediction_file_matches_pycocotools(tmp_path):
    gt, _ = synthetic(3)
    metrics = score_files(tmp_path, gt, [])
    assert_matches_pycocotools(metrics, gt, [])
    assert metrics["map"] == 0.0 and metrics["voc10_ap50"] == 0.0 and metrics["mean_iou"] == -1


def test_ground_truth_without_annotations_gives_minus_one(tmp_path):
    gt, dets = synthetic(4)
    gt["annotations"] = []
    metrics = score_files(tmp_path, gt, dets)
    assert_matches_pycocotools(metrics, gt, dets)
    assert all(metrics[k] == -1 for k in COCO_KEYS)


def test_bootstrap_resample_equals_pycocotools_on_duplicated_images(tmp_path):
    """Re-running on resampled image indices (with repeats) scores repeats as separate images."""
    gt, dets = synthetic(5, n_images=10)
    gt_data, preds = load_dicts(tmp_path, gt, dets)
    idx = [4, 4, 1, 7, 7, 7, 0, 9, 3, 2]
    metrics = evaluate_detections(
        [preds[i] for i in idx], [gt_data.targets[i] for i in idx], gt_data.class_names
    )
    assert_matches_pycocotools(metrics, *resample_coco(gt, dets, gt_data.image_ids, idx))


def resample_coco(gt: dict, dets: list, image_ids: list[int], idx) -> tuple[dict, list]:
    """A resample as a COCO data set: image n of the resample (``image_ids[idx[n]]``) gets the new id n."""
    new_gt = {"categories": gt["categories"], "images": [{"id": n} for n in range(len(idx))], "annotations": []}
    new_dets = []
    for n, i in enumerate(idx):
        old = image_ids[i]
        for a in (a for a in gt["annotations"] if a["image_id"] == old):
            new_gt["annotations"].append({**a, "id": len(new_gt["annotations"]) + 1, "image_id": n})
        new_dets += [{**d, "image_id": n} for d in dets if d["image_id"] == old]
    return new_gt, new_dets


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_resampled_map_equals_pycocotools_run_on_the_resample(tmp_path, seed):
    """One matching re-accumulated per resample == pycocotools from scratch on the materialised resample
    (repeats, images without ground truth, crowd, > 100 detections, a class only in predictions, ties)."""
    gt, dets = synthetic(seed, n_images=10)
    gt_data, preds = load_dicts(tmp_path, gt, dets, box_format="xywh")
    resampler = ev.ResampledCocoMap(preds, gt_data.targets, gt_data.class_names, box_format="xywh")
    first_empty = [i for i, t in enumerate(gt_data.targets) if len(t["labels"]) == 0][:1] * 2
    resamples = [[4, 4, 1, 7, 7, 7, 0, 9, 3, 2], list(range(10)), first_empty,
                 *np.random.default_rng(seed).integers(0, 10, size=(3, 10))]  # fmt: skip
    for idx in resamples:
        stats, _, _ = pycocotools_eval(*resample_coco(gt, dets, gt_data.image_ids, idx))
        assert resampler.map(idx) == pytest.approx(stats[0], rel=0, abs=1e-12), list(idx)
    assert resampler.map(first_empty) == -1  # no ground truth at all in that resample
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        resampler.map([0, 10])


def test_boundary_area_and_iou_are_exact(tmp_path):
    """A 32x32 detection at x = 0.3 has w*h == 1024 in the file but (32.3 - 0.3)**2 != 1024 after an XYXY
    round trip; pycocotools counts it as small AND medium. IoUs of exactly 0.5 and 0.75 match (>=)."""
    assert (0.3 + 32.0) - 0.3 != 32.0  # the premise
    gt = {
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [300, 300, 50, 50],
                "area": 2500,
                "iscrowd": 0,
            },
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0},
        ],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0.3, 0.3, 32.0, 32.0], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [300, 300, 50, 50], "score": 0.5},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 5], "score": 0.8},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 7.5], "score": 0.7},
    ]
    metrics = score_files(tmp_path, gt, dets)
    assert_matches_pycocotools(metrics, gt, dets)
    assert metrics["map_medium"] == pytest.approx(0.5)  # the unmatched 32x32 detection is a medium FP


# ------------------------------------------------------------------------------------- file errors


@pytest.mark.parametrize(
    ("gt_text", "dt_text", "bad", "message"),
    [
        ("{not json", "[]", "gt", "malformed JSON"),
        ('{"images": [], "categories": []}', "[]", "gt", "'annotations'"),
        ('{"images": [{"id": 1}], "categories": [{"id": 1}], "annotations": []}', "[]", "gt", "'name'"),
        ('{"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": '
         '[{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]}', "[]", "gt", "image_id 2"),
        (None, '{"annotations": []}', "dt", "JSON list"),
        (None, '[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}]', "dt", "'bbox'"),
        (None, '[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]', "dt", "'score'"),
        (None, '[{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]', "dt", "[9]"),
        (None, '[{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1}]', "dt", "category_id 5"),
    ],
)  # fmt: skip
def test_bad_files_raise_value_error_naming_the_file(tmp_path, gt_text, dt_text, bad, message):
    gt_text = gt_text or '{"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": []}'
    (tmp_path / "gt.json").write_text(gt_text)
    (tmp_path / "dt.json").write_text(dt_text)
    with pytest.raises(ValueError, match=message) as info:
        evaluate(tmp_path / "gt.json", tmp_path / "dt.json")
    assert str(tmp_path / f"{bad}.json") in str(info.value)


# ------------------------------------------------------------------------------------------ VOC AP


def test_voc_ap_11_point_and_all_point_differ():
    # ranked TP, FP, TP with 2 positives: recall .5 .5 1, precision 1 .5 2/3
    rec, prec = [0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # recall never reaches 1: 11-point counts t = 0 .. 0.5 only
    assert voc_ap([0.5], [1.0], use_07_metric=True) == pytest.approx(6 / 11)
    assert voc_ap([0.5], [1.0], use_07_metric=False) == pytest.approx(0.5)
    # recall exactly 3/10 reaches the t = 0.3 point (np.arange's 0.30000000000000004 would miss it)
    assert voc_ap([0.3], [1.0], use_07_metric=True) == pytest.approx(4 / 11)
    assert voc_ap([], [], True) == 0 and voc_ap([], [], False) == 0


def _img(boxes, labels, scores=None, **extra):
    d = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels).long(),
    }
    if scores is not None:
        d["scores"] = torch.tensor(scores, dtype=torch.float32)
    return d | {k: torch.tensor(v) for k, v in extra.items()}


def _difficult_case():
    """Class 1, 3 GT (the last difficult). Ranked detections: d1 on A (IoU 1, TP), d2 on A again (FP, duplicate),
    d3 on the difficult C (ignored), d4 IoU 0.25 with B (FP), d5 on B (IoU 0.81, TP)."""
    target = _img(
        [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [1, 1, 1], difficult=[False, False, True]
    )
    pred = _img(
        [[0, 0, 10, 10], [0, 0, 10, 9], [40, 0, 50, 10], [20, 0, 25, 5], [20, 0, 29, 9]],
        [1, 1, 1, 1, 1],
        [0.9, 0.8, 0.7, 0.6, 0.5],
    )
    return pred, target


def test_voc_evaluate_difficult_objects_are_ignored():
    pred, target = _difficult_case()
    # npos 2; after dropping d3: TP FP FP TP -> precision 1 .5 1/3 .5, recall .5 .5 .5 1
    r10 = voc_evaluate([pred], [target], num_classes=2, use_07_metric=False)
    assert r10.ap[0] == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert r10.ap[1] == -1 and r10.map == pytest.approx(0.75)  # class 2 has no ground truth
    r07 = voc_evaluate([pred], [target], num_classes=2, use_07_metric=True)
    assert r07.ap[0] == pytest.approx((6 * 1 + 5 * 0.5) / 11)
    np.testing.assert_allclose(r10.matched_iou[0], [1.0, 0.81])
    # without the difficult flag C is a positive and d3 a TP: TP FP TP FP TP over 3 positives
    target.pop("difficult")
    r = voc_evaluate([pred], [target], num_classes=1)
    assert r.ap[0] == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 5)


def test_voc_evaluate_plus_one_pixel_convention():
    target = _img([[0, 0, 10, 10]], [1])
    exact_half = voc_evaluate([_img([[0, 0, 10, 5]], [1], [0.9])], [target], num_classes=1)
    assert exact_half.ap[0] == 1.0  # IoU exactly 0.5 matches (devkit: ovmax >= minoverlap)
    pred = _img([[0, 0, 10, 4.6]], [1], [0.9])
    plain = voc_evaluate([pred], [target], num_classes=1)  # IoU 46/100: miss
    assert plain.ap[0] == 0 and plain.matched_iou[0].size == 0
    devkit = voc_evaluate([pred], [target], num_classes=1, plus_one=True)  # IoU (11 * 5.6) / 121
    assert devkit.ap[0] == pytest.approx(1.0)
    np.testing.assert_allclose(devkit.matched_iou[0], [11 * 5.6 / 121], rtol=1e-6)


def test_voc_ranking_is_global_across_images():
    # image 1: a TP at 0.9 and an FP at 0.8; image 2: a TP at 0.85 -> ranked TP TP FP, 2 positives
    p1 = _img([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1], [0.9, 0.8])
    p2 = _img([[0, 0, 10, 10]], [1], [0.85])
    t = _img([[0, 0, 10, 10]], [1])
    assert voc_evaluate([p1, p2], [t, t], num_classes=1).ap[0] == pytest.approx(1.0)
    # FP scored highest: precision 0, 1/2, 2/3 at recall 0, .5, 1; the envelope lifts the 1/2 to 2/3
    p1["scores"] = torch.tensor([0.9, 0.95])
    assert voc_evaluate([p1, p2], [t, t], num_classes=1).ap[0] == pytest.approx(2 / 3)
    assert voc_evaluate([p1, p2], [t, t], num_classes=1, use_07_metric=True).ap[0] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ DetectionEvaluator


def test_evaluator_flat_float_output_with_voc_and_iou_keys():
    pred, target = _difficult_case()
    target["iscrowd"] = torch.zeros(3, dtype=torch.int64)
    pred2, target2 = _img([[0, 0, 8, 8]], [2], [0.3]), _img([[0, 0, 10, 10]], [2])  # IoU .64
    evaluator = DetectionEvaluator(["one", "two", "three"])
    evaluator.update([pred], [target])
    evaluator.update([pred2], [target2])
    out = evaluator.compute()
    assert all(type(v) is float for v in out.values())
    assert set(COCO_KEYS) <= set(out)
    assert out["ap/three"] == -1 and out["iou/three"] == -1 and out["voc10_ap50/three"] == -1
    assert out["voc10_ap50/one"] == pytest.approx(0.75) and out["voc10_ap50/two"] == pytest.approx(1.0)
    assert out["voc10_ap50"] == pytest.approx((0.75 + 1.0) / 2)
    assert out["voc07_ap50/one"] == pytest.approx(8.5 / 11)
    assert out["iou/one"] == pytest.approx((1.0 + 0.81) / 2) and out["iou/two"] == pytest.approx(0.64)
    assert out["mean_iou"] == pytest.approx((1.0 + 0.81 + 0.64) / 3)  # over all matched detections
    # COCO side: pycocotools knows no ``difficult``, so class one is TP FP TP FP TP over 3 positives; its
    # 101-point envelope is 1 for recall <= 1/3 (34 points), 2/3 up to 2/3 (33), 0.6 up to 1 (34)
    assert out["map_50"] == pytest.approx(((34 + 33 * 2 / 3 + 34 * 0.6) / 101 + 1.0) / 2, abs=1e-6)


def _model_like(tmp_path, seed: int):
    """The synthetic set's ground truth and ``(preds, targets)`` in float32, what a model produces."""
    gt_data, preds = load_dicts(tmp_path, *synthetic(seed))
    f32 = lambda ds: [{k: v.float() if v.is_floating_point() else v for k, v in d.items()} for d in ds]  # noqa: E731
    return gt_data, f32(preds), f32(gt_data.targets)


def test_evaluator_batches_and_reset(tmp_path):
    gt_data, preds, targets = _model_like(tmp_path, 6)
    evaluator = DetectionEvaluator(gt_data.class_names)
    evaluator.update(preds[:1], targets[:1])  # a first epoch that reset() must forget
    evaluator.compute()
    evaluator.reset()
    for i in range(0, len(preds), 4):
        evaluator.update(preds[i : i + 4], targets[i : i + 4])
    out = evaluator.compute()
    assert out == evaluate_detections(preds, targets, gt_data.class_names)
    back_preds, back_targets = evaluator.images()
    assert len(back_preds) == len(preds)
    assert torch.equal(back_targets[3]["boxes"], targets[3]["boxes"])
    assert torch.equal(back_targets[3]["area"], targets[3]["area"])
    result = evaluator.coco_result()
    assert result.precision.shape == (10, 101, 4, 4, 3)
    assert result.metrics["map"] == pytest.approx(out["map"])


def test_evaluator_update_without_images_adds_typed_empty_states(tmp_path):
    # What a DDP process whose batches were all unreadable does, so it can join the gather: no image is added,
    # and every state has the dtype and rank of a real update's (gloo gathers need both to match).
    gt_data, preds, targets = _model_like(tmp_path, 6)
    evaluator = DetectionEvaluator(gt_data.class_names)
    evaluator.update([], [])
    empty = {name: getattr(evaluator, name)[0] for name in evaluator._defaults}
    assert all(t.numel() == 0 for t in empty.values())
    evaluator.update(preds, targets)
    real = {name: getattr(evaluator, name)[1] for name in evaluator._defaults}
    for name, t in empty.items():
        assert (t.dtype, t.dim()) == (real[name].dtype, real[name].dim()), name
    assert evaluator.compute() == evaluate_detections(preds, targets, gt_data.class_names)


def test_evaluator_rejects_bad_input():
    evaluator = DetectionEvaluator(["a", "b"])
    good_t = _img([[0, 0, 1, 1]], [1])
    with pytest.raises(ValueError, match=r"prediction 0: labels must lie in 1..2 \(class_names\), got \[3\]"):
        evaluator.update([_img([[0, 0, 1, 1]], [3], [0.5])], [good_t])
    good_p = _img([[0, 0, 1, 1]], [2], [0.5])
    with pytest.raises(ValueError, match=r"target 1: labels must lie in 1..2 \(class_names\), got \[1, 0\]"):
        evaluator.update([good_p, good_p], [good_t, _img([[0, 0, 1, 1], [1, 1, 2, 2]], [1, 0])])
    with pytest.raises(ValueError, match="missing keys"):
        evaluator.update([_img([[0, 0, 1, 1]], [1])], [good_t])
    with pytest.raises(ValueError, match="1 prediction dicts but 2"):
        evaluator.update([_img([[0, 0, 1, 1]], [1], [0.5])], [good_t, good_t])
    with pytest.raises(ValueError, match="unique"):
        DetectionEvaluator(["a", "a"])


def test_evaluator_in_lightning_validation_loop():
    import lightning as L

    class Perfect(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.evaluator = DetectionEvaluator(["cat", "dog"])

        def validation_step(self, batch, batch_idx):
            targets = batch
            preds = [
                {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
                for t in targets
            ]
            self.evaluator.update(preds, targets)

        def on_validation_epoch_end(self):
            self.log_dict({f"val_{k}": v for k, v in self.evaluator.compute().items()})
            self.evaluator.reset()

    data = [[_img([[0, 0, 10, 10], [5, 5, 40, 30]], [1, 2])], [_img([[1, 1, 3, 3]], [2])]]
    module = Perfect().to(torch.device("cpu"))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (logged,) = trainer.validate(module, dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert logged["val_map"] == pytest.approx(1.0) and logged["val_ap/dog"] == pytest.approx(1.0)
    assert logged["val_mean_iou"] == pytest.approx(1.0)
    assert module.evaluator.det_counts == []  # reset() emptied the states


def test_evaluator_scores_a_repeated_image_id_once(tmp_path):
    # DistributedSampler pads the last processes' validation shares with the first images again.
    gt, dets = synthetic(8)
    gt_data, preds = load_dicts(tmp_path, gt, dets)
    targets = [{**t, "image_id": i} for t, i in zip(gt_data.targets, gt_data.image_ids, strict=True)]
    expected = evaluate_detections(preds, targets, gt_data.class_names)
    with_ids, without_ids = DetectionEvaluator(gt_data.class_names), DetectionEvaluator(gt_data.class_names)
    for a, b in [(0, 8), (8, 14), (0, 2)]:  # images 0 and 1 twice
        with_ids.update(preds[a:b], targets[a:b])
        without_ids.update(preds[a:b], gt_data.targets[a:b])
    assert with_ids.compute() == pytest.approx(expected, abs=1e-12)
    assert without_ids.compute() != pytest.approx(expected, abs=1e-6)  # no ids: the repeats count (the premise)
    named = DetectionEvaluator(gt_data.class_names)  # ids that are not integers (file names): never merged
    for a, b in [(0, 8), (8, 14), (0, 2)]:
        named.update(preds[a:b], [{**t, "image_id": f"img{i}"} for i, t in enumerate(targets[a:b], start=a)])
    assert named.compute() == pytest.approx(without_ids.compute(), abs=1e-12)


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    Path(out_dir, str(rank)).mkdir()
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    gt, dets = synthetic(7)
    gt_data, preds = load_dicts(Path(out_dir, str(rank)).resolve(), gt, dets)
    targets = [{**t, "image_id": i} for t, i in zip(gt_data.targets, gt_data.image_ids, strict=True)]
    evaluator = DetectionEvaluator(gt_data.class_names)
    # uneven image counts and update counts; rank 1 ends with image 0 again, as DistributedSampler pads
    parts = [(0, 3), (3, 5)] if rank == 0 else [(5, 14), (0, 1)]
    for a, b in parts:
        evaluator.update(preds[a:b], targets[a:b])
    Path(out_dir, f"{rank}.json").write_text(json.dumps(evaluator.compute()))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_evaluator_gathers_across_ddp_processes(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    gt, dets = synthetic(7)
    gt_data, preds = load_dicts(tmp_path, gt, dets)
    order = [*range(0, 5), *range(5, 14)]  # rank 0's images, then rank 1's
    expected = evaluate_detections(
        [preds[i] for i in order], [gt_data.targets[i] for i in order], gt_data.class_names
    )
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------------------------------- display


def test_tables_show_values_and_na():
    metrics = {k: 0.5 for k in COCO_KEYS} | {
        "map_small": -1.0,
        "voc07_ap50": 0.25,
        "voc10_ap50": 0.3,
        "mean_iou": 0.7,
    }
    metrics |= {"ap/cat": 0.125, "ap/dog": -1.0, "voc07_ap50/cat": 0.2, "voc10_ap50/cat": 0.3, "iou/cat": 0.9}
    console = Console(record=True, width=150)
    console.print(format_metrics_table(metrics))
    console.print(format_class_table(metrics))
    text = console.export_text()
    assert "IoU=0.50:0.95 | area= small" in text and "n/a" in text and "0.2500" in text
    cat_row = next(line for line in text.splitlines() if " cat " in line)
    assert all(v in cat_row for v in ("0.1250", "0.2000", "0.3000", "0.9000"))
    dog_row = next(line for line in text.splitlines() if " dog " in line)
    assert dog_row.count("n/a") == 4 and not math.isnan(metrics["ap/dog"])
