"""What one bootstrap resample of ``compare`` costs: re-accumulating one pycocotools matching
(``ResampledCocoMap``, what ``compare`` uses) against a full COCO evaluation of the resampled lists.

    python bench/bootstrap_cost.py --images 60 --detections 100 --classes 3 --resamples 20

Synthetic detections (noisy copies of random ground truth plus false positives) stand in for a model's;
results: docs/benchmarks.md, "Bootstrap cost of compare".
"""

import argparse
import time

import numpy as np
import torch

from detectors.bootstrap import resample_indices
from detectors.evaluation import ResampledCocoMap, coco_evaluate


def synthetic(images: int, detections: int, classes: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(images):
        g = int(rng.integers(1, 6))
        xy, wh = rng.uniform(0, 150, (g, 2)), rng.uniform(10, 50, (g, 2))
        boxes = torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
        labels = torch.tensor(rng.integers(1, classes + 1, g))
        targets.append({"boxes": boxes, "labels": labels})
        j = rng.integers(0, g, detections)
        noisy = boxes[j] + torch.tensor(rng.normal(0, 4, (detections, 4)), dtype=torch.float32)
        wrong = torch.tensor(rng.integers(1, classes + 1, detections))
        preds.append({"boxes": noisy, "scores": torch.tensor(rng.random(detections), dtype=torch.float32),
                      "labels": torch.where(torch.tensor(rng.random(detections) < 0.7), labels[j], wrong)})
    return preds, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--detections", type=int, default=100, help="per image")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--resamples", type=int, default=20)
    args = parser.parse_args()
    names = [f"c{k}" for k in range(args.classes)]
    preds, targets = synthetic(args.images, args.detections, args.classes)
    rows = resample_indices(args.images, args.resamples, seed=0)

    start = time.perf_counter()
    resampler = ResampledCocoMap(preds, targets, names)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    fast = [resampler.map(idx) for idx in rows]
    per_fast = (time.perf_counter() - start) / len(rows)

    start = time.perf_counter()
    full = [coco_evaluate([preds[i] for i in idx], [targets[i] for i in idx], names, extended_summary=False,
                          class_metrics=False).metrics["map"] for idx in rows]  # fmt: skip
    per_full = (time.perf_counter() - start) / len(rows)

    print(f"{args.images} images x {args.detections} detections, {args.classes} classes, {len(rows)} resamples, "
          f"{torch.get_num_threads()} threads")
    print(f"  ResampledCocoMap: matching once {setup * 1000:.0f} ms, then {per_fast * 1000:.1f} ms per resample")
    print(f"  full COCO evaluation per resample: {per_full * 1000:.1f} ms ({per_full / per_fast:.1f}x)")
    print(f"  largest |difference| between the two mAPs: {np.max(np.abs(np.subtract(fast, full))):.1e}")


if __name__ == "__main__":
    main()
