"""``python train.py evaluate``: score a COCO results file against a COCO ground-truth file.

:func:`evaluate` reads both files (``evaluation.files``), sorted by image id as pycocotools sorts them, and
scores them with the training metric (``evaluation.metric.DetectionEvaluator``), so a results file written
by any tool gets the numbers a validation epoch logs; :func:`evaluate_command` prints them as tables.
"""

from __future__ import annotations

import os

from .files import load_coco_ground_truth, load_coco_predictions, write_metrics_json
from .metric import DetectionEvaluator, evaluate_detections
from .tables import format_class_table, format_metrics_table


def evaluate(
    gt_json: str | os.PathLike,
    predictions_json: str | os.PathLike,
    out: str | os.PathLike | None = None,
    voc: bool = True,
) -> dict[str, float]:
    """Score a COCO results file against a COCO ground-truth file through :class:`DetectionEvaluator`.

    Returns (and with ``out`` writes atomically as flat JSON) :func:`evaluate_detections`' dict; per-class
    keys use the category names of ``gt_json``; ``voc=False`` leaves out the VOC metrics (and their cost).
    The COCO numbers equal pycocotools ``COCOeval`` on the same files (``evaluation.coco``). Malformed input
    raises ``BadValueError`` (a ``ValueError``) naming the file.

    The evaluator is fed the files' XYWH boxes unchanged (``box_format="xywh"``): a round trip through XYXY
    turns ``w`` into ``(x + w) - x``, which can differ in the last bit and move a detection of area exactly
    32**2 or 96**2 to another size bucket, or an IoU sitting exactly on a threshold across it.
    """
    gt = load_coco_ground_truth(gt_json, box_format="xywh")
    preds = load_coco_predictions(predictions_json, gt)
    evaluator = DetectionEvaluator(gt.class_names, box_format="xywh", voc=voc)
    if gt.image_ids:
        evaluator.update(preds, gt.targets)
        metrics = evaluator.compute()
    else:
        metrics = evaluate_detections([], [], gt.class_names, voc=voc)
    if out is not None:
        write_metrics_json(metrics, out)
    return metrics


def evaluate_command(gt: str, predictions: str, out: str | None = None, voc: bool = True) -> dict:
    """Score a COCO results file against a COCO ground-truth file and print the metrics.

    Args:
        gt: COCO ground-truth annotations (instances_*.json).
        predictions: COCO results file: [{image_id, category_id, bbox [x, y, w, h], score}, ...].
        out: optional path for a flat JSON of the metrics (torchmetrics key names, per-class entries).
        voc: also compute the Pascal VOC AP50 (2007 11-point, 2010+ all-point) and matched-IoU metrics.
    """
    from rich.console import Console

    metrics = evaluate(gt, predictions, out=out, voc=voc)
    console = Console()
    console.print(format_metrics_table(metrics))
    console.print(format_class_table(metrics))
    if out:
        console.print(f"metrics written to {out}")
    return metrics
