"""COCO-scale evaluation speed: litvision's evaluators side by side with faster-coco-eval and pycocotools.

    python bench/eval_speed.py                      # 5,000 images x ~100 detections x 80 categories
    python bench/eval_speed.py --images 500 --rounds 3 --no-pycocotools

The problem is generated (seeded) like COCO val2017: non-contiguous category ids, ~7 objects per image, 2%
crowd regions, annotation areas below the box area (segmentation areas), box sizes spanning small, medium
and large, and ~100 detections per image (jittered copies of the objects, some with the wrong class, plus
background boxes). Ground truth and results are written as JSON to a temporary folder and timed as:

- ``evaluate``: ``detectors.evaluation.evaluate`` (what ``train.py evaluate`` runs), COCO + VOC metrics;
- ``evaluate voc=False``: the same without the VOC metrics;
- ``faster-coco-eval``: faster-coco-eval called directly (COCO load, loadRes, evaluate, accumulate, summarize);
- ``pycocotools``: the same through pycocotools (the reference the numbers are compared to);
- ``DetectionEvaluator.compute``: the epoch metric as training uses it, ``update`` with batches of 8 per-image
  float32 XYXY tensors, then ``compute()`` (the ``update`` calls are timed separately).

Rounds alternate the evaluators; each time is the median over rounds, each ratio is to faster-coco-eval
direct. Results: docs/benchmarks.md, "Evaluation speed".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from detectors.evaluation import COCO_KEYS, DetectionEvaluator, evaluate

IMAGE_SIZE = (640, 480)  # width, height


def coco_category_ids(k: int) -> list[int]:
    """``k`` category ids with gaps like COCO's (1..90 for its 80 classes)."""
    ids, c = [], 0
    while len(ids) < k:
        c += 1
        if c % 9 != 0:  # skip every ninth id
            ids.append(c)
    return ids


def _boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """XYWH boxes inside the image, sizes log-uniform from 4 px to the image: small, medium and large."""
    w_img, h_img = IMAGE_SIZE
    side = np.exp(rng.uniform(np.log(4), np.log(400), n))
    aspect = np.exp(rng.uniform(-0.7, 0.7, n))
    w, h = np.minimum(side * aspect, w_img - 1), np.minimum(side / aspect, h_img - 1)
    x, y = rng.uniform(0, w_img - w), rng.uniform(0, h_img - h)
    return np.round(np.stack([x, y, w, h], 1), 2)


def generate(images: int, classes: int = 80, detections: int = 100, seed: int = 0) -> tuple[dict, list]:
    """(COCO ground-truth dict, COCO results list) of the benchmark problem."""
    rng = np.random.default_rng(seed)
    cats = coco_category_ids(classes)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"class{c}"} for c in cats]}
    results = []
    for i in range(images):
        image_id = 100_000 + 7 * i  # sparse ids, like COCO's
        gt["images"].append({"id": image_id, "width": IMAGE_SIZE[0], "height": IMAGE_SIZE[1]})
        g = int(rng.integers(1, 15))
        boxes, labels = _boxes(rng, g), rng.choice(cats, g)
        crowd = rng.random(g) < 0.02
        area = boxes[:, 2] * boxes[:, 3] * rng.uniform(0.4, 1.0, g)
        for b, c, z, a in zip(boxes.tolist(), labels.tolist(), crowd.tolist(), area.tolist(), strict=True):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": c,
                                      "bbox": b, "area": round(a, 2), "iscrowd": int(z)})  # fmt: skip
        d = int(rng.integers(detections - 20, detections + 21))
        near = rng.random(d) < 0.5
        src = rng.integers(0, g, d)
        jitter = rng.normal(0, 0.1, (d, 4)) * np.repeat(boxes[src][:, 2:], 2, axis=1)
        det = np.where(near[:, None], boxes[src] + jitter, _boxes(rng, d))
        det[:, 2:] = np.maximum(det[:, 2:], 1.0)
        det_labels = np.where(near & (rng.random(d) < 0.8), labels[src], rng.choice(cats, d))
        scores = np.where(near, rng.uniform(0.2, 1.0, d), rng.uniform(0.0, 0.6, d))
        for b, c, s in zip(np.round(det, 2).tolist(), det_labels.tolist(), np.round(scores, 5).tolist(), strict=True):
            results.append({"image_id": image_id, "category_id": c, "bbox": b, "score": s})
    return gt, results


