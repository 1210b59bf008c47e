"""Shared by the detectors.evaluation tests: pycocotools run on the same data as the reference, COCO files
written to disk, a synthetic COCO set exercising every rule at once, and small hand-made image dicts."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.evaluation import COCO_KEYS, evaluate, load_coco_ground_truth, load_coco_predictions

COCO100 = Path(
    os.environ.get(
        "LITVISION_COCO100", Path(__file__).resolve().parents[3] / ".." / "shared/data/coco-val2014-100"
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


def img(boxes, labels, scores=None, **extra):
    d = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels).long(),
    }
    if scores is not None:
        d["scores"] = torch.tensor(scores, dtype=torch.float32)
    return d | {k: torch.tensor(v) for k, v in extra.items()}


def difficult_case():
    """Class 1, 3 GT (the last difficult). Ranked detections: d1 on A (IoU 1, TP), d2 on A again (FP, duplicate),
    d3 on the difficult C (ignored), d4 IoU 0.25 with B (FP), d5 on B (IoU 0.81, TP)."""
    target = img(
        [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [1, 1, 1], difficult=[False, False, True]
    )
    pred = img(
        [[0, 0, 10, 10], [0, 0, 10, 9], [40, 0, 50, 10], [20, 0, 25, 5], [20, 0, 29, 9]],
        [1, 1, 1, 1, 1],
        [0.9, 0.8, 0.7, 0.6, 0.5],
    )
    return pred, target


def model_like(tmp_path, seed: int):
    """The synthetic set's ground truth and ``(preds, targets)`` in float32, what a model produces."""
    gt_data, preds = load_dicts(tmp_path, *synthetic(seed))
    f32 = lambda ds: [{k: v.float() if v.is_floating_point() else v for k, v in d.items()} for d in ds]  # noqa: E731
    return gt_data, f32(preds), f32(gt_data.targets)
