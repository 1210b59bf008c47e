"""COCO mAP of many image resamples from one pycocotools matching: the paired bootstrap's evaluator.

A resample is a list of image indices with repeats. ``coco_evaluate`` on the resampled lists gives the same
mAP but matches every image again for every resample; :class:`ResampledCocoMap` matches once and only
re-ranks per resample. ``detectors.compare`` uses it for the interval of a mAP difference.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from .coco import IOU_THRESHOLDS, MAX_DETECTIONS, REC_THRESHOLDS, metric_inputs
from .inputs import BoxFormat, check_inputs


class ResampledCocoMap:
    """COCO mAP of image resamples from one matching: the bootstrap's evaluator.

    pycocotools' ``COCOeval.evaluate()`` matches detections to ground truth image by image and class;
    ``accumulate()`` then ranks the matched detections of a set of images and integrates precision. A
    resample (indices with repeats) reuses the per-image matches: resample position j gets image
    ``indices[j]``'s, so a repeated image counts as a separate image, exactly as evaluating the resampled
    lists from scratch (the tests check this against pycocotools on resampled data) but at the cost of one
    ``accumulate()`` per resample. Only what mAP needs is matched: area "all", maxDets 100, the float64
    thresholds of :func:`coco_map_metric`. Boxes go to pycocotools as :func:`coco_evaluate` hands them to
    faster-coco-eval (XYXY converted to XYWH in the tensors' dtype), so the numbers equal its ``map``.

    ``preds``/``targets``: per-image dicts (``evaluation.inputs``), one of each per image; ``box_format`` as
    in :func:`coco_evaluate`.
    """

    def __init__(self, preds: Sequence[dict], targets: Sequence[dict], class_names: Sequence[str],
                 box_format: BoxFormat = "xyxy") -> None:  # fmt: skip
        names = list(class_names)
        check_inputs(preds, targets, len(names))
        p_in, t_in = metric_inputs(preds, targets)
        images = [{"id": i} for i in range(len(targets))]
        categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
        gt_anns, dt_anns = [], []
        for i, t in enumerate(t_in):
            boxes = box_convert(t["boxes"], box_format, "xywh").tolist()
            crowd = t["iscrowd"].tolist() if "iscrowd" in t else [0] * len(boxes)
            area = t["area"].tolist() if "area" in t else [b[2] * b[3] for b in boxes]
            for b, c, z, a in zip(boxes, t["labels"].tolist(), crowd, area, strict=True):
                gt_anns.append({"id": len(gt_anns) + 1, "image_id": i, "category_id": c, "bbox": b, "area": a,
                                "iscrowd": int(z)})  # fmt: skip
        for i, p in enumerate(p_in):  # the fields COCO.loadRes would add to a results file
            boxes = box_convert(p["boxes"], box_format, "xywh").tolist()
            for b, c, s in zip(boxes, p["labels"].tolist(), p["scores"].tolist(), strict=True):
                dt_anns.append({"id": len(dt_anns) + 1, "image_id": i, "category_id": c, "bbox": b, "score": s,
                                "area": b[2] * b[3], "iscrowd": 0})  # fmt: skip
        gt, dt = COCO(), COCO()
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            for coco, anns in ((gt, gt_anns), (dt, dt_anns)):
                coco.dataset = {"images": images, "categories": categories, "annotations": anns}
                coco.createIndex()
            ev = COCOeval(gt, dt, "bbox")
            ev.params.imgIds = list(range(len(targets)))
            ev.params.iouThrs, ev.params.recThrs = np.array(IOU_THRESHOLDS), np.array(REC_THRESHOLDS)
            ev.params.maxDets = MAX_DETECTIONS[-1:]
            ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:1], ev.params.areaRngLbl[:1]
            ev.evaluate()
        self._eval = ev
        self._per_image = ev.evalImgs  # class-major: [k * num_images + image]
        self.num_images, self.num_classes = len(targets), len(names)

    def map(self, indices: Sequence[int] | np.ndarray) -> float:
        """mAP of the images at ``indices`` (repeats allowed), pycocotools' ``stats[0]``: -1 when no class
        has ground truth in the resample."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"image indices must be in [0, {self.num_images}), got {idx.min()}..{idx.max()}")
        ev, n = self._eval, self.num_images
        # accumulate() reads evalImgs[k * len(imgIds) + position]: lay the resample out that way
        ev.evalImgs = [self._per_image[k * n + i] for k in range(self.num_classes) for i in idx.tolist()]
        ev.params.imgIds = ev._paramsEval.imgIds = idx.tolist()
        with contextlib.redirect_stdout(io.StringIO()):
            ev.accumulate()
        precision = ev.eval["precision"]  # [T, R, K, 1, 1]
        valid = precision[precision > -1]
        return float(valid.mean()) if valid.size else -1.0
