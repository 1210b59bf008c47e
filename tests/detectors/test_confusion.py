"""detectors.confusion: the confusion matrix on hand-worked images, against pycocotools' matching, and its
readings; the PNG and CSV written by the report (tests/detectors/test_compare.py runs the real command)."""

from __future__ import annotations

import csv
import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from torchvision.ops import box_iou

from detectors.confusion import confusion_matrix, match_image
from detectors.report import confusion_stems, plot_confusion
from training.errors import BadValueError

from .evaluation.helpers import img, load_dicts, pycocotools_eval, synthetic

CLASSES = ["rectangle", "ellipse", "triangle"]  # labels 1, 2, 3; matrix index 0, 1, 2, background 3
RECT, ELL, TRI = 1, 2, 3


def hand_case() -> tuple[list[dict], list[dict]]:
    """Six images; what each detection and object should count as is worked out in the comments."""
    preds, targets = [], []
    # 1. objects: A rectangle, B ellipse, C triangle, and a crowd of rectangles R
    targets.append(img([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [60, 0, 100, 40]],
                       [RECT, ELL, TRI, RECT], iscrowd=[0, 0, 0, 1]))  # fmt: skip
    preds.append(img(
        [[0, 0, 10, 10],     # d1 0.9 rectangle on A: correct                          -> [rect, rect]
         [20, 0, 30, 10],    # d2 0.8 triangle on B: wrong class                       -> [tri, ell]
         [0, 0, 10, 9],      # d3 0.7 rectangle on A again (IoU 0.9): duplicate        -> [rect, bg]
         [40, 0, 50, 10],    # d4 0.1 ellipse on C: below the score threshold, C missed -> [bg, tri]
         [70, 10, 80, 20],   # d5 0.6 rectangle inside R (IoU 1/16, but crowd overlap 1): ignored
         [0, 50, 10, 60]],   # d6 0.5 ellipse on nothing: background false positive    -> [ell, bg]
        [RECT, TRI, RECT, ELL, RECT, ELL], [0.9, 0.8, 0.7, 0.1, 0.6, 0.5]))  # fmt: skip
    # 2. no objects: d7 0.95 triangle -> [tri, bg]
    targets.append(img([], []))
    preds.append(img([[5, 5, 15, 15]], [TRI], [0.95]))
    # 3. an ellipse nothing finds -> [bg, ell]; a difficult triangle nothing finds: not missed, ignored
    targets.append(img([[0, 0, 20, 20], [30, 30, 50, 50]], [ELL, TRI], difficult=[False, True]))
    preds.append(img([], [], []))
    # 4. a difficult rectangle with a rectangle on it (IoU 0.81): ignored, as the VOC devkit does
    targets.append(img([[0, 0, 10, 10]], [RECT], difficult=[True]))
    preds.append(img([[0, 0, 9, 9]], [RECT], [0.8]))
    # 5. a rectangle E: an ellipse on it scored 0.9, a rectangle on it scored 0.6. Own class first: the
    #    rectangle is correct -> [rect, rect]; the ellipse is wrong class on a found object -> [ell, rect]
    targets.append(img([[0, 0, 10, 10]], [RECT]))
    preds.append(img([[0, 0, 10, 10], [0, 1, 10, 10]], [ELL, RECT], [0.9, 0.6]))
    # 6. a triangle found by a triangle scored exactly the threshold: counted (score >= 0.25) -> [tri, tri];
    #    a rectangle found by a rectangle at IoU exactly 0.5: counted (IoU >= 0.5) -> [rect, rect]
    targets.append(img([[0, 0, 10, 10], [20, 0, 30, 10]], [TRI, RECT]))
    preds.append(img([[1, 1, 10, 10], [20, 0, 30, 5]], [TRI, RECT], [0.25, 0.9]))
    return preds, targets


# rows: predicted rectangle, ellipse, triangle, background; columns: true, same order
HAND_MATRIX = [
    [3, 0, 0, 1],  # d1, image 5's and image 6's rectangles correct; d3 a duplicate
    [1, 0, 0, 1],  # the ellipse on image 5's found rectangle; d6 on nothing
    [0, 1, 1, 1],  # d2 on the ellipse B; image 6's triangle; d7 on an empty image
    [0, 1, 1, 0],  # image 3's ellipse, C (its only detection scored below the threshold)
]


