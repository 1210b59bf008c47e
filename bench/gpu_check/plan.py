"""What the GPU check runs: its scales (full, quick, dry run), its checks and their ``train.py`` command lines.

Pure data, no torch: the orchestrator (``python -m bench.gpu_check``) prints and records the plan without
importing torch, each check process (``bench.gpu_check.checks``) rebuilds the same plan from the same
arguments, and tests/bench/test_gpu_check.py parses every command line of the GPU plan.

The models: the shipped configs (configs/faster_rcnn.yaml, configs/retinanet.yaml) with their CPU-demo structure
(MobileNetV3 body, narrow FPN, stride-8..32 maps, demo anchors, halved proposals) set back to torchvision's
ResNet-50-FPN detectors (``fasterrcnn_resnet50_fpn``, ``retinanet_resnet50_fpn``: 2000 training proposals,
512 sampled ROIs, P3-P7, 9 anchors), resized to ``model_size`` px. Nothing is downloaded: no weights, so every
layer trains, with BatchNorm. Everything else is the config's: optimiser, warm-up, cosine decay, gradient
clipping, callbacks, logging.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

DETECTORS = ("faster_rcnn", "retinanet")
PRECISIONS = ("bf16-mixed", "16-mixed")
EVAL_PRECISION = "bf16-mixed"  # validate and the DDP runs
SPEED_CALLBACK = "bench.gpu_check.speed.RawLoopAlternation"
SPEED_FILE = "gpu_check_speed.json"  # in the fit run's folder

_R50_COMMON = {"backbone": "resnet50_fpn", "backbone_checkpoint": None, "trainable_backbone_layers": None,
               "returned_layers": None, "anchor_sizes": None, "fpn_channels": None}  # fmt: skip
R50_FPN = {
    "faster_rcnn": {**_R50_COMMON, "box_representation_size": None, "rpn_pre_nms_top_n_train": None,
                    "rpn_post_nms_top_n_train": None, "rpn_pre_nms_top_n_test": None,
                    "rpn_post_nms_top_n_test": None, "box_batch_size_per_image": None},
    "retinanet": {**_R50_COMMON, "aspect_ratios": None, "p6p7": True, "group_norm_head": False},
}  # fmt: skip
"""Per detector: the model options (``--model.init_args.KEY``) that make the shipped config torchvision's R50-FPN."""


@dataclass(frozen=True)
class Scale:
    """The sizes of one mode of the check.

    image_size: generated shapes images, px (square); model_size: the detectors' min_size = max_size.
    fit_steps: training steps of each fit check, per precision (one epoch, ``limit_train_batches``).
    block: steps per timed block; rounds: litvision blocks each followed by a raw-loop block (the first
        round is the warm-up, left out of the medians).
    kill_steps x kill_epochs: the run killed after its first ``last.ckpt`` and resumed.
    ddp_steps: training steps of each process in the 2-process fit.
    timeouts: seconds per check (the budget may cut them shorter).
    """

    mode: str
    accelerator: str
    image_size: int
    model_size: int
    num_train: int
    num_val: int
    batch_size: int
    num_workers: int
    fit_steps: dict[str, int]
    block: int
    rounds: int
    kill_steps: int
    kill_epochs: int
    ddp_steps: int
    compare_device: str
    compare_precision: str
    resamples: int
    compare_repeats: tuple[int, int] = (3, 20)  # compare's speed measurement: warm-up calls, timed calls
    timeouts: dict[str, int] = field(default_factory=dict)
    run_precision: str | None = None  # every train.py run's --trainer.precision instead of the one named


_GPU_TIMEOUTS = {"env": 60, "data": 150, "fit_bf16": 180, "fit_16": 150, "validate": 90, "compare": 150,
                 "kill_resume": 180, "ddp": 240}  # fmt: skip
SCALES = {
    # Budgeted for ~15-25 training images/s per R50-FPN detector at 800 px (docs/benchmarks.md, "GPU check").
    "full": Scale("full", "gpu", 800, 800, num_train=256, num_val=48, batch_size=4, num_workers=6,
                  fit_steps={"bf16-mixed": 64, "16-mixed": 40}, block=8, rounds=4, kill_steps=8, kill_epochs=3,
                  ddp_steps=16, compare_device="cuda", compare_precision="bf16", resamples=200,
                  timeouts=_GPU_TIMEOUTS),
    "quick": Scale("quick", "gpu", 800, 800, num_train=128, num_val=24, batch_size=4, num_workers=6,
                   fit_steps={"bf16-mixed": 32, "16-mixed": 24}, block=4, rounds=3, kill_steps=4, kill_epochs=3,
                   ddp_steps=8, compare_device="cuda", compare_precision="bf16", resamples=100,
                   timeouts=_GPU_TIMEOUTS),
    # The same commands on the CPU at a tiny scale: 160-px images (the generator's smallest) read at 64 px,
    # in float32: CPU autocast has no float16, and its bf16 kernels give other numbers from run to run (the
    # randomly initialised R50 then diverged to NaN weights within 4 steps in some runs), where the checks
    # compare runs. The mixed-precision paths are tested apart (tests/bench, tests/training/test_cli.py).
    "dry-run": Scale("dry-run", "cpu", 160, 64, num_train=8, num_val=4, batch_size=2, num_workers=0,
                     fit_steps={"bf16-mixed": 4, "16-mixed": 4}, block=1, rounds=2, kill_steps=2, kill_epochs=2,
                     ddp_steps=2, compare_device="cpu", compare_precision="32", resamples=10,
                     compare_repeats=(1, 2), timeouts=dict.fromkeys(_GPU_TIMEOUTS, 600), run_precision="32-true"),
}  # fmt: skip


