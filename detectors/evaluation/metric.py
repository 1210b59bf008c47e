"""The detection metric of a training run: :class:`DetectionEvaluator`, a torchmetrics ``Metric`` that
collects per-image dicts over an epoch (across DDP processes) and scores them with
:func:`evaluate_detections`, every COCO and VOC number in one flat dict of python floats that
``LightningModule.log_dict`` takes as it is.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchvision.ops import box_convert

from training.distributed import computed_once, gather_to_first
from training.errors import BadValueError

from .coco import CocoResult, coco_evaluate
from .inputs import BoxFormat, check_inputs
from .voc import voc_ap_per_class, voc_match


def evaluate_detections(
    preds: Sequence[dict],
    targets: Sequence[dict],
    class_names: Sequence[str],
    box_format: BoxFormat = "xyxy",
    coco: CocoResult | None = None,
    voc: bool = True,
) -> dict[str, float]:
    """Every metric of :class:`DetectionEvaluator` for per-image dicts, as a flat dict of python floats.

    Keys: :data:`COCO_KEYS`, ``ap/<name>``; ``voc07_ap50``, ``voc10_ap50`` and ``voc07_ap50/<name>``,
    ``voc10_ap50/<name>`` (VOC AP at IoU 0.5, 11-point / all-point); ``iou/<name>`` and ``mean_iou``: mean
    IoU of the detections matched at IoU 0.5 by the VOC rule, per class and over all matched detections
    (-1 where nothing matched). -1 marks an undefined value (no ground truth), as in pycocotools.
    ``coco``: the :func:`coco_evaluate` result of these same inputs when the caller already has it (the
    COCO evaluation is the expensive part), else it is computed here. ``voc=False``: the COCO keys alone
    (no ``voc*`` and ``iou`` keys), without the cost of the VOC matching.
    """
    names = list(class_names)
    if coco is None:
        coco = coco_evaluate(preds, targets, names, box_format)
    out = dict(coco.metrics)
    if not voc:
        return out
    m = voc_match(preds, targets, len(names), 0.5, plus_one=False, box_format=box_format)
    for year, use_07 in (("07", True), ("10", False)):
        ap, mean = voc_ap_per_class(m, use_07)
        out[f"voc{year}_ap50"] = mean
        out.update({f"voc{year}_ap50/{n}": float(v) for n, v in zip(names, ap, strict=True)})
    for n, ious in zip(names, m.tp_iou, strict=True):
        out[f"iou/{n}"] = float(ious.mean()) if ious.size else -1.0
    all_ious = np.concatenate(m.tp_iou) if m.tp_iou else np.zeros(0)
    out["mean_iou"] = float(all_ious.mean()) if all_ious.size else -1.0
    return out


def _image_id(target: dict) -> int:
    """The target's ``image_id`` if it is a non-negative integer (python, numpy or one-element tensor),
    else -1: an image that is never merged with another."""
    value = target.get("image_id")
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
    return int(value) if ok else -1


class DetectionEvaluator(Metric):
    """Epoch-level detection metrics for a LightningModule: ``update(preds, targets)`` per batch with
    per-image dicts (``evaluation.inputs``), ``compute()`` once per epoch -> :func:`evaluate_detections`' flat
    dict of python floats, ``reset()`` between epochs. ``voc=False`` leaves the VOC metrics out of it.

    Inputs are stored unmodified (concatenated per field, with per-image counts), so the states are plain
    tensors that move with ``.to(device)`` and are gathered across DDP processes (``dist_reduce_fx="cat"``,
    which also tolerates processes that saw different numbers of images). Under DDP every process must have
    called ``update`` at least once: ``update([], [])`` adds no image but typed empty states, which is what a
    process whose batches were all unreadable does (torchmetrics' own stand-in for an empty list state has
    the wrong shape and dtype). After a sync the images are ordered by rank.

    An ``image_id`` (target key, a non-negative integer) seen again is scored once, at its first occurrence:
    the litvision DataModules split evaluation data without repeats
    (``training.distributed.evaluation_sampler``), but under DDP a loader of other origin gets Lightning's
    ``DistributedSampler``, which pads the last processes' shares with repeats of the first images so that
    every process gets as many batches.
    Targets without such an ``image_id`` are never merged.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, class_names: list[str], box_format: BoxFormat = "xyxy", voc: bool = True,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.voc = voc
        self._gather_everywhere = False  # images(): torchmetrics' all-gather instead of gather_to_first
        if box_format not in ("xyxy", "xywh"):
            raise BadValueError(f"box_format must be 'xyxy' or 'xywh', got {box_format!r}")
        self.box_format = box_format
        if not class_names or len(set(class_names)) != len(class_names):
            raise BadValueError(f"class_names must be non-empty and unique, got {class_names!r}")
        self.class_names = list(class_names)
        for name in ("det_boxes", "det_scores", "det_labels", "det_counts", "gt_boxes", "gt_labels",
                     "gt_iscrowd", "gt_area", "gt_difficult", "gt_counts", "image_ids"):  # fmt: skip
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[dict], targets: Sequence[dict]) -> None:
        """Add a batch: ``preds[i]`` and ``targets[i]`` describe the same image."""
        check_inputs(preds, targets, len(self.class_names))
        dev = self.device

        def cat(dicts: Sequence[dict], key: str, default=None, dtype: torch.dtype | None = None) -> Tensor:
            parts = [d[key].detach().reshape(-1) if key in d else default(d) for d in dicts]
            if not parts:  # no images: typed empties, which DDP gathers like any other process' share
                return torch.zeros(0, device=dev, dtype=dtype or torch.get_default_dtype())
            return torch.cat(parts).to(dev, dtype)

        def box_area(t: dict) -> Tensor:  # pycocotools' w * h when no annotation area is given
            b = box_convert(t["boxes"].detach().reshape(-1, 4), self.box_format, "xywh")
            return b[:, 2] * b[:, 3]

        def zeros(t: dict) -> Tensor:
            return torch.zeros(len(t["labels"]), dtype=torch.int64, device=t["labels"].device)

        self.det_boxes.append(cat(preds, "boxes").reshape(-1, 4))
        self.det_scores.append(cat(preds, "scores"))
        self.det_labels.append(cat(preds, "labels", dtype=torch.int64))
        self.det_counts.append(torch.tensor([len(p["labels"]) for p in preds], dtype=torch.int64, device=dev))
        self.gt_boxes.append(cat(targets, "boxes").reshape(-1, 4))
        self.gt_labels.append(cat(targets, "labels", dtype=torch.int64))
        self.gt_iscrowd.append(cat(targets, "iscrowd", zeros, torch.int64))
        self.gt_difficult.append(cat(targets, "difficult", zeros, torch.int64))  # int: gloo gathers no bool
        self.gt_area.append(cat(targets, "area", box_area, self.gt_boxes[-1].dtype))
        self.gt_counts.append(
            torch.tensor([len(t["labels"]) for t in targets], dtype=torch.int64, device=dev)
        )
        self.image_ids.append(torch.tensor([_image_id(t) for t in targets], dtype=torch.int64, device=dev))

    @property
    def local_images(self) -> int:
        """Images this process added since the last reset (before any DDP gather)."""
        counts = self.det_counts
        return sum(len(c) for c in counts) if isinstance(counts, list) else len(counts)

    def _images(self) -> tuple[list[dict], list[dict]]:
        counts = self.det_counts  # a list of per-batch tensors, or one tensor after a DDP sync
        if (isinstance(counts, list) and not counts) or (isinstance(counts, Tensor) and counts.numel() == 0):
            return [], []
        s = {k: dim_zero_cat(getattr(self, k)).cpu() for k in self._defaults}
        d_counts, g_counts = s["det_counts"].tolist(), s["gt_counts"].tolist()
        preds = [
            {"boxes": b.reshape(-1, 4), "scores": sc, "labels": lb}
            for b, sc, lb in zip(
                s["det_boxes"].reshape(-1, 4).split(d_counts), s["det_scores"].split(d_counts),
                s["det_labels"].split(d_counts), strict=True,
            )
        ]  # fmt: skip
        targets = [
            {"boxes": b.reshape(-1, 4), "labels": lb, "iscrowd": c, "area": a, "difficult": df.bool()}
            for b, lb, c, a, df in zip(
                s["gt_boxes"].reshape(-1, 4).split(g_counts), s["gt_labels"].split(g_counts),
                s["gt_iscrowd"].split(g_counts), s["gt_area"].split(g_counts), s["gt_difficult"].split(g_counts),
                strict=True,
            )
        ]  # fmt: skip
        seen: set[int] = set()
        keep = []
        for i in s["image_ids"].tolist():
            keep.append(i < 0 or i not in seen)
            seen.add(i)
        if all(keep):
            return preds, targets
        return ([p for p, k in zip(preds, keep, strict=True) if k],
                [t for t, k in zip(targets, keep, strict=True) if k])  # fmt: skip

    def images(self) -> tuple[list[dict], list[dict]]:
        """The accumulated (DDP-gathered) per-image predictions and targets, on CPU, in update order; under
        DDP on every process (torchmetrics' all-gather)."""
        self._gather_everywhere = True
        try:
            with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
                return self._images()
        finally:
            self._gather_everywhere = False

    def _sync_dist(self, dist_sync_fn=None, process_group=None) -> None:  # noqa: ANN001 (torchmetrics' hook)
        """torchmetrics' sync before ``compute()``: the states of every process are gathered on the first
        process only (:func:`training.distributed.gather_to_first`, in rank order); the others keep none.
        ``compute()`` then scores them there once and sends the result to all (``images()`` all-gathers)."""
        if self._gather_everywhere:
            return super()._sync_dist(dist_sync_fn, process_group)
        local = {}
        for name in self._defaults:
            value = getattr(self, name)
            local[name] = dim_zero_cat(value).cpu() if isinstance(value, Tensor) or value else None
        gathered = gather_to_first(local, process_group or self.process_group)
        for name in self._defaults:
            setattr(self, name, [g[name] for g in gathered if g[name] is not None] if gathered else [])
        return None

    def coco_result(self, **overrides) -> CocoResult:
        """:func:`coco_evaluate` on the accumulated images: precision array, PR curves, AP per IoU."""
        return coco_evaluate(*self.images(), self.class_names, self.box_format, **overrides)

    def compute(self) -> dict[str, float]:
        """:func:`evaluate_detections` on the (DDP-gathered) images: a flat dict of python floats. Under DDP
        it is computed once, on the first process, and every process returns that same dict
        (:func:`training.distributed.computed_once`)."""

        def score() -> dict[str, float]:
            return evaluate_detections(*self._images(), self.class_names, self.box_format, voc=self.voc)

        if self._is_synced and not self._gather_everywhere:  # states gathered on the first process
            return computed_once(score, self.process_group)
        return score()
