"""One check of the GPU check, run in its own process by the orchestrator (``python -m bench.gpu_check``)::

    python -m bench.gpu_check.checks NAME --mode full --work DIR --runs DIR --result FILE

It runs the check's ``train.py`` commands (plan.py) as subprocesses, their output into this process' output
(the check's log), verifies what they wrote (checkpoints, metrics.csv, comparison.json, the speed file) and
writes ``FILE``: ``{"status": "PASS" | "FAIL" | "SKIP", "reason", "text", "numbers"}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .plan import DETECTORS, EVAL_PRECISION, PRECISIONS, SPEED_FILE, Plan, make_plan, short

REPO = Path(__file__).resolve().parents[2]
# The same checkpoint scored twice in the same precision: equal but for nondeterministic GPU kernels.
SAME_MODEL_MAP_TOLERANCE = 1e-3
SAME_MODEL_LOSS_RTOL = 1e-3
# One process against two on the same checkpoint: every image's detections are the same (COCO's
# accumulation is exact), so mAP must agree to rounding; the loss means sum in another order.
DDP_MAP_TOLERANCE = 1e-6
DDP_LOSS_RTOL = 1e-5
RUNTIME_MODULES = ("torch", "torchvision", "lightning", "torchmetrics", "pycocotools", "faster_coco_eval",
                   "jsonargparse", "tensorboard", "rich", "matplotlib", "PIL", "numpy")  # fmt: skip


class CheckFailed(Exception):
    """The check failed; the message says why, in one line."""


class CheckSkipped(Exception):
    """The check does not apply here; the message says why."""


def train(args: list[str] | tuple[str, ...], what: str = "") -> None:
    """``python train.py ARGS`` from the repository root, its output into this process' output; a non-zero
    exit status fails the check."""
    command = [sys.executable, "train.py", *args]
    print(f"\n$ {shlex.join(command[1:])}", flush=True)
    code = subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL).returncode
    if code != 0:
        raise CheckFailed(f"train.py {args[0]}{' (' + what + ')' if what else ''} exited with status {code}")


def read_metrics(run: Path) -> list[dict[str, float]]:
    """The rows of a run's ``version_0/metrics.csv``, each with its non-empty values as floats."""
    path = run / "version_0" / "metrics.csv"
    if not path.is_file():
        raise CheckFailed(f"{path} is missing")
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def last_value(rows: list[dict[str, float]], key: str, where: Path | str) -> float:
    values = [r[key] for r in rows if key in r]
    if not values:
        raise CheckFailed(f"{where}: no {key} logged")
    return values[-1]


def global_step(checkpoint: Path) -> int:
    import torch

    if not checkpoint.is_file():
        raise CheckFailed(f"{checkpoint} was not written")
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def agree(name: str, a: float, b: float, atol: float = 0.0, rtol: float = 0.0) -> float:
    """|a - b|, failing the check when it exceeds ``atol + rtol * |b|``."""
    diff = abs(a - b)
    if not diff <= atol + rtol * abs(b):
        raise CheckFailed(f"{name}: {a!r} against {b!r} (difference {diff:.3g})")
    return diff


