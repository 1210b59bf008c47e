"""What resuming pays to look inside a checkpoint before Lightning loads it: ``fit --ckpt_path`` reads the
model's hyperparameters (to rebuild it as saved) and the global step (TensorBoard's purge_step) first.

    python bench/checkpoint_read.py [--repeats 5] [--dir DIR]

Writes a resumable checkpoint of Faster R-CNN ResNet-50-FPN (torchvision's architecture, random weights: no
download) with its AdamW state, then times a whole read against a mapped one (``mmap=True``: tensors read only
when touched), median of the repeats: with the file in the page cache ("warm"), and with its pages dropped
before each read ("cold", ``posix_fadvise(DONTNEED)``: as a first read from disk or a network file system would
be). Results: docs/benchmarks.md, "Reading a checkpoint before resuming".
"""

import argparse
import os
import statistics
import tempfile
import time

import torch

from detectors.module import FasterRCNNModule
from training.checkpoint_io import checkpoint_log_position, load_checkpoint_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    args = parser.parse_args()
    module = FasterRCNNModule(num_classes=91, backbone="resnet50_fpn", trainable_backbone_layers=5)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    for p in params:  # AdamW's two moments per parameter, as in a real last.ckpt
        p.grad = torch.zeros_like(p)
    optimizer.step()
    checkpoint = {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()],
                  "hyper_parameters": dict(module.hparams), "global_step": 1000, "epoch": 3}  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "last.ckpt")
        torch.save(checkpoint, path)
        print(f"checkpoint: {os.path.getsize(path) / 2**20:.0f} MB")
        reads = [("whole read", lambda: load_checkpoint_file(path)["global_step"]),
                 ("mapped read", lambda: load_checkpoint_file(path, mmap=True)["global_step"]),
                 ("checkpoint_log_position", lambda: checkpoint_log_position(path))]  # fmt: skip
        for cache in ("warm", "cold"):
            for label, read in reads:
                times = []
                for _ in range(args.repeats):
                    if cache == "cold":
                        _drop_from_page_cache(path)
                    start = time.perf_counter()
                    read()
                    times.append(time.perf_counter() - start)
                print(f"{cache} {label}: {1000 * statistics.median(times):.1f} ms", flush=True)


def _drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