def _direct(coco_class, eval_class, gt_path: Path, dt_path: Path) -> np.ndarray:
    """The 12 stats of a COCO API's own load, loadRes, evaluate, accumulate and summarize on the files."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_class(str(gt_path))
        ev = eval_class(gt, gt.loadRes(str(dt_path)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)[:12]


def faster_coco_eval_direct(gt_path: Path, dt_path: Path) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster

    return _direct(COCO, COCOeval_faster, gt_path, dt_path)


def pycocotools_direct(gt_path: Path, dt_path: Path) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return _direct(COCO, COCOeval, gt_path, dt_path)


def epoch_batches(gt: dict, results: list, batch: int = 8) -> tuple[list[str], list[tuple[list, list]]]:
    """The problem as a validation epoch sees it: class names and batches of per-image dicts (float32 XYXY
    boxes, labels 1..K, image ids, iscrowd and area), images in ascending id like ``evaluate``."""
    cats = sorted(c["id"] for c in gt["categories"])
    label = {c: k + 1 for k, c in enumerate(cats)}
    ids = sorted(img["id"] for img in gt["images"])
    per_gt = {i: [] for i in ids}
    per_dt = {i: [] for i in ids}
    for a in gt["annotations"]:
        per_gt[a["image_id"]].append(a)
    for d in results:
        per_dt[d["image_id"]].append(d)

    def xyxy(rows: list) -> torch.Tensor:
        b = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)
        return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], 1)

    preds, targets = [], []
    for i in ids:
        dts, gts = per_dt[i], per_gt[i]
        preds.append({"boxes": xyxy([d["bbox"] for d in dts]),
                      "scores": torch.tensor([d["score"] for d in dts], dtype=torch.float32),
                      "labels": torch.tensor([label[d["category_id"]] for d in dts])})  # fmt: skip
        targets.append({"boxes": xyxy([a["bbox"] for a in gts]),
                        "labels": torch.tensor([label[a["category_id"]] for a in gts], dtype=torch.int64),
                        "iscrowd": torch.tensor([a["iscrowd"] for a in gts], dtype=torch.int64),
                        "area": torch.tensor([a["area"] for a in gts], dtype=torch.float32),
                        "image_id": i})  # fmt: skip
    names = [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    return names, [(preds[j : j + batch], targets[j : j + batch]) for j in range(0, len(ids), batch)]


def time_rounds(runs: dict, rounds: int) -> tuple[dict[str, list[float]], list[float], dict[str, object]]:
    """Run every evaluator once per round, alternating: (times per evaluator, update times of the epoch metric,
    the last output of each). The epoch metric's runs return (output, its update time), not counted."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    update_times: list[float] = []
    out: dict[str, object] = {}
    for r in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            out[name] = fn()
            elapsed = time.perf_counter() - t0
            if name == "DetectionEvaluator.compute":
                out[name], t_update = out[name]
                update_times.append(t_update)
                elapsed -= t_update
            times[name].append(elapsed)
            print(f"  round {r + 1}: {name} {elapsed:.2f} s", flush=True)
    return times, update_times, out


def report(times: dict[str, list[float]], update_times: list[float], out: dict[str, object], ref_name: str) -> None:
    ref = np.asarray(out[ref_name])
    base = statistics.median(times["faster-coco-eval direct"])
    print(f"\nmedian of {len(update_times)} rounds; stats compared to {ref_name}")
    print(f"{'evaluator':<30} {'time s':>8} {'x fce':>7} {'max |stat diff|':>16}")
    for name, ts in times.items():
        value = out[name]
        stats = np.asarray([value[k] for k in COCO_KEYS]) if isinstance(value, dict) else np.asarray(value)
        t = statistics.median(ts)
        print(f"{name:<30} {t:8.2f} {t / base:7.2f} {np.abs(stats - ref).max():16.1e}")
    print(f"{'(DetectionEvaluator.update)':<30} {statistics.median(update_times):8.2f}")
    print("DetectionEvaluator gets float32 XYXY boxes and areas, as in training: its stats differ from the files'")
    print("by that rounding of its inputs, not by its evaluation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=100, help="per image, on average")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; times are medians")
    parser.add_argument("--no-pycocotools", dest="pycocotools", action="store_false",
                        help="skip pycocotools (the slowest); the stats are then compared to faster-coco-eval")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    gt, results = generate(args.images, args.classes, args.detections, args.seed)
    names, batches = epoch_batches(gt, results)
    print(f"{args.images} images, {len(gt['annotations'])} annotations "
          f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(results)} detections, "
          f"{args.classes} categories")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, dt_path = Path(tmp) / "gt.json", Path(tmp) / "results.json"
        gt_path.write_text(json.dumps(gt))
        dt_path.write_text(json.dumps(results))

        def epoch_metric() -> tuple[dict, float]:
            metric = DetectionEvaluator(names)
            t0 = time.perf_counter()
            for preds, targets in batches:
                metric.update(preds, targets)
            t_update = time.perf_counter() - t0
            return metric.compute(), t_update

        runs = {
            "evaluate (COCO + VOC)": lambda: evaluate(gt_path, dt_path),
            "evaluate voc=False": lambda: evaluate(gt_path, dt_path, voc=False),
            "faster-coco-eval direct": lambda: faster_coco_eval_direct(gt_path, dt_path),
            "DetectionEvaluator.compute": epoch_metric,
        }
        if args.pycocotools:
            runs["pycocotools"] = lambda: pycocotools_direct(gt_path, dt_path)
        timed = time_rounds(runs, args.rounds)
    report(*timed, "pycocotools" if args.pycocotools else "faster-coco-eval direct")


if __name__ == "__main__":
    main()
