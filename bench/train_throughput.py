"""Training throughput of candidate detector configurations (images/s of optimiser steps).

    python bench/train_throughput.py --root data/shapes [NAME ...]

One warm-up step, then the mean over ``--steps`` steps on fixed batches (data loading excluded).
Results: docs/benchmarks.md, "Detector training speed".
"""

import argparse
import time

import torch

from detectors.data.datamodule import DetectionDataModule
from detectors.module import FasterRCNNModule, RetinaNetModule, _loss_targets

FAST_RCNN = dict(rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150, box_batch_size_per_image=32)
CONFIGS = {
    "frcnn_r18_192": (FasterRCNNModule, dict(backbone="resnet18_fpn", min_size=192, max_size=192,
                                             rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
                                             box_batch_size_per_image=128)),
    "frcnn_r18_192_b32": (FasterRCNNModule, dict(backbone="resnet18_fpn", min_size=192, max_size=192, **FAST_RCNN)),
    "frcnn_mnv3_192_b32": (FasterRCNNModule, dict(backbone="mobilenet_v3_large_fpn", min_size=192, max_size=192,
                                                  **FAST_RCNN)),
    "frcnn_mnv3_160_b32": (FasterRCNNModule, dict(backbone="mobilenet_v3_large_fpn", min_size=160, max_size=160,
                                                  **FAST_RCNN)),
    "retina_r18_192": (RetinaNetModule, dict(backbone="resnet18_fpn", min_size=192, max_size=192, group_norm_head=True)),
    "retina_r18_192_nogn": (RetinaNetModule, dict(backbone="resnet18_fpn", min_size=192, max_size=192)),
    "retina_mnv3_192": (RetinaNetModule, dict(backbone="mobilenet_v3_large_fpn", min_size=192, max_size=192,
                                              group_norm_head=True)),
    # The demo architectures as docs/benchmarks.md times them: stride 8/16/32 maps, narrow FPN and box head.
    # configs/ differ: Faster R-CNN samples half these proposals and ROIs, RetinaNet has 1 anchor, no P6/P7.
    "frcnn_mnv3_p3_256": (FasterRCNNModule, dict(backbone="mobilenet_v3_large_fpn", min_size=192, max_size=192,
                                                 returned_layers=[2, 3, 5], anchor_sizes=[[16], [32], [64], [128]],
                                                 rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
                                                 box_batch_size_per_image=64)),
    "frcnn_demo": (FasterRCNNModule, dict(backbone="mobilenet_v3_large_fpn", min_size=192, max_size=192,
                                          returned_layers=[2, 3, 5], anchor_sizes=[[16], [32], [64], [128]],
                                          fpn_channels=64, box_representation_size=256, rpn_pre_nms_top_n_train=600,
                                          rpn_post_nms_top_n_train=300, box_batch_size_per_image=64)),
    "retina_demo": (RetinaNetModule, dict(backbone="mobilenet_v3_large_fpn", min_size=192, max_size=192,
                                          returned_layers=[2, 3, 5], anchor_sizes=[16, 32, 64, 128, 256],
                                          fpn_channels=64, group_norm_head=True)),
}  # fmt: skip
# The demo configs also run in NHWC memory layout (channels_last: true).
CONFIGS.update({f"{name}_nhwc": (cls, {**options, "channels_last": True})
                for name, (cls, options) in list(CONFIGS.items()) if name.endswith("_demo")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=list(CONFIGS), help=f"any of {', '.join(CONFIGS)}")
    parser.add_argument("--root", default="data/shapes")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dm = DetectionDataModule(args.root, batch_size=args.batch_size, num_workers=0, generate=True)
    dm.prepare_data()  # generates the shapes set where root is missing
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(args.steps + 1)]
    for name in args.names:
        cls, options = CONFIGS[name]
        module = cls(class_names=dm.class_names, **options).train()
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        start = None
        for i, (images, targets) in enumerate(batches):
            if i == 1:
                start = time.perf_counter()
            loss = sum(module.model(list(images), _loss_targets(targets)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds = (time.perf_counter() - start) / args.steps
        print(f"{name}: {seconds:.3f} s/step, {args.batch_size / seconds:.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
