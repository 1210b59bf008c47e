"""Validation of both module families on their DataModules, 2 processes, Lightning's default
use_distributed_sampler=True. Each process writes OUT/<family>-<rank>.json (what it scored) and
OUT/rank<rank>.pt (each family's logged metrics as that process holds them, and how many times it ran the
COCO+VOC scoring); rank 0 also writes OUT/metrics.pt (each family's logged metrics).

    python -m tests.training.ddp_scripts.each_image_once OUT SHAPES_ROOT
"""

import sys
from pathlib import Path

import torch

from detectors.evaluation import metric as evaluation_metric
from tests.training.ddp_scripts.common import validate_on_datamodules


def count_scorings() -> list[int]:
    """Count this process' calls of the COCO+VOC scoring behind ``DetectionEvaluator.compute()``."""
    calls = [0]
    original = evaluation_metric.evaluate_detections

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    evaluation_metric.evaluate_detections = counted
    return calls


if __name__ == "__main__":
    out, root = Path(sys.argv[1]), Path(sys.argv[2])
    scorings = count_scorings()
    metrics = validate_on_datamodules(root, out, devices=2)
    rank = torch.distributed.get_rank()
    torch.save({"metrics": metrics, "scorings": scorings[0]}, out / f"rank{rank}.pt")
    if rank == 0:
        torch.save(metrics, out / "metrics.pt")