def test_hand_built_matrix():
    c = confusion_matrix(*hand_case(), CLASSES)
    np.testing.assert_array_equal(c.matrix, HAND_MATRIX)
    assert (c.correct, c.wrong_class, c.background_fp, c.missed, c.errors) == (4, 2, 3, 2, 7)
    assert c.objects.tolist() == [3, 2, 2]  # A, E, image 6's; B, image 3's; C, image 6's (no crowd, difficult)
    assert (c.wrong_on_found, c.duplicates, c.ignored) == (1, 1, 2)  # image 5's ellipse; d3; d5, image 4's
    assert c.shares() == pytest.approx({"wrong_class": 2 / 7, "background_fp": 3 / 7, "missed": 2 / 7})
    assert c.reading("m") == ("m: of its 7 errors, 29% wrong class (1 on objects also found right), 43% "
                              "background false positives (1 duplicate), 29% missed objects; 4 of 7 objects "
                              "found with the right class")  # fmt: skip
    norm = c.normalised()  # class columns per object of the class, the background column per false positive
    np.testing.assert_allclose(norm[:, 0], [1, 1 / 3, 0, 0])  # all 3 rectangles found; one also as an ellipse
    np.testing.assert_allclose(norm[:, 1], [0, 0, 0.5, 0.5])  # ellipses: one called a triangle, one missed
    np.testing.assert_allclose(norm[:3, 3], [1 / 3, 1 / 3, 1 / 3])
    assert math.isnan(norm[3, 3])


def test_thresholds_change_the_counts():
    preds, targets = hand_case()
    low = confusion_matrix(preds, targets, CLASSES, score_threshold=0.05)  # d4 now counts: C found as ellipse
    assert low.matrix[ELL - 1, TRI - 1] == 1 and low.matrix[3, TRI - 1] == 0
    # IoU 0.95: image 6's triangle (IoU 0.81) is a false positive and its object missed; image 5's rectangle
    # (IoU 0.9) too, but its ellipse (IoU 1) still lies on it: wrong class, not missed; d3 (IoU 0.9): nothing
    strict = confusion_matrix(preds, targets, CLASSES, iou_threshold=0.95)
    assert strict.matrix[TRI - 1, TRI - 1] == 0 and strict.matrix[3, TRI - 1] == 2
    assert strict.matrix[ELL - 1, RECT - 1] == 1 and strict.matrix[RECT - 1, 3] == 4  # + image 6's rectangle
    assert strict.wrong_on_found == strict.duplicates == 0  # E is found by nothing; d3 overlaps A too little
    assert strict.ignored == 1  # image 4's rectangle (IoU 0.81 with its difficult object) no longer ignored


def test_same_class_first_then_the_best_overlap():
    target = img([[0, 0, 10, 10], [0, 0, 10, 9]], [RECT, ELL])  # a rectangle and an ellipse, IoU 0.9
    # a triangle takes the object it overlaps most, the other is missed
    on_ellipse = confusion_matrix([img([[0, 0, 10, 9]], [TRI], [0.9])], [target], CLASSES)
    on_rectangle = confusion_matrix([img([[0, 0, 10, 10]], [TRI], [0.9])], [target], CLASSES)
    assert on_ellipse.matrix[TRI - 1, ELL - 1] == 1 and on_ellipse.matrix[3, RECT - 1] == 1
    assert on_rectangle.matrix[TRI - 1, RECT - 1] == 1 and on_rectangle.matrix[3, ELL - 1] == 1
    # a rectangle on the ellipse (IoU 1) still takes the rectangle (IoU 0.9): its own class first
    rect = confusion_matrix([img([[0, 0, 10, 9]], [RECT], [0.9])], [target], CLASSES)
    assert rect.matrix[RECT - 1, RECT - 1] == 1 and rect.matrix[3, ELL - 1] == 1 and rect.errors == 1


