"""Detection evaluation: COCO mAP (pycocotools-exact, via faster-coco-eval), Pascal VOC AP, matched IoU.

Inputs everywhere are torchvision-style per-image dicts (one dict per image, same order in both lists):

- prediction: ``boxes`` float[N, 4] XYXY absolute pixels, ``scores`` float[N], ``labels`` int64[N] in 1..K.
- target: ``boxes`` float[G, 4] XYXY, ``labels`` int64[G] in 1..K, optional ``iscrowd`` int[G] (0/1),
  optional ``area`` float[G] (the COCO annotation area; without it the box area is used, as pycocotools
  does for results), optional ``difficult`` bool[G] (VOC; only the VOC metrics read it).

Labels are contiguous, label ``i + 1`` is ``class_names[i]``. COCO category ids and XYWH boxes exist only at
the file boundary: :func:`evaluate` (a COCO results file against a COCO ground-truth file) and its loaders,
which hand the evaluator the file's XYWH boxes through ``box_format="xywh"``.

The modules, one concept each:

- ``inputs``: the per-image dict contract above and its one shared check.
- ``coco``: COCO stats, per-class AP and the precision array [T, R, K, A, M] (:func:`coco_evaluate`,
  :class:`CocoResult`), with what it takes to give pycocotools' numbers exactly.
- ``coco_arrays``: faster-coco-eval fed the per-image dicts as arrays (what :func:`coco_evaluate` runs).
- ``resample``: :class:`ResampledCocoMap`, COCO mAP of many bootstrap resamples from one matching.
- ``voc``: VOC07 11-point and VOC2010+ all-point AP with the devkit's matching (:func:`voc_evaluate`).
- ``metric``: :class:`DetectionEvaluator`, the epoch metric of training (under DDP gathered on the first
  process and computed there once), and
  :func:`evaluate_detections`, every number above in one flat dict.
- ``files``: COCO ground-truth and results files read and validated, metrics written as JSON.
- ``tables``: the metrics as rich tables.
- ``command``: :func:`evaluate` and :func:`evaluate_command` (``python train.py evaluate``).

Resampling (paired bootstrap): every public function takes the per-image lists, so a resample is just
``evaluate_detections([preds[i] for i in idx], [targets[i] for i in idx], class_names)``; a repeated index
counts as a separate image, which is what a bootstrap needs; :class:`ResampledCocoMap` gives the same mAP
for many resamples at a fraction of the cost (one matching, one ``accumulate()`` per resample).
``DetectionEvaluator.images()`` returns the (DDP-gathered) lists it accumulated; :func:`coco_evaluate`
returns the precision array [T, R, K, A, M], PR curves and AP per IoU threshold and class
(:class:`CocoResult`).
"""

from torchvision.ops import box_iou  # the IoU every metric here uses (the README names it)

from .coco import (
    COCO_KEYS,
    IOU_THRESHOLDS,
    MAX_DETECTIONS,
    REC_THRESHOLDS,
    CocoResult,
    coco_evaluate,
    coco_map_metric,
)
from .command import evaluate, evaluate_command
from .files import CocoGroundTruth, load_coco_ground_truth, load_coco_predictions, write_metrics_json
from .inputs import BoxFormat
from .metric import DetectionEvaluator, evaluate_detections
from .resample import ResampledCocoMap
from .tables import format_class_table, format_metrics_table
from .voc import VocResult, voc_ap, voc_evaluate

__all__ = [
    "COCO_KEYS",
    "IOU_THRESHOLDS",
    "MAX_DETECTIONS",
    "REC_THRESHOLDS",
    "BoxFormat",
    "CocoGroundTruth",
    "CocoResult",
    "DetectionEvaluator",
    "ResampledCocoMap",
    "VocResult",
    "box_iou",
    "coco_evaluate",
    "coco_map_metric",
    "evaluate",
    "evaluate_command",
    "evaluate_detections",
    "format_class_table",
    "format_metrics_table",
    "load_coco_ground_truth",
    "load_coco_predictions",
    "voc_ap",
    "voc_evaluate",
    "write_metrics_json",
]
