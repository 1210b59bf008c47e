"""What the state-free validation loss costs: validation time with and without ``compute_val_loss``,
and against the naive alternative of a second full forward pass in train mode.

    python bench/val_loss_cost.py --root data/shapes --images 32

Writes one line per detector type; results: docs/benchmarks.md,
"Validation loss cost".
"""

import argparse
import time

import torch

from detectors.data.datamodule import DetectionDataModule
from detectors.module import FasterRCNNModule, RetinaNetModule, _loss_targets
from detectors.val_loss import loss_mode, losses_and_detections


def _time(fn, batches) -> float:
    fn(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data/shapes")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--size", type=int, default=192)
    args = parser.parse_args()
    dm = DetectionDataModule(args.root, batch_size=args.batch_size, num_workers=0, generate=True)
    dm.prepare_data()  # generates the shapes set where root is missing
    dm.setup("validate")
    batches = []
    for images, targets in dm.val_dataloader():
        batches.append((list(images), _loss_targets(targets)))
        if len(batches) * args.batch_size >= args.images:
            break
    common = dict(class_names=dm.class_names, backbone="resnet18_fpn", min_size=args.size, max_size=args.size)
    for cls, extra in ((FasterRCNNModule, {}), (RetinaNetModule, {"group_norm_head": True})):
        model = cls(**common, **extra).model.eval()
        with torch.no_grad():
            detections_only = _time(lambda b, m=model: m(b[0]), batches)
            ours = _time(lambda b, m=model: losses_and_detections(m, b[0], b[1]), batches)

            def naive(b, m=model):
                with loss_mode(m):
                    m(b[0], b[1])
                m(b[0])

            two_passes = _time(naive, batches)
        n = len(batches) * args.batch_size
        print(f"{cls.__name__}: detections only {1000 * detections_only / n:.1f} ms/img, "
              f"+ val loss (one backbone pass) {1000 * ours / n:.1f} ms/img "
              f"(+{100 * (ours / detections_only - 1):.0f}%), "
              f"naive second pass {1000 * two_passes / n:.1f} ms/img (+{100 * (two_passes / detections_only - 1):.0f}%)")


if __name__ == "__main__":
    main()