def test_diagonal_and_false_positives_are_pycocotools(tmp_path):
    """Own-class matching is COCO's: per class, the diagonal is pycocotools' TP count at IoU 0.5 among the
    detections scoring >= the threshold, a row's other cells its FP count, ignored detections its dtIgnore,
    the objects its non-ignored ground truth (a synthetic set with crowd regions and wrong classes)."""
    gt, dets = synthetic(seed=3)
    threshold = 0.4
    gt_data, preds = load_dicts(tmp_path, gt, dets)
    c = confusion_matrix(preds, gt_data.targets, gt_data.class_names, score_threshold=threshold)
    kept = [d for d in dets if d["score"] >= threshold]
    per_image_class = Counter((d["image_id"], d["category_id"]) for d in kept)
    assert max(per_image_class.values()) <= 100  # pycocotools' maxDets drops no detection here
    _, _, E = pycocotools_eval(gt, kept)
    n_img, k = len(E.params.imgIds), len(E.params.catIds)
    tp, fp, ignored, positives = np.zeros(k, int), np.zeros(k, int), 0, np.zeros(k, int)
    for ki in range(k):
        for e in E.evalImgs[ki * 4 * n_img : ki * 4 * n_img + n_img]:  # area range "all"
            if e is None:
                continue
            matched, dt_ignored = e["dtMatches"][0] > 0, e["dtIgnore"][0].astype(bool)  # IoU 0.5
            tp[ki] += int((matched & ~dt_ignored).sum())
            fp[ki] += int((~matched & ~dt_ignored).sum())
            ignored += int(dt_ignored.sum())
            positives[ki] += int((~e["gtIgnore"].astype(bool)).sum())
    assert tp.sum() > 10 and fp.sum() > 10 and ignored > 0 and c.wrong_class > 0  # every rule exercised
    np.testing.assert_array_equal(np.diag(c.matrix)[:k], tp)
    np.testing.assert_array_equal(c.matrix[:k].sum(axis=1) - np.diag(c.matrix)[:k], fp)
    np.testing.assert_array_equal(c.objects, positives)
    assert c.ignored == ignored


def test_tied_objects_are_taken_last_first_as_pycocotools():
    # two copies of one rectangle: the first detection takes the last copy (pycocotools' evaluateImg keeps the
    # last of equal IoUs); the second detection overlaps the first copy more (IoU 0.9 vs 0.81) and takes it
    target = img([[0, 0, 10, 10], [0, 0, 10, 10]], [RECT, RECT])
    pred = img([[0, 0, 10, 10], [0, 0, 10, 9]], [RECT, RECT], [0.9, 0.8])
    overlap = box_iou(pred["boxes"].double(), target["boxes"].double()).numpy()
    target_of, correct = match_image(overlap, np.array([RECT, RECT]), np.array([RECT, RECT]),
                                     np.zeros(2, dtype=bool), 0.5)  # fmt: skip
    assert target_of.tolist() == [1, 0] and correct.all()


def test_no_errors_and_empty_split():
    target = img([[0, 0, 10, 10]], [RECT])
    perfect = confusion_matrix([img([[0, 0, 10, 10]], [RECT], [0.9])], [target], CLASSES)
    assert perfect.errors == 0 and all(math.isnan(v) for v in perfect.shares().values())
    assert perfect.reading("p") == "p: no errors; 1 of 1 objects found with the right class"
    nothing = confusion_matrix([img([], [], [])], [img([], [])], CLASSES)
    assert nothing.matrix.sum() == nothing.objects.sum() == 0 and np.isnan(nothing.normalised()).all()


@pytest.mark.parametrize(("iou", "score"), [(0.0, 0.25), (1.5, 0.25), (0.5, -0.1), (0.5, 2.0)])
def test_thresholds_are_checked(iou, score):
    says = f"IoU threshold <= 1 and 0 <= score threshold <= 1, got {iou} and {score}"
    with pytest.raises(BadValueError, match=says):
        confusion_matrix([img([], [], [])], [img([], [])], CLASSES, iou, score)


def test_png_and_csv_table(tmp_path):
    c = confusion_matrix(*hand_case(), CLASSES)
    plot_confusion(c, "frcnn", tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 300
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows(c.table())
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["predicted \\ true", *CLASSES, "background"]
    assert [r[0] for r in rows[1:]] == [*CLASSES, "background"]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == HAND_MATRIX


def test_file_stems_are_safe_and_distinct():
    assert confusion_stems(["faster_rcnn", "runs/a", "runs_a", "x#1"]) == [
        "confusion_faster_rcnn", "confusion_runs_a_2", "confusion_runs_a_3", "confusion_x_1"]  # fmt: skip
