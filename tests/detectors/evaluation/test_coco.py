"""detectors.evaluation.coco: the 12 COCO stats, per-class AP and the precision array against pycocotools (run
here), on the real COCO subset and on synthetic files that exercise every rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.cocoeval import Params

from detectors.evaluation import (
    COCO_KEYS,
    coco_evaluate,
    coco_map_metric,
    evaluate,
    evaluate_detections,
    load_coco_ground_truth,
    load_coco_predictions,
)

from .helpers import (
    DT100,
    GT100,
    README_STATS,
    assert_matches_pycocotools,
    load_dicts,
    needs_coco100,
    pycocotools_eval,
    resample_coco,
    score_files,
    synthetic,
    write_files,
)


def test_thresholds_are_pycocotools_own():
    metric = coco_map_metric()
    p = Params(iouType="bbox")
    assert metric.iou_thresholds == p.iouThrs.tolist()  # exact float64 equality, not torch's float32 linspace
    assert metric.rec_thresholds == p.recThrs.tolist()
    assert metric.max_detection_thresholds == p.maxDets
    assert metric.class_metrics and metric._coco_backend.backend == "faster_coco_eval"
    assert coco_map_metric(class_metrics=False).class_metrics is False


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
    expected = {k: v for k, v in ours.items() if not k.startswith("ap/")}
    assert fast.keys() == expected.keys()  # torchmetrics' stats are float32, the direct path's float64
    assert fast == pytest.approx(expected, abs=1e-7)


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


def test_evaluate_command_without_voc_gives_the_coco_numbers_alone(tmp_path, train_py):
    """``train.py evaluate --voc false``: the same COCO keys and values as with VOC (pycocotools' numbers), and
    no VOC or matched-IoU key, in the JSON and in the printed tables."""
    gt, dets = synthetic(4)
    gt_path, dt_path = write_files(tmp_path, gt, dets)
    code, stdout, _ = train_py("evaluate", "--gt", gt_path, "--predictions", dt_path, "--out", tmp_path / "m.json",
                               "--voc", "false")  # fmt: skip
    assert code == 0 and "map_50" in stdout and "voc07_ap50" not in stdout
    without = json.loads((tmp_path / "m.json").read_text())
    assert_matches_pycocotools(without, gt, dets)
    full = evaluate(gt_path, dt_path)
    assert {k for k in full if k.startswith(("voc", "iou/", "mean_iou"))}  # the premise: VOC keys exist
    assert without == {k: v for k, v in full.items() if not k.startswith(("voc", "iou/", "mean_iou"))}
