"""Optimiser step time of the demo models: PyTorch's per-parameter loop, foreach, and fused kernels.

    OMP_NUM_THREADS=1 python bench/optimizer_step.py [--steps 30]

Gradients are random (the step's cost does not depend on them). Results: docs/benchmarks.md,
"Detector training speed".
"""

import argparse
import time

import torch

from classifiers.module import FrozenBackboneClassifier
from detectors.module import FasterRCNNModule

MODELS = {
    "faster_rcnn demo": lambda: FasterRCNNModule(
        backbone="mobilenet_v3_large_fpn", class_names=["a", "b", "c"], returned_layers=[2, 3, 5],
        anchor_sizes=[[16], [32], [64], [128]], fpn_channels=64, box_representation_size=256),
    "pretrain classifier": lambda: FrozenBackboneClassifier(
        backbone="mobilenet_v3_large", weights=None, freeze="none", class_names=["a", "b", "c"]),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} thread(s)")
    for name, build in MODELS.items():
        params = [p for p in build().parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        for cls in (torch.optim.SGD, torch.optim.AdamW):
            for kind in ("foreach=False", "foreach=True", "fused=True"):
                key, value = kind.split("=")
                momentum = {"momentum": 0.9} if cls is torch.optim.SGD else {}
                opt = cls(params, lr=1e-3, weight_decay=1e-4, **momentum, **{key: value == "True"})
                for _ in range(3):
                    opt.step()
                start = time.perf_counter()
                for _ in range(args.steps):
                    opt.step()
                ms = (time.perf_counter() - start) / args.steps * 1000
                print(f"{name} ({len(params)} tensors): {cls.__name__} {kind}: {ms:.1f} ms/step")


if __name__ == "__main__":
    main()