# -- the checks -----------------------------------------------------------------------------------------------
def check_env(plan: Plan) -> dict:
    import importlib

    missing = []
    for module in RUNTIME_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    if missing:
        raise CheckFailed(f"cannot import {', '.join(missing)}")
    import lightning
    import torch
    import torchvision

    info = {"torch": torch.__version__, "torchvision": torchvision.__version__, "lightning": lightning.__version__,
            "cuda": torch.version.cuda, "cpus": os.cpu_count(), "gpus": []}  # fmt: skip
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = []
    print(json.dumps(info, indent=1), flush=True)
    if plan.scale.accelerator == "gpu" and not info["gpus"]:
        raise CheckFailed(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
    where = ", ".join(info["gpus"]) or f"CPU only, {info['cpus']} cores"
    return {**info, "text": f"{where}; torch {info['torch']}, CUDA {info['cuda']}, lightning {info['lightning']}"}


def check_data(plan: Plan) -> dict:
    train(plan.shapes_args())
    counts = {}
    for split, expected in (("train", plan.scale.num_train), ("val", plan.scale.num_val)):
        path = plan.data / "annotations" / f"instances_{split}.json"
        counts[split] = len(json.loads(path.read_text())["images"])
        if counts[split] != expected:
            raise CheckFailed(f"{path}: {counts[split]} images, expected {expected}")
    return {**counts, "text": f"{counts['train']} train / {counts['val']} val images, {plan.scale.image_size} px"}


def check_fit(plan: Plan, detector: str, precision: str) -> dict:
    from .speed import speed_summary

    name = f"fit_{detector}_{short(precision)}"
    train(plan.check(name).commands[0])
    run, steps = plan.runs / name, plan.scale.fit_steps[precision]
    done = global_step(plan.checkpoint(name))
    if done != steps:
        raise CheckFailed(f"{plan.checkpoint(name)}: global_step {done}, expected {steps}")
    rows = read_metrics(run)
    numbers = {k: last_value(rows, k, run) for k in ("train_loss", "val_loss", "val_map", "val_map_50")}
    if not all(math.isfinite(numbers[k]) for k in ("train_loss", "val_loss")):
        raise CheckFailed(f"non-finite losses: {numbers}")
    timings = json.loads((run / SPEED_FILE).read_text())
    if not all(b["finite"] for b in timings["raw"]):
        raise CheckFailed("the raw loop's loss was not finite")
    if plan.scale.accelerator == "gpu" and timings["precision"] != precision:  # only CPUs lack float16 autocast
        raise CheckFailed(f"asked for {precision}, Lightning ran {timings['precision']}")
    speed = speed_summary(timings)
    numbers.update(speed, peak_memory_gib=timings["peak_memory_gib"], ran_as=timings["precision"])
    memory = f", peak {numbers['peak_memory_gib']:.1f} GiB" if numbers["peak_memory_gib"] is not None else ""
    ran_as = f" (ran as {timings['precision']})" if timings["precision"] != precision else ""
    rounds = f"{speed['rounds']} round{'s' * (speed['rounds'] != 1)}"
    text = (f"{speed['litvision_ips']:.1f} img/s, raw loop {speed['raw_ips']:.1f}: {speed['time_ratio']:.3f}x its time "
            f"per image ({rounds}){ran_as}; loss {numbers['train_loss']:.3f}, val mAP {numbers['val_map']:.4f}{memory}")
    return {**numbers, "text": text}


def _same_scores(name: str, ours: list[dict], theirs: list[dict], where: tuple, map_tol: float,
                 loss_rtol: float) -> dict:  # fmt: skip
    """val_map, val_map_50 and val_loss of two runs' last validations, which must agree."""
    numbers = {}
    for key in ("val_map", "val_map_50", "val_loss"):
        a, b = last_value(ours, key, where[0]), last_value(theirs, key, where[1])
        numbers[key] = a
        tol = {"atol": map_tol} if key != "val_loss" else {"rtol": loss_rtol}
        numbers[f"{key}_difference"] = agree(f"{name} {key}", a, b, **tol)
    return numbers


def check_validate(plan: Plan, detector: str) -> dict:
    fit = f"fit_{detector}_{short(PRECISIONS[0])}"
    if not plan.checkpoint(fit).is_file():
        raise CheckSkipped(f"no checkpoint: check {fit} did not write {plan.checkpoint(fit)}")
    name = f"validate_{detector}"
    train(plan.check(name).commands[0])
    numbers = _same_scores(f"validate against {fit}'s last validation", read_metrics(plan.runs / name),
                           read_metrics(plan.runs / fit), (name, fit), SAME_MODEL_MAP_TOLERANCE,
                           SAME_MODEL_LOSS_RTOL)  # fmt: skip
    text = (f"val mAP {numbers['val_map']:.4f}, loss {numbers['val_loss']:.4f}; the fit's end: mAP "
            f"difference {numbers['val_map_difference']:.1e}, loss {numbers['val_loss_difference']:.1e}")
    return {**numbers, "text": text}


def check_compare(plan: Plan) -> dict:
    fits = [f"fit_{d}_{short(PRECISIONS[0])}" for d in DETECTORS]
    missing = [f for f in fits if not plan.checkpoint(f).is_file()]
    if missing:
        raise CheckSkipped(f"no checkpoint from check {', '.join(missing)}")
    train(plan.check("compare").commands[0])
    report = json.loads((plan.runs / "compare" / "comparison.json").read_text())
    settings = report["settings"]
    if not settings["device"].startswith(plan.scale.compare_device) or settings["precision"] != plan.scale.compare_precision:
        raise CheckFailed(f"comparison.json: ran on {settings['device']} in {settings['precision']}")
    numbers, parts = {"device": settings["device"]}, []
    for detector, model in zip(DETECTORS, report["models"], strict=True):
        if model["map"] is None or not model["latency_ms"] or not model["throughput_ips"]:
            raise CheckFailed(f"comparison.json, {model['model']}: mAP {model['map']}, latency {model['latency_ms']}, "
                              f"throughput {model['throughput_ips']}")
        numbers[detector] = {k: model[k] for k in ("map", "map_50", "latency_ms", "throughput_ips")}
        validated = plan.runs / f"validate_{detector}"
        if validated.is_dir():  # the same checkpoint; the same autocast dtype but in the dry run (float32 there)
            val_map = last_value(read_metrics(validated), "val_map", validated)
            same = plan.scale.compare_precision == short(EVAL_PRECISION)
            numbers[detector]["map_difference"] = agree(f"{detector} compare mAP against validate's", model["map"],
                                                        val_map, atol=SAME_MODEL_MAP_TOLERANCE if same else 1.0)
        parts.append(f"{detector} mAP {model['map']:.4f}, {model['latency_ms']:.1f} ms/img at batch 1, "
                     f"{model['throughput_ips']:.1f} img/s")
    return {**numbers, "text": "; ".join(parts)}


def _kill_when_last_checkpoint(plan: Plan, args: tuple[str, ...]) -> int:
    """Start ``train.py ARGS``, SIGKILL it as soon as its last.ckpt exists (written atomically: complete);
    returns that checkpoint's global step."""
    last = plan.checkpoint("kill_resume")
    command = [sys.executable, "train.py", *args]
    print(f"\n$ {shlex.join(command[1:])}  # killed once {last} exists", flush=True)
    proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL)
    while proc.poll() is None and not last.exists():
        time.sleep(0.05)
    if proc.poll() is not None:
        raise CheckFailed(f"the run ended (status {proc.returncode}) before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"killed: status {proc.returncode}", flush=True)
    return global_step(last)


def check_kill_resume(plan: Plan) -> dict:
    s, (run_args, resume_args) = plan.scale, plan.check("kill_resume").commands
    total, run = s.kill_steps * s.kill_epochs, plan.runs / "kill_resume"
    killed_at = _kill_when_last_checkpoint(plan, run_args)
    if not 0 < killed_at < total:
        raise CheckFailed(f"killed with last.ckpt at step {killed_at}, expected one between 0 and {total}")
    train(resume_args, "--ckpt_path last")
    final = global_step(plan.checkpoint("kill_resume"))
    if final != total:
        raise CheckFailed(f"the resumed run ended at step {final}, expected {total}")
    rows = read_metrics(run)
    epochs = [int(r["epoch"]) for r in rows if "val_loss" in r]
    steps = [int(r["step"]) for r in rows if "train_loss" in r]
    if epochs != list(range(s.kill_epochs)):
        raise CheckFailed(f"metrics.csv: validations of epochs {epochs}, expected {list(range(s.kill_epochs))} once each")
    if steps != sorted(set(steps)):
        raise CheckFailed(f"metrics.csv: the epochs' train_loss steps {steps} repeat or go back")
    if (run / "version_1").exists():
        raise CheckFailed("the resumed run started a new log version instead of continuing version_0")
    return {"killed_at_step": killed_at, "final_step": final, "epochs_logged": len(epochs),
            "text": f"killed at step {killed_at} of {total}, resumed to {final}; each epoch logged once"}


def check_ddp(plan: Plan) -> dict:
    import torch

    if plan.scale.accelerator == "gpu" and torch.cuda.device_count() < 2:
        raise CheckSkipped(f"{torch.cuda.device_count()} GPU: the 2-process check needs 2")
    if plan.scale.accelerator == "cpu" and not plan.ddp_on_cpu:
        raise CheckSkipped("2 gloo processes on the CPU: about a minute a command on 2 cores; --ddp runs them")
    fit_args, one, two = plan.check("ddp").commands
    train(fit_args, "2 processes")
    train(one, "1 process")
    train(two, "2 processes")
    rows = {n: read_metrics(plan.runs / n) for n in ("ddp_fit", "ddp_validate_1", "ddp_validate_2")}
    numbers = _same_scores("2 processes against 1", rows["ddp_validate_2"], rows["ddp_validate_1"],
                           ("ddp_validate_2", "ddp_validate_1"), DDP_MAP_TOLERANCE, DDP_LOSS_RTOL)
    _same_scores("the 2-process fit's validation against 1 process", rows["ddp_fit"], rows["ddp_validate_1"],
                 ("ddp_fit", "ddp_validate_1"), DDP_MAP_TOLERANCE, DDP_LOSS_RTOL)
    return {**numbers, "text": f"val mAP {numbers['val_map']:.6f} on 2 processes and 1 (difference "
                               f"{numbers['val_map_difference']:.1e}), the 2-process fit's too"}


def run(plan: Plan, name: str) -> dict:
    """The named check's numbers (``text``: its summary line); raises CheckFailed / CheckSkipped."""
    if name == "env":
        return check_env(plan)
    if name == "data":
        return check_data(plan)
    if name.startswith("fit_"):
        detector, _, precision = name.removeprefix("fit_").rpartition("_")
        return check_fit(plan, detector, f"{precision}-mixed")
    if name.startswith("validate_"):
        return check_validate(plan, name.removeprefix("validate_"))
    return {"compare": check_compare, "kill_resume": check_kill_resume, "ddp": check_ddp}[name](plan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="run one check of bench/gpu_check.sh")
    parser.add_argument("name")
    parser.add_argument("--mode", default="full")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--ddp", action="store_true", help="dry run: run the 2-process check on the CPU too")
    args = parser.parse_args(argv)
    plan = make_plan(args.mode, args.work, args.runs, ddp_on_cpu=args.ddp)
    result = {"status": "PASS", "reason": "", "text": "", "numbers": {}}
    try:
        numbers = run(plan, args.name)
        result.update(text=numbers.pop("text", ""), numbers=numbers)
    except CheckSkipped as e:
        result.update(status="SKIP", reason=str(e))
    except CheckFailed as e:
        result.update(status="FAIL", reason=str(e))
    except Exception as e:  # a bug or an unexpected file: its traceback goes to the log
        traceback.print_exc()
        result.update(status="FAIL", reason=f"{type(e).__name__}: {e}")
    print(f"\n{args.name}: {result['status']} {result['reason'] or result['text']}", flush=True)
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
