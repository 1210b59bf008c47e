"""``train.py demo``: the main job on the embedded shapes data, run through train.py's own commands over the
shipped configs (configs/pretrain.yaml, faster_rcnn.yaml, retinanet.yaml, classifier.yaml, data/shapes.yaml),
ending with both detectors exported to ONNX (``OUT/export/*.onnx``) and their onnxruntime latency.

Each step is marked finished in its run folder (``OUT/runs/NAME/demo-finished``), so a re-run reuses what is
done and continues an interrupted step from its last.ckpt. The two detectors can train side by side, each in
a ``python train.py fit`` child process with its progress bar in ``OUT/runs/NAME/demo.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from training.cli import LAST, LR_MONITOR, PROG, TQDM_PROGRESS_BAR
from training.errors import FileTakenError

REPO = Path(__file__).resolve().parents[1]  # train.py and configs/ sit next to the training package
TRAIN_PY = REPO / "train.py"
CONFIGS = REPO / "configs"


def run_demo(
    out: str = "demo",
    pretrain_minutes: float = 7.5,
    detector_minutes: float = 7.0,
    classifier_minutes: float = 1.5,
    seed: int = 0,
    detectors_together: bool | None = None,
) -> None:
    """The main job on the embedded data: shapes -> a MobileNetV3 pretrained on the shapes crops -> Faster R-CNN
    and RetinaNet from that backbone on the same schedule -> their comparison -> both as ONNX files, with their
    onnxruntime latency -> a frozen-backbone classifier transferred from the Faster R-CNN backbone.

    Args:
        out: directory for the dataset, runs and report. Re-running reuses finished steps and resumes an
            interrupted one from its last.ckpt.
        pretrain_minutes, detector_minutes, classifier_minutes: time caps of the pretraining, of each
            detector and of the classifier (the configs' max_epochs normally end first).
        seed: seed of the dataset and of training.
        detectors_together: train the two detectors at the same time, each in its own process on half the
            CPU threads, or on a GPU of its own (their logs go to OUT/runs/NAME/demo.log); false trains one
            after the other. None (default): together on a CPU with 2 or more threads, or with a GPU per
            detector; with one GPU, one after the other.
    """
    data_root = os.path.join(out, "shapes")
    runs_dir = os.path.join(out, "runs")
    try:
        _train(["shapes", "--out", data_root, "--seed", str(seed)])
    except SystemExit as e:  # e.g. a demo directory from a version with another default dataset
        if e.code and _raised_while(e, FileTakenError):  # the usage error was printed above
            raise SystemExit(f"{PROG} demo: the dataset step stopped (error above). If {data_root} holds a dataset of "
                             f"other parameters, delete {out} (its runs belong to it) or choose another --out") from e
        raise
    crops = os.path.join(data_root, "classification")
    crop_data = ["--data.init_args.root", os.path.join(crops, "train"),
                 "--data.init_args.val_root", os.path.join(crops, "val")]  # fmt: skip
    pretrained = fit("pretrain", runs_dir, pretrain_minutes, seed, crop_data)
    data = ["--data.init_args.root", data_root, "--data.init_args.generate", "false"]
    detectors = {name: [*data, "--model.init_args.backbone_checkpoint", pretrained]
                 for name in ("faster_rcnn", "retinanet")}  # fmt: skip
    if detectors_together is None:
        detectors_together = side_by_side_helps(len(detectors))
    if detectors_together:
        ckpt = fit_together(detectors, runs_dir, detector_minutes, seed)
    else:
        ckpt = {name: fit(name, runs_dir, detector_minutes, seed, args) for name, args in detectors.items()}
    report = os.path.join(out, "comparison")
    done = os.path.join(report, "comparison.json")
    if not os.path.isfile(done) or os.path.getmtime(done) < max(map(os.path.getmtime, ckpt.values())):
        _train(["compare", "--checkpoints", ckpt["faster_rcnn"], ckpt["retinanet"],
                "--data", str(CONFIGS / "data" / "shapes.yaml"), *data, "--out", report])  # fmt: skip
    exported = export_detectors(ckpt, os.path.join(out, "export"), data)
    classifier = fit("classifier", runs_dir, classifier_minutes, seed,
                     [*crop_data, "--model.init_args.backbone_checkpoint", ckpt["faster_rcnn"]])
    print("\nlitvision demo outputs")
    for what, where in [("dataset (COCO, VOC, crops)", data_root), ("pretrained backbone", pretrained),
                        ("Faster R-CNN", ckpt["faster_rcnn"]), ("RetinaNet", ckpt["retinanet"]),
                        ("comparison report", os.path.join(report, "comparison.md")),
                        *[(f"{NAMES[name]} ONNX", where) for name, where in exported.items()],
                        ("classifier", classifier), ("logs (tensorboard --logdir)", runs_dir)]:  # fmt: skip
        print(f"  {what:30s} {where}")


NAMES = {"faster_rcnn": "Faster R-CNN", "retinanet": "RetinaNet"}


def export_detectors(ckpt: dict[str, str], folder: str, data: list[str]) -> dict[str, str]:
    """Each detector as an ONNX file (``train.py export``, checked on the validation images), exported again
    only when its checkpoint is newer; returns name -> "FILE (latency at batch 1: eager and onnxruntime)"."""
    os.makedirs(folder, exist_ok=True)
    described = {}
    for name, path in ckpt.items():
        onnx_file = os.path.join(folder, f"{name}.onnx")
        if not os.path.isfile(onnx_file) or os.path.getmtime(onnx_file) < os.path.getmtime(path):
            stale = ["--overwrite", "true"] if os.path.isfile(onnx_file) else []  # the demo's own older export
            _train(["export", "--ckpt_path", path, "--out", onnx_file, "--data", str(CONFIGS / "data" / "shapes.yaml"),
                    *data, *stale])  # fmt: skip
        ms = onnx_latency(path, onnx_file)
        described[name] = f"{onnx_file} (batch 1: eager {ms['eager']:.0f} ms, onnxruntime {ms['onnxruntime']:.0f} ms)"
    return described


def onnx_latency(ckpt: str, onnx_file: str, rounds: int = 10) -> dict[str, float]:
    """Median ms per image of the eager model and of its ONNX file in onnxruntime, at batch 1, interleaved, on
    the threads torch uses (bench/export_latency.py measures more rounds; docs/benchmarks.md)."""
    from training.export import batches, load_runner, median_latency_ms
    from training.saving import load_model

    adapter = load_model(ckpt).eval().export_adapter()
    images = batches(adapter.generated_images(2), 1)
    return median_latency_ms({"eager": adapter.eager, "onnxruntime": load_runner("onnx", onnx_file)}, images, rounds)


def _raised_while(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error`` was raised while handling a ``kind`` (the CLI turns a usage error into SystemExit)."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__ or error.__context__
    return error is not None


def _train(args: list[str]) -> None:
    """``python train.py ARGS`` in this process."""
    from train import main

    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI warns when given args while sys.argv holds the demo's own
    try:
        main(args)
    finally:
        sys.argv = argv


def fit_args(name: str, runs_dir: str, minutes: float, seed: int, overrides: list[str]) -> list[str] | None:
    """fit's arguments for configs/<name>.yaml (its epochs, capped at ``minutes``); None when that step is done.

    An interrupted step continues from its last.ckpt; one killed between its first best and last saves
    starts over, its lone best.ckpt set aside as best.interrupted.ckpt (a new fit refuses to overwrite it)."""
    best, last = checkpoints(name, runs_dir)
    if os.path.isfile(os.path.join(runs_dir, name, "demo-finished")):
        return None
    budget = int(minutes * 60)
    args = ["fit", "--config", str(CONFIGS / f"{name}.yaml"), "--runs_dir", runs_dir,
            "--seed_everything", str(seed),
            "--trainer.max_time", f"00:00:{budget // 60:02d}:{budget % 60:02d}", *overrides]  # fmt: skip
    if os.path.isfile(last):
        args += ["--ckpt_path", "last"]
    elif os.path.isfile(best):
        os.replace(best, os.path.join(os.path.dirname(best), "best.interrupted.ckpt"))
    return args


def checkpoints(name: str, runs_dir: str) -> tuple[str, str]:
    """The step's best.ckpt and last.ckpt paths (the configs' checkpoint file name, Lightning's last)."""
    ckpt_dir = os.path.join(runs_dir, name, "checkpoints")
    return os.path.join(ckpt_dir, "best.ckpt"), os.path.join(ckpt_dir, LAST)


def mark_finished(name: str, runs_dir: str) -> str:
    """Mark the step done; returns its checkpoint."""
    Path(runs_dir, name, "demo-finished").touch()
    best, last = checkpoints(name, runs_dir)
    return best if os.path.isfile(best) else last


def stopped(name: str, log: str | None = None) -> SystemExit:
    where = f"its log: {log}" if log else "error above"
    return SystemExit(f"{PROG} demo: the {name!r} step stopped (configs/{name}.yaml; {where})")


def fit(name: str, runs_dir: str, minutes: float, seed: int, overrides: list[str]) -> str:
    """Train configs/<name>.yaml in this process unless done; returns the checkpoint."""
    args = fit_args(name, runs_dir, minutes, seed, overrides)
    if args is not None:
        try:
            _train(args)
        except SystemExit as e:  # a usage error, printed above with fit's usage line: say which step
            if e.code and e.code != 128 + signal.SIGTERM:
                raise stopped(name) from e
            raise
    return mark_finished(name, runs_dir)


def side_by_side_helps(runs: int) -> bool:
    """Whether ``runs`` trainings at once beat one after the other: on a CPU (docs/benchmarks.md, 'Detector
    training speed') or with a GPU each; sharing one GPU is not measured."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count() >= runs
    return torch.get_num_threads() >= runs


# -- detectors side by side -------------------------------------------------------------------------------


def fit_together(steps: dict[str, list[str]], runs_dir: str, minutes: float, seed: int) -> dict[str, str]:
    """Train several configs at once, one child process each on an equal share of the CPU threads (and a GPU
    each when there are enough), showing each child's progress bar (tqdm, written to RUNS_DIR/NAME/demo.log)
    on a line of its own; returns each step's checkpoint.

    Why: a detector step at batch 4 on a CPU is bound by per-operator overhead more than by arithmetic
    (Faster R-CNN steps as fast on one thread as on two: docs/benchmarks.md, 'Detector training speed'), so
    two detectors side by side take little longer than one."""
    children: dict[str, tuple[subprocess.Popen, str]] = {}
    # A SIGTERM/SIGHUP sent to this process alone must not leave the children training: stop them below.
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            handlers[sig] = signal.signal(sig, lambda number, frame: sys.exit(128 + number))
    try:
        threads = start_children(steps, runs_dir, minutes, seed, children)
        if children:
            print(f"training {' and '.join(children)} side by side, {threads} CPU thread(s) each; logs: "
                  + ", ".join(log for _, log in children.values()))
            show_progress(children)
    except BaseException as e:
        stop_children(children, runs_dir, interrupted=isinstance(e, KeyboardInterrupt))
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    failed = {name: log for name, (child, log) in children.items() if child.returncode}
    for log in failed.values():  # the error is in the log: show its end here
        print(f"\n--- end of {log} ---", *last_lines(log, 15), sep="\n", file=sys.stderr)
    finished = {name: mark_finished(name, runs_dir) for name in steps if name not in failed}  # kept for a re-run
    if failed:
        raise SystemExit("\n".join(str(stopped(name, log)) for name, log in failed.items()))
    return finished


def start_children(steps: dict[str, list[str]], runs_dir: str, minutes: float, seed: int,
                   children: dict[str, tuple[subprocess.Popen, str]]) -> str:  # fmt: skip
    """Start ``python train.py fit`` for each unfinished step, adding (process, log path) to ``children`` as
    each starts (so a caller interrupted midway stops those); returns the CPU threads each one gets."""
    import torch

    threads = str(max(1, torch.get_num_threads() // len(steps)))
    # Unbuffered: a tqdm bar redraws after "\r", which a line-buffered log file would hold back.
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if torch.cuda.is_available() else []
    gpus = [g for g in gpus if g.strip()] or [str(k) for k in range(torch.cuda.device_count())]
    bars = ["--trainer.callbacks", json.dumps([TQDM_PROGRESS_BAR, LR_MONITOR])]  # a log file cannot show rich's
    for i, (name, overrides) in enumerate(steps.items()):
        args = fit_args(name, runs_dir, minutes, seed, [*overrides, *bars])
        if args is None:
            continue
        if len(gpus) >= len(steps):  # a GPU each; otherwise they share what there is
            env = {**env, "CUDA_VISIBLE_DEVICES": gpus[i]}
        log = os.path.join(runs_dir, name, "demo.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "ab") as f:  # appended: a resumed step keeps the interrupted attempt's log
            child = subprocess.Popen([sys.executable, str(TRAIN_PY), *args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
        children[name] = (child, log)
    return threads


def show_progress(children: dict[str, tuple[subprocess.Popen, str]]) -> None:
    """Until every child has exited: a line per child with the last line of its log, or how it ended."""
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    def progress() -> Table:
        table = Table.grid(padding=(0, 2))
        for name, (child, log) in children.items():
            latest = (last_lines(log, 1) or ["starting"])[0]
            state = {None: latest, 0: "done"}.get(child.poll(), f"stopped (exit {child.returncode})")
            # Text: a bar's "[00:20<00:40, ...]" is not rich markup; one line per run, however narrow
            table.add_row(name, Text(state, no_wrap=True, overflow="ellipsis"))
        return table

    with Live(progress(), refresh_per_second=2) as live:
        while any(child.poll() is None for child, _ in children.values()):
            time.sleep(0.5)
            live.update(progress())


def stop_children(children: dict[str, tuple[subprocess.Popen, str]], runs_dir: str, interrupted: bool) -> None:
    """Stop the children after a signal or an error, keeping the mark of any that had finished.

    Ctrl-C (``interrupted``) reached the children too: they get a minute to stop gracefully. Which ones had
    finished is decided before stopping the others, which then exit with 128 + SIGTERM (or 1 after Ctrl-C)."""
    done = [name for name, (child, _) in children.items() if child.poll() == 0]
    for child, _ in children.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=60 if interrupted else 0)
        if child.poll() is None:
            child.terminate()
            child.wait()
    for name in done:  # one that had finished before the interruption is kept
        mark_finished(name, runs_dir)


def last_lines(path: str, n: int) -> list[str]:
    """The last ``n`` lines of a log as a terminal shows them (a tqdm bar redraws itself after a carriage
    return; its cursor movements are dropped)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 16384))
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", f.read().decode(errors="replace"))
    shown = [next((part.rstrip() for part in reversed(line.split("\r")) if part.strip()), "")
             for line in text.split("\n")]  # fmt: skip
    return [line for line in shown if line][-n:]