def short(precision: str) -> str:
    """``bf16-mixed`` -> ``bf16``, ``16-mixed`` -> ``16``: run and check names."""
    return precision.removesuffix("-mixed")


def _value(v) -> str:
    """A command-line value as jsonargparse reads it."""
    return json.dumps(v) if v is None or isinstance(v, bool) else str(v)


@dataclass(frozen=True)
class Check:
    """One check: its name, what it shows, its timeout, the checks it needs (skipped when one of them did not
    pass), the train.py command lines it runs (without ``python train.py``), for the record, and the checks whose
    checkpoints it reads (run with it by ``--only``; without their files it is skipped)."""

    name: str
    title: str
    timeout: int
    needs: tuple[str, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()
    reads: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The checks of one mode, with the folders they use: ``data`` (generated images, kept between runs of the
    same scale) and ``runs`` (this run's checkpoints, logs, reports)."""

    scale: Scale
    data: Path
    runs: Path
    ddp_on_cpu: bool = False  # dry run: also run the 2-process check on the CPU (gloo), slow

    # -- command lines --------------------------------------------------------------------------------------
    def shapes_args(self) -> list[str]:
        s = self.scale
        return ["shapes", "--out", str(self.data), "--num_train", str(s.num_train), "--num_val", str(s.num_val),
                "--height", str(s.image_size), "--width", str(s.image_size), "--voc", "false",
                "--classification", "false"]  # fmt: skip

    def data_args(self) -> list[str]:
        s = self.scale
        return ["--data.init_args.root", str(self.data), "--data.init_args.generate", "false",
                "--data.init_args.batch_size", str(s.batch_size), "--data.init_args.num_workers", str(s.num_workers)]

    def model_args(self, detector: str) -> list[str]:
        options = {**R50_FPN[detector], "min_size": self.scale.model_size, "max_size": self.scale.model_size}
        return [a for k, v in options.items() for a in (f"--model.init_args.{k}", _value(v))]

    def run_args(self, subcommand: str, detector: str, name: str, precision: str, devices: int = 1) -> list[str]:
        """``train.py SUBCOMMAND`` with the detector's config made R50-FPN, this scale's data, a run folder."""
        precision = self.scale.run_precision or precision
        trainer = ["--trainer.accelerator", self.scale.accelerator, "--trainer.devices", str(devices),
                   "--trainer.precision", precision]  # fmt: skip
        if devices > 1:
            trainer += ["--trainer.strategy", "ddp"]
        return [subcommand, "--config", f"configs/{detector}.yaml", *self.model_args(detector), *self.data_args(),
                *trainer, "--runs_dir", str(self.runs), "--name", name]  # fmt: skip

    def checkpoint(self, run: str) -> Path:
        return self.runs / run / "checkpoints" / "last.ckpt"

    def fit_args(self, detector: str, precision: str) -> list[str]:
        """A fit of ``fit_steps`` steps (one epoch, validated at its end) timed against a raw loop."""
        s, name = self.scale, f"fit_{detector}_{short(precision)}"
        speed = {"class_path": SPEED_CALLBACK, "init_args": {"out": str(self.runs / name / SPEED_FILE),
                                                             "block": s.block, "rounds": s.rounds}}  # fmt: skip
        return [*self.run_args("fit", detector, name, precision), "--trainer.max_epochs", "1",
                "--trainer.limit_train_batches", str(s.fit_steps[precision]),
                "--trainer.callbacks+", json.dumps(speed)]  # fmt: skip

    def validate_args(self, detector: str, run: str, name: str, devices: int = 1) -> list[str]:
        return [*self.run_args("validate", detector, name, EVAL_PRECISION, devices),
                "--ckpt_path", str(self.checkpoint(run))]

    def compare_args(self) -> list[str]:
        s = self.scale
        checkpoints = [str(self.checkpoint(f"fit_{d}_{short(PRECISIONS[0])}")) for d in DETECTORS]
        return ["compare", "--checkpoints", *checkpoints, "--data", "configs/data/shapes.yaml",
                "--data.init_args.root", str(self.data), "--data.init_args.generate", "false",
                "--data.init_args.batch_size", str(s.batch_size), "--data.init_args.num_workers", str(s.num_workers),
                "--device", s.compare_device, "--precision", s.compare_precision, "--resamples", str(s.resamples),
                "--warmup", str(s.compare_repeats[0]), "--repeats", str(s.compare_repeats[1]),
                "--out", str(self.runs / "compare")]  # fmt: skip

    def kill_args(self) -> list[str]:
        """The run that is killed once its first last.ckpt exists; the resume adds ``--ckpt_path last``."""
        s = self.scale
        return [*self.run_args("fit", DETECTORS[0], "kill_resume", PRECISIONS[0]),
                "--trainer.max_epochs", str(s.kill_epochs), "--trainer.limit_train_batches", str(s.kill_steps),
                "--trainer.limit_val_batches", "2"]  # fmt: skip

    def ddp_fit_args(self) -> list[str]:
        return [*self.run_args("fit", DETECTORS[0], "ddp_fit", EVAL_PRECISION, devices=2),
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(self.scale.ddp_steps)]

    # -- the checks -----------------------------------------------------------------------------------------
    def checks(self) -> list[Check]:
        t, gpu = self.scale.timeouts, ("env",) if self.scale.accelerator == "gpu" else ()
        checks = [Check("env", "versions, devices", t["env"]),
                  Check("data", f"shapes at {self.scale.image_size} px", t["data"], gpu,
                        (tuple(self.shapes_args()),))]  # fmt: skip
        for precision in PRECISIONS:
            for d in DETECTORS:
                checks.append(Check(f"fit_{d}_{short(precision)}", f"fit {d} R50-FPN {precision}, vs a raw loop",
                                    t[f"fit_{short(precision)}"], (*gpu, "data"),
                                    (tuple(self.fit_args(d, precision)),)))  # fmt: skip
        fits = {d: f"fit_{d}_{short(PRECISIONS[0])}" for d in DETECTORS}
        for d, run in fits.items():
            checks.append(Check(f"validate_{d}", f"validate {d} (checkpoint of {run})", t["validate"],
                                (*gpu, "data"), (tuple(self.validate_args(d, run, f"validate_{d}")),), (run,)))
        checks.append(Check("compare", f"compare --device {self.scale.compare_device} --precision "
                            f"{self.scale.compare_precision}", t["compare"], (*gpu, "data"),
                            (tuple(self.compare_args()),), tuple(fits.values())))  # fmt: skip
        checks.append(Check("kill_resume", "SIGKILL once last.ckpt exists, then --ckpt_path last",
                            t["kill_resume"], (*gpu, "data"),
                            (tuple(self.kill_args()), (*self.kill_args(), "--ckpt_path", "last"))))
        validations = tuple(tuple(self.validate_args(DETECTORS[0], "ddp_fit", f"ddp_validate_{n}", devices=n))
                            for n in (1, 2))  # fmt: skip
        checks.append(Check("ddp", "2-process fit + validate, mAP equal to 1 process", t["ddp"], (*gpu, "data"),
                            (tuple(self.ddp_fit_args()), *validations)))
        return checks

    def check(self, name: str) -> Check:
        for c in self.checks():
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; the checks: {', '.join(c.name for c in self.checks())}")

    def estimate_seconds(self, train_ips: float = 20.0, eval_ips: float = 40.0, startup: float = 15.0,
                         data_ips: float = 15.0, accumulate: float = 0.02) -> float:
        """The run's wall time on one GPU (the DDP check skipped), from training and evaluation throughput
        (images/s), the cost of one train.py process (start-up, model, sanity check, checkpoint writes), the
        generator's images/s and the seconds of one bootstrap accumulation: how the scales were sized."""
        s, n = self.scale, len(DETECTORS)
        trained = n * sum(s.batch_size * (steps + s.rounds * s.block) for steps in s.fit_steps.values())
        trained += s.batch_size * s.kill_steps * s.kill_epochs
        # the fits' validations, validate, compare's pass, the killed run's 2-batch validations, compare's timing
        evaluated = s.num_val * (n * len(PRECISIONS) + n + n) + 2 * s.batch_size * s.kill_epochs
        evaluated += n * sum(s.compare_repeats) * (1 + s.batch_size)
        processes = 1 + n * len(PRECISIONS) + n + 1 + 2  # data, fits, validate, compare, killed + resumed
        return (trained / train_ips + evaluated / eval_ips + processes * startup
                + (s.num_train + s.num_val) / data_ips + s.resamples * n * accumulate)


def make_plan(mode: str, work: Path, runs: Path, ddp_on_cpu: bool = False) -> Plan:
    """The plan of ``mode`` (full, quick, dry-run): data under ``work`` (reused by a later run of the same scale),
    this run's outputs under ``runs``."""
    s = SCALES[mode]
    data = Path(work) / f"shapes-{s.image_size}px-{s.num_train}-{s.num_val}"
    return Plan(s, data, Path(runs), ddp_on_cpu)
