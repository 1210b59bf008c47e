"""faster-coco-eval fed directly: per-image dicts -> flat arrays -> its ``COCO`` objects -> ``COCOeval_faster``.

torchmetrics' ``MeanAveragePrecision`` reaches the same evaluator through a per-box conversion (one
``.tolist()`` per number, one tensor per IoU matrix in its extended summary) that costs several times the
evaluation itself at COCO scale. Here each field of every image is concatenated once, and the annotation
dicts the evaluator reads are built in one list comprehension per file, with exactly the values torchmetrics
would hand over (``detectors.evaluation.coco``'s docstring lists what pycocotools-exactness takes).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from itertools import count

import numpy as np
import torch
from torchvision.ops import box_convert

from .inputs import BoxFormat, as_cpu, concat_field


def _boxes_xywh(dicts: Sequence[dict], box_format: BoxFormat) -> np.ndarray:
    """Every dict's ``boxes`` concatenated as XYWH float64 [N, 4]. XYXY is converted in the tensors' own dtype
    before widening to float64 (``w = x2 - x1`` rounded as torchmetrics rounds it); mixed dtypes are
    converted image by image for the same reason."""
    parts = [as_cpu(d["boxes"]).reshape(-1, 4) for d in dicts]
    if not parts:
        return np.zeros((0, 4))
    if len({p.dtype for p in parts}) > 1:
        parts = [box_convert(p, box_format, "xywh").double() for p in parts]
        return torch.cat(parts).numpy()
    boxes = torch.cat(parts)
    if box_format != "xywh":
        boxes = box_convert(boxes, box_format, "xywh")
    return boxes.double().numpy()


def _quiet(*args, **kwargs) -> None:
    """faster-coco-eval's progress messages go nowhere."""


def faster_coco_eval(
    preds: Sequence[dict],
    targets: Sequence[dict],
    num_classes: int,
    box_format: BoxFormat,
    iou_thresholds: Sequence[float],
    rec_thresholds: Sequence[float],
    max_detections: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``COCOeval_faster(gt, dt, "bbox")`` on per-image dicts (checked by the caller, at least one image):
    (stats float64 [12], precision float64 [T, R, K, 4, M], recall float64 [T, K, 4, M]); class index ``k``
    is label ``k + 1``, -1 where a class has no ground truth.

    The annotations hold what a ground-truth file and ``COCO.loadRes`` would give the evaluator: image ids
    are list positions (so images are ranked in list order on equal scores), category ids the labels 1..K,
    annotation ids count from 1 (0 means "unmatched" to the evaluator); a detection's area is ``w * h`` of its
    XYWH box, a ground truth's is its ``area`` (``w * h`` without one: pycocotools' rule for results; an
    ``area`` of 0 stays 0) and its ``iscrowd`` 0 without one.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    images = [{"id": i} for i in range(len(targets))]
    categories = [{"id": k, "name": str(k)} for k in range(1, num_classes + 1)]
    g_image = np.repeat(np.arange(len(targets)), [len(t["labels"]) for t in targets]).tolist()
    g_boxes = _boxes_xywh(targets, box_format)
    g_area = concat_field(targets, "area", torch.float64, np.nan)
    g_area = np.where(np.isnan(g_area), g_boxes[:, 2] * g_boxes[:, 3], g_area)
    gt_anns = [
        {"id": i, "image_id": im, "category_id": c, "bbox": b, "area": a, "iscrowd": z}
        for i, im, c, b, a, z in zip(
            count(1), g_image, concat_field(targets, "labels", torch.int64).tolist(), g_boxes.tolist(),
            g_area.tolist(), concat_field(targets, "iscrowd", torch.int64).tolist(),
        )
    ]  # fmt: skip
    d_image = np.repeat(np.arange(len(preds)), [len(p["labels"]) for p in preds]).tolist()
    d_boxes = _boxes_xywh(preds, box_format)
    dt_anns = [
        {"id": i, "image_id": im, "category_id": c, "bbox": b, "score": s, "area": a, "iscrowd": 0}
        for i, im, c, b, s, a in zip(
            count(1), d_image, concat_field(preds, "labels", torch.int64).tolist(), d_boxes.tolist(),
            concat_field(preds, "scores", torch.float64).tolist(), (d_boxes[:, 2] * d_boxes[:, 3]).tolist(),
        )
    ]  # fmt: skip
    gt, dt = COCO(print_function=_quiet), COCO(print_function=_quiet)
    with contextlib.redirect_stdout(io.StringIO()):
        for coco, anns in ((gt, gt_anns), (dt, dt_anns)):
            coco.dataset = {"images": images, "categories": categories, "annotations": anns}
            coco.createIndex()
        ev = COCOeval_faster(gt, dt, "bbox", print_function=_quiet)
        ev.params.iouThrs = np.array(iou_thresholds, dtype=np.float64)
        ev.params.recThrs = np.array(rec_thresholds, dtype=np.float64)
        ev.params.maxDets = list(max_detections)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:12], dtype=np.float64), ev.eval["precision"], ev.eval["recall"]
