"""The epoch metric's compute() under DDP: 2 gloo processes against one process, on the COCO-scale problem
of bench/eval_speed.py.

    python bench/eval_ddp.py                 # 5,000 images x ~100 detections x 80 categories
    python bench/eval_ddp.py --images 500

One process updates a ``DetectionEvaluator`` with every image and computes; then 2 processes
(``torch.distributed`` over gloo) each update theirs with one half of the images (first half on rank 0) and
compute, as a validation epoch's end does. Reported per process: CPU time of ``compute()`` (process CPU time,
not wall), how many COCO+VOC evaluations it ran, the metric state's size, and how much the process' peak
RSS grew during the gather (``sync()``, timed apart) and during ``compute()``; then the summed CPU time of
both processes against the one process' and whether every value equals the one-process run's.
Results: docs/benchmarks.md, "Evaluation speed".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for bench.eval_speed

from bench.eval_speed import epoch_batches, generate  # noqa: E402
from detectors.evaluation import DetectionEvaluator  # noqa: E402
from detectors.evaluation import metric as metric_module  # noqa: E402


def _rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last :func:`_reset_peak`) of this process, MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> float:
    """Restart the peak RSS from the current RSS (Linux >= 4.0); returns the current RSS, MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_mb("VmRSS")


def _count_evaluations() -> list[int]:
    """Count the calls of the COCO+VOC scoring (``evaluate_detections``) in this process."""
    calls = [0]
    original = metric_module.evaluate_detections

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    metric_module.evaluate_detections = counted
    return calls


def _state_mb(metric: DetectionEvaluator) -> float:
    states = [getattr(metric, name) for name in metric._defaults]
    return sum(t.nbytes for s in states for t in (s if isinstance(s, list) else [s])) / 2**20


def measure(names: list[str], batches: list) -> dict:
    """Update a metric with ``batches``, gather (sync/unsync), then compute(): what this process spent."""
    metric = DetectionEvaluator(names)
    for preds, targets in batches:
        metric.update(preds, targets)
    state_mb = gathered_mb = _state_mb(metric)
    rss = _reset_peak()
    if torch.distributed.is_initialized():
        metric.sync()  # the gather compute() starts with, measured apart
        gathered_mb = _state_mb(metric)
        metric.unsync()
    gather_peak = _rss_mb("VmHWM") - rss
    calls = _count_evaluations()
    rss = _reset_peak()
    cpu, wall = time.process_time(), time.perf_counter()
    values = metric.compute()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_s": cpu, "wall_s": wall, "evaluations": calls[0], "state_mb": state_mb,
            "gathered_mb": gathered_mb, "gather_peak_mb": gather_peak, "compute_peak_mb": _rss_mb("VmHWM") - rss,
            "values": values}  # fmt: skip


def warm_up(names: list[str], batches: list) -> None:
    """One small compute() first, so that no process' timing includes first-call imports."""
    measure(names, batches[:2])


def problem(images: int, seed: int) -> tuple[list[str], list, list]:
    """(class names, the epoch's batches, its two halves: first half on rank 0)."""
    names, batches = epoch_batches(*generate(images, seed=seed))
    half = (len(batches) + 1) // 2
    return names, batches, [batches[:half], batches[half:]]


def _worker(rank: int, port: int, images: int, seed: int, out: str) -> None:
    torch.set_num_threads(1)
    names, _, halves = problem(images, seed)  # generated again here: sending 25k tensors costs 25k files
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        warm_up(names, halves[rank])
        result = measure(names, halves[rank])
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names, batches, _ = problem(args.images, args.seed)
    warm_up(names, batches)
    one = measure(names, batches)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(_free_port(), args.images, args.seed, tmp), nprocs=2)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1)]
    detections = sum(len(p["labels"]) for preds, _ in batches for p in preds)
    print(f"{args.images} images, {detections} detections; DetectionEvaluator.compute() (process CPU time, wall)")
    print("state: this process' metric state; gathered: its state after the gather; +peak: how far its RSS")
    print("rose above the RSS before the gather / before compute() (MB)")
    print(f"{'run':<14} {'CPU s':>6} {'wall s':>6} {'evals':>5} {'state':>6} {'gathered':>8} "
          f"{'gather +peak':>12} {'compute +peak':>13}")  # fmt: skip
    for label, r in (("1 process", one), ("2 proc, rank 0", ranks[0]), ("2 proc, rank 1", ranks[1])):
        print(f"{label:<14} {r['cpu_s']:6.2f} {r['wall_s']:6.2f} {r['evaluations']:5d} {r['state_mb']:6.1f} "
              f"{r['gathered_mb']:8.1f} {r['gather_peak_mb']:12.1f} {r['compute_peak_mb']:13.1f}")  # fmt: skip
    summed = ranks[0]["cpu_s"] + ranks[1]["cpu_s"]
    equal = all(r["values"] == one["values"] for r in ranks)
    print(f"summed CPU of 2 processes / 1 process: {summed / one['cpu_s']:.2f}; every value equal to the "
          f"1-process run on both ranks: {equal}")  # fmt: skip


if __name__ == "__main__":
    main()
