"""Latency of the demo detectors at batch 1 on the CPU: eager PyTorch, the ONNX file in onnxruntime, and the
torch.export ExportedProgram (or, where torch.export cannot export the model, the TorchScript file), side by side.

    python bench/export_latency.py --threads 1 2 --rounds 30
    python bench/export_latency.py --checkpoints demo/runs/faster_rcnn/checkpoints/best.ckpt \\
        demo/runs/retinanet/checkpoints/best.ckpt

Every file is written by ``train.py export`` (checked against the eager model first). Without checkpoints, each
of configs/faster_rcnn.yaml and configs/retinanet.yaml is built with random weights and ``score_thresh`` 0, so
that every image returns ``detections_per_img`` (100) detections, as a trained model's low-score detections do,
and post-processing costs what it costs in use. Images: shapes scenes at the configs' 192 px. Each round runs
every runtime once on the same image, in turn; the table gives medians and the ratio to eager. Results:
docs/benchmarks.md, "Export latency".
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.errors import UsageError  # noqa: E402
from training.export import batches, export_command, load_runner, median_latency_ms  # noqa: E402
from training.saving import load_model  # noqa: E402

CLASSES = ["rectangle", "ellipse", "triangle"]


def demo_checkpoint(config: str, folder: str) -> str:
    """configs/CONFIG.yaml's detector, random weights, score_thresh 0, saved as a checkpoint."""
    from detectors.module import FasterRCNNModule, RetinaNetModule

    args = yaml.safe_load((REPO / "configs" / f"{config}.yaml").read_text())["model"]["init_args"]
    args = {k: v for k, v in args.items() if k not in ("backbone_checkpoint", "if_checkpoint_missing")}
    cls = FasterRCNNModule if config == "faster_rcnn" else RetinaNetModule
    torch.manual_seed(0)
    path = os.path.join(folder, f"{config}.ckpt")
    cls(class_names=CLASSES, **{**args, "score_thresh": 0.0}).save(path)
    return path


def exported(ckpt: str, folder: str) -> dict[str, str]:
    """The ONNX file and the ExportedProgram, or the TorchScript file where torch.export fails; runtime name ->
    path."""
    stem = Path(ckpt).stem
    files = {"onnxruntime": ("onnx", os.path.join(folder, f"{stem}.onnx"))}
    try:
        export_command(ckpt, os.path.join(folder, f"{stem}.pt2"), format="exported_program")
        files["ExportedProgram"] = ("exported_program", os.path.join(folder, f"{stem}.pt2"))
    except UsageError as e:
        print(f"{stem}: {e}")
        files["TorchScript"] = ("torchscript", os.path.join(folder, f"{stem}.pt"))
    for format, path in files.values():
        if not os.path.isfile(path):
            export_command(ckpt, path, format=format)
    return {name: path for name, (_, path) in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", nargs="*", help="detector checkpoints (default: the demo configs' detectors)")
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="CPU threads of every runtime; several "
                        "values: one table row each")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoints = args.checkpoints or [demo_checkpoint(c, folder) for c in ("faster_rcnn", "retinanet")]
        files = {ckpt: exported(ckpt, folder) for ckpt in checkpoints}
        rows = []
        for threads in args.threads:
            torch.set_num_threads(threads)  # onnxruntime gets the same count (training.export.load_runner)
            for ckpt in checkpoints:
                adapter = load_model(ckpt).eval().export_adapter()
                runs = {"eager": adapter.eager}
                for name, path in files[ckpt].items():
                    format = {".onnx": "onnx", ".pt2": "exported_program"}.get(Path(path).suffix, "torchscript")
                    runs[name] = load_runner(format, path)
                images = batches(adapter.generated_images(4), 1)
                detections = int(adapter.eager(images[0])[3].sum())
                ms = median_latency_ms(runs, images, rounds=args.rounds, warmup=3)
                rows.append((type(adapter.module).__name__, threads, detections, ms))
    print(f"\n| model | threads | detections/image | {' | '.join(f'{k} ms' for k in rows[0][3])} |")
    for name, threads, detections, ms in rows:
        cells = [f"{v:.1f}" + ("" if k == "eager" else f" ({ms['eager'] / v:.2f}x)") for k, v in ms.items()]
        print(f"| {name} | {threads} | {detections} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
