"""detectors.evaluation.voc: VOC AP and the devkit's matching against hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from detectors import evaluation as ev
from detectors.evaluation import voc_ap, voc_evaluate
from detectors.evaluation.voc import voc_match

from .helpers import difficult_case, img


def test_box_iou_is_torchvisions():
    assert ev.box_iou is torchvision.ops.box_iou


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


def test_voc_evaluate_difficult_objects_are_ignored():
    pred, target = difficult_case()
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
    target = img([[0, 0, 10, 10]], [1])
    exact_half = voc_evaluate([img([[0, 0, 10, 5]], [1], [0.9])], [target], num_classes=1)
    assert exact_half.ap[0] == 1.0  # IoU exactly 0.5 matches (devkit: ovmax >= minoverlap)
    pred = img([[0, 0, 10, 4.6]], [1], [0.9])
    plain = voc_evaluate([pred], [target], num_classes=1)  # IoU 46/100: miss
    assert plain.ap[0] == 0 and plain.matched_iou[0].size == 0
    devkit = voc_evaluate([pred], [target], num_classes=1, plus_one=True)  # IoU (11 * 5.6) / 121
    assert devkit.ap[0] == pytest.approx(1.0)
    np.testing.assert_allclose(devkit.matched_iou[0], [11 * 5.6 / 121], rtol=1e-6)


def test_voc_ranking_is_global_across_images():
    # image 1: a TP at 0.9 and an FP at 0.8; image 2: a TP at 0.85 -> ranked TP TP FP, 2 positives
    p1 = img([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1], [0.9, 0.8])
    p2 = img([[0, 0, 10, 10]], [1], [0.85])
    t = img([[0, 0, 10, 10]], [1])
    assert voc_evaluate([p1, p2], [t, t], num_classes=1).ap[0] == pytest.approx(1.0)
    # FP scored highest: precision 0, 1/2, 2/3 at recall 0, .5, 1; the envelope lifts the 1/2 to 2/3
    p1["scores"] = torch.tensor([0.9, 0.95])
    assert voc_evaluate([p1, p2], [t, t], num_classes=1).ap[0] == pytest.approx(2 / 3)
    assert voc_evaluate([p1, p2], [t, t], num_classes=1, use_07_metric=True).ap[0] == pytest.approx(2 / 3)


def devkit_match(preds, targets, num_classes, iou_threshold):
    """The VOC devkit's loop, literally: every detection of every image ranked by score (ties: image order,
    then input order) takes the ground truth of its class in its image with the highest IoU."""
    ranked = sorted(
        ((float(s), i, int(c), b) for i, p in enumerate(preds)
         for b, s, c in zip(p["boxes"].double(), p["scores"], p["labels"], strict=True)),
        key=lambda row: -row[0],
    )  # fmt: skip
    tp, fp, tp_iou = ([[] for _ in range(num_classes)] for _ in range(3))
    taken = set()
    for _, i, c, box in ranked:
        mine = targets[i]["labels"] == c
        ious = torchvision.ops.box_iou(box[None], targets[i]["boxes"].double()[mine])[0].numpy()
        j = int(np.argmax(ious)) if ious.size else -1  # first maximum, like MATLAB's max
        if j < 0 or ious[j] < iou_threshold:
            is_tp, is_fp = 0.0, 1.0
        elif targets[i]["difficult"][mine][j]:
            is_tp, is_fp = 0.0, 0.0
        elif (i, c, j) in taken:
            is_tp, is_fp = 0.0, 1.0
        else:
            taken.add((i, c, j))
            is_tp, is_fp = 1.0, 0.0
            tp_iou[c - 1].append(ious[j])
        tp[c - 1].append(is_tp)
        fp[c - 1].append(is_fp)
    return tp, fp, tp_iou


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5])
def test_voc_matching_equals_the_devkit_loop(iou_threshold):
    """One IoU matrix per image gives the devkit's loop's TP, FP and IoUs exactly: duplicates, tied scores and
    IoUs (boxes on a coarse grid), difficult ground truth, images without ground truth or detections."""
    rng = np.random.default_rng(0)

    def boxes(n):
        xy = rng.integers(0, 12, (n, 2))
        return np.concatenate([xy, xy + rng.integers(2, 8, (n, 2))], axis=1).tolist()

    preds, targets = [], []
    for n_gt, n_det in [(0, 4), (3, 0), *rng.integers(0, 8, (20, 2)).tolist()]:
        gt_boxes, gt_labels = boxes(n_gt), rng.integers(1, 4, n_gt).tolist()
        # jittered copies of the ground truth (TPs and duplicates), except in the image without detections
        n_copies = rng.integers(0, 3, n_gt) if n_det else np.zeros(n_gt, dtype=np.int64)
        copies = [(b, c) for b, c, n in zip(gt_boxes, gt_labels, n_copies, strict=True) for _ in range(n)]
        det_boxes = [(np.array(b) + rng.integers(-1, 2, 4)).tolist() for b, _ in copies] + boxes(n_det)
        det_labels = [c for _, c in copies] + rng.integers(1, 4, n_det).tolist()
        targets.append(img(gt_boxes, gt_labels, difficult=rng.random(n_gt) < 0.2))
        preds.append(img(det_boxes, det_labels, np.round(rng.random(len(det_labels)), 1)))
    tp, fp, tp_iou = devkit_match(preds, targets, 3, iou_threshold)
    m = voc_match(preds, targets, 3, iou_threshold, plus_one=False)
    for k in range(3):
        np.testing.assert_array_equal(m.tp[k], tp[k])
        np.testing.assert_array_equal(m.fp[k], fp[k])
        np.testing.assert_array_equal(m.tp_iou[k], tp_iou[k])
    assert sum(map(sum, tp)) > 10 and sum(map(sum, fp)) > 10  # the premise: both kinds occur often
