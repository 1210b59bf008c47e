"""Validation of both module families on their DataModules, 2 processes, Lightning's default
use_distributed_sampler=True. Each process writes OUT/<family>-<rank>.json (what it scored); rank 0 writes
OUT/metrics.pt (each family's logged metrics).

    python -m tests.training.ddp_scripts.each_image_once OUT SHAPES_ROOT
"""

import sys
from pathlib import Path

import torch

from tests.training.ddp_scripts.common import validate_on_datamodules

if __name__ == "__main__":
    out, root = Path(sys.argv[1]), Path(sys.argv[2])
    metrics = validate_on_datamodules(root, out, devices=2)
    if torch.distributed.get_rank() == 0:
        torch.save(metrics, out / "metrics.pt")
