"""litvision entry point: ``python train.py fit|validate|test|predict --config configs/X.yaml`` (LightningCLI),
plus ``evaluate``, ``shapes`` and ``demo``. Installed as the ``litvision`` console script.

This is the one place that wires the packages together; the work lives in them. The Keras-style
callbacks are part of every run and configured under their own keys::

    checkpoint:    # training.callbacks.ModelCheckpoint (Keras ModelCheckpoint)
      filepath: runs/faster_rcnn/checkpoints/best.ckpt
      save_best_only: true
    lr_plateau:    # training.callbacks.ReduceLROnPlateau (Keras ReduceLROnPlateau)
      patience: 3
      factor: 0.5
"""

from __future__ import annotations

import contextlib
import dis
import os
import re
import signal
import sys
import time
from pathlib import Path

from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from classifiers.backbones import layers_command as layers
from detectors.compare import compare_command as compare
from detectors.data.shapes import shapes_command as shapes
from detectors.evaluation import evaluate_command as evaluate
from training.callbacks import ModelCheckpoint, ReduceLROnPlateau
from training.checkpoint_io import checkpoint_log_position, resolve_ckpt_path
from training.loggers import ResumableCSVLogger
from training.saving import offline_model_config

LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION  # last.ckpt

CONFIGS = Path(__file__).resolve().parent / "configs"
# Every run's default callbacks besides the Keras-style ones (the demo's background runs swap in tqdm's bar).
RICH_PROGRESS_BAR = {"class_path": "lightning.pytorch.callbacks.RichProgressBar"}
# refresh_rate explicit: replacing the rich bar from a config would carry over its refresh_rate of 100.
TQDM_PROGRESS_BAR = {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 1}}
LR_MONITOR = {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
              "init_args": {"logging_interval": "epoch"}}  # fmt: skip
EXTRA_COMMANDS = {
    "evaluate": "score a COCO results file against COCO ground truth (pycocotools-exact)",
    "shapes": "generate the embedded shapes dataset (COCO, VOC and classification layouts)",
    "demo": "the main job on the embedded data: shapes, both detectors, their comparison, the classifier",
    "layers": "list a classifier backbone's layers in the order freeze=N counts them",
    "compare": "compare detector checkpoints on one split: metrics, bootstrap CIs, speed, plots",
}


class LitvisionCLI(LightningCLI):
    """LightningCLI with the Keras-style callbacks, TensorBoard + CSV logs in ``<runs_dir>/<name>/version_N``,
    a ``--ckpt_path last`` that fails instead of silently starting over, and ``--ckpt_path auto``: resume from
    last.ckpt when there is one, else start (a job script that is requeued after a preemption)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=str, default="litvision", help="run name: logs go to RUNS_DIR/NAME")
        parser.add_argument("--runs_dir", type=str, default="runs", help="directory holding all runs")
        # predict (detectors): detectors.predict.CocoPredictionWriter's settings; other subcommands ignore them.
        parser.add_argument("--predict_out", type=str | None, default=None,
                            help="predict: folder for predictions.json; default RUNS_DIR/NAME/predictions")
        parser.add_argument("--draw", type=bool, default=False,
                            help="predict: also write PREDICT_OUT/images/*.jpg with the detections drawn")
        parser.add_argument("--draw_score_threshold", type=float, default=0.5,
                            help="predict: only detections scoring at least this are drawn")  # fmt: skip
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ReduceLROnPlateau, "lr_plateau", required=False)  # null disables it
        parser.set_defaults(
            {
                # A file name without a directory goes to RUNS_DIR/NAME/checkpoints/.
                "checkpoint.filepath": "best.ckpt",
                "checkpoint.save_best_only": True,
                "lr_plateau.patience": 3,
                "lr_plateau.factor": 0.5,
                "lr_plateau.min_lr": 1e-6,
                "trainer.callbacks": [RICH_PROGRESS_BAR, LR_MONITOR],
            }
        )
        # The model learns its classes from the data (detectors and classifier alike).
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """As LightningCLI (the model is rebuilt as the checkpoint describes it), but offline: the saved
        weights replace pretrained ones, so ``weights: DEFAULT`` or a ``backbone_checkpoint`` recorded at
        training time is not fetched again, and unsafe or truncated files get litvision's clear errors."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if sub == "fit" and ckpt_path in ("last", "auto"):  # resolved here, so the model is rebuilt as saved too
            with self._usage_errors():
                ckpt_path = self.config[sub]["ckpt_path"] = resolve_ckpt_path(ckpt_path, self._checkpoint_dir(sub))
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return
        with self._usage_errors():
            model = offline_model_config(ckpt_path)
        if model is not None:
            class_path, hparams = model
            configured = (self.config[sub].get("model") or {}).get("class_path")
            if configured and configured != class_path:  # e.g. a RetinaNet checkpoint with faster_rcnn.yaml
                self.parser.error(f"{ckpt_path} holds a {class_path.rsplit('.', 1)[-1]} but the config's model is "
                                  f"{configured.rsplit('.', 1)[-1]}: use the config it was trained with")
            update = {sub: {"model": {"class_path": class_path, "dict_kwargs": hparams}}}
            self.config = self.parser.parse_object(update, self.config)

    def _sub(self, subcommand: str | None = None):
        """The subcommand's config (``subcommand`` before LightningCLI sets ``self.subcommand``)."""
        subcommand = subcommand or self.subcommand
        return self.config.get(subcommand) if subcommand else self.config

    def run_dir(self, subcommand: str | None = None) -> str:
        sub = self._sub(subcommand)
        return os.path.join(sub["runs_dir"], sub["name"])

    def _checkpoint_dir(self, subcommand: str | None = None) -> str:
        """Where the checkpoint callback writes: its filepath's folder, RUNS_DIR/NAME/checkpoints for a bare name."""
        filepath = self._sub(subcommand)["checkpoint"]["filepath"]
        return os.path.dirname(filepath) or os.path.join(self.run_dir(subcommand), "checkpoints")

    def before_instantiate_classes(self) -> None:
        sub = self._sub()
        self.plateau_disabled = sub.get("lr_plateau", False) is None
        if self.plateau_disabled:  # `lr_plateau: null`: another LR schedule owns the LR
            del sub["lr_plateau"]
        ckpt_dir = self._checkpoint_dir()
        sub["checkpoint"]["filepath"] = os.path.join(ckpt_dir, os.path.basename(sub["checkpoint"]["filepath"]))
        with self._usage_errors():
            if self.subcommand == "fit" and sub.get("ckpt_path"):
                sub["ckpt_path"] = resolve_ckpt_path(sub["ckpt_path"], ckpt_dir)
                here = os.path.realpath(os.path.dirname(os.path.abspath(sub["ckpt_path"])))  # a linked file stays here
                if here != os.path.realpath(ckpt_dir):
                    _refuse_to_overwrite(sub["checkpoint"]["filepath"], resume_from=sub["ckpt_path"])
            elif self.subcommand == "fit" and not sub["trainer"].get("fast_dev_run"):  # it saves nothing
                _refuse_to_overwrite(sub["checkpoint"]["filepath"])

    def instantiate_classes(self) -> None:
        with self._usage_errors():
            super().instantiate_classes()

    @contextlib.contextmanager
    def _usage_errors(self):
        """A value or file that litvision's own checks refuse is a usage error: its message, no tracebacks."""
        try:
            yield
        except Exception as e:
            own = _own_check(e)
            if own is None:
                raise
            self.parser.error(str(own), ex=own)  # JSONARGPARSE_DEBUG=1 shows the traceback

    def after_instantiate_classes(self) -> None:
        if self.plateau_disabled:  # keep `lr_plateau: null` in the config.yaml saved with the run
            self._sub()["lr_plateau"] = None
        super().after_instantiate_classes()

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if self.plateau_disabled:
            callbacks = [c for c in callbacks if not isinstance(c, ReduceLROnPlateau)]
        if self.subcommand == "predict":
            callbacks = callbacks + self._prediction_writer()
        if config.get("enable_progress_bar") is False:  # the default RichProgressBar would conflict
            config["callbacks"] = [c for c in config.get("callbacks") or [] if not isinstance(c, ProgressBar)]
        if config.get("logger") is False:  # nothing to log the LR to: Lightning would refuse the monitor
            config["callbacks"] = [c for c in config.get("callbacks") or [] if not isinstance(c, LearningRateMonitor)]
        sub = self._sub()
        ckpt = sub.get("ckpt_path") if self.subcommand == "fit" else None
        version, step = checkpoint_log_position(ckpt) if ckpt else (None, 0)  # a resumed run continues its version
        if config.get("logger") in (True, None):
            # TensorBoard hides the events a resumed run logs again (steps after the checkpoint, run before the
            # interruption) when told where it resumed: SummaryWriter's purge_step. The CSV logger drops them.
            tensorboard = {"purge_step": step} if version is not None else {}
            if version is None:
                version = TensorBoardLogger(sub["runs_dir"], sub["name"]).version
            config["logger"] = [
                TensorBoardLogger(sub["runs_dir"], sub["name"], version=version, **tensorboard),
                ResumableCSVLogger(sub["runs_dir"], sub["name"], version=version),
            ]
        return super()._instantiate_trainer(config, callbacks)

    def _prediction_writer(self) -> list:
        """``predict`` on a detector writes ``predictions.json`` (COCO results) and optionally drawn images."""
        from detectors.module import DetectionModule
        from detectors.predict import CocoPredictionWriter

        if not isinstance(self.model, DetectionModule):
            return []
        sub = self._sub()
        out = sub["predict_out"] or os.path.join(self.run_dir(), "predictions")
        return [CocoPredictionWriter(out, sub["draw"], sub["draw_score_threshold"])]


_OWN_CODE = (str(Path(__file__).resolve()),
             *(str(Path(__file__).resolve().parent / d) + os.sep for d in ("detectors", "classifiers", "training")))


def _own_check(error: BaseException | None) -> BaseException | None:
    """The ValueError/OSError in ``error``'s cause chain that a ``raise`` statement in litvision's own code
    raised (a check of the configuration or of a file, whose message is for the user), or None: other errors,
    a bug's unpacking or conversion error included, keep their traceback."""
    while error is not None:
        tb = error.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (isinstance(error, (ValueError, OSError)) and tb is not None
                and tb.tb_frame.f_code.co_filename.startswith(_OWN_CODE)
                and any(i.offset == tb.tb_lasti and i.opname == "RAISE_VARARGS"
                        for i in dis.get_instructions(tb.tb_frame.f_code))):  # fmt: skip
            return error
        error = error.__cause__
    return None


def _refuse_to_overwrite(filepath: str, resume_from: str | None = None) -> None:
    """A run must not replace another run's checkpoints (every version of RUNS_DIR/NAME shares checkpoints/):
    Keras' ModelCheckpoint would, and a forgotten ``--ckpt_path last`` would lose the trained model."""
    last = os.path.join(os.path.dirname(filepath), LAST)
    taken = [f for f in (filepath, last) if "{" not in os.path.basename(f) and os.path.exists(f)]
    if not taken:
        return
    held = f"{' and '.join(taken)} already hold{'s' * (len(taken) == 1)} an earlier run's model"
    elsewhere = "start a separate run with another --name (or --runs_dir), or move the files away"
    if resume_from:
        raise FileExistsError(f"{held}, which continuing {resume_from} here would overwrite: {elsewhere}")
    resume = "continue that run with --ckpt_path last, " if os.path.exists(last) else ""
    raise FileExistsError(f"{held}, which a new run would overwrite: {resume}{elsewhere}")


def _cli(argv: list[str] | None = None) -> LitvisionCLI:
    try:
        return LitvisionCLI(
            args=argv,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "allow_abbrev": False,  # argparse would take a typo'd --trainer.max_step for --trainer.max_steps
                "epilog": "more commands: "
                + "; ".join(f"{name}: {what}" for name, what in EXTRA_COMMANDS.items())
                + " (python train.py COMMAND --help)",
            },
        )
    except SIGTERMException as e:
        # Lightning stops gracefully on SIGTERM, then exits with status 0, as if the run had finished: a job
        # script, a scheduler or the side-by-side demo would take the interrupted run for a complete one.
        raise SystemExit(128 + signal.SIGTERM) from e


# -- extra subcommands ------------------------------------------------------------------------------------






def demo(
    out: str = "demo",
    pretrain_minutes: float = 7.5,
    detector_minutes: float = 7.0,
    classifier_minutes: float = 1.5,
    seed: int = 0,
    detectors_together: bool | None = None,
) -> None:
    """The main job on the embedded data: shapes -> a MobileNetV3 pretrained on the shapes crops -> Faster R-CNN
    and RetinaNet from that backbone on the same schedule -> their comparison -> a frozen-backbone classifier
    transferred from the Faster R-CNN backbone.

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
        shapes(data_root, seed=seed)
    except FileExistsError as e:  # e.g. a demo directory from a version with another default dataset
        raise FileExistsError(f"{e}. For the demo: delete {out} (its runs belong to that dataset) or choose "
                              "another --out") from e
    crops = os.path.join(data_root, "classification")
    crop_data = ["--data.init_args.root", os.path.join(crops, "train"),
                 "--data.init_args.val_root", os.path.join(crops, "val")]  # fmt: skip
    pretrained = _demo_fit("pretrain", runs_dir, pretrain_minutes, seed, crop_data)
    data = ["--data.init_args.root", data_root, "--data.init_args.generate", "false"]
    detectors = {name: [*data, "--model.init_args.backbone_checkpoint", pretrained]
                 for name in ("faster_rcnn", "retinanet")}  # fmt: skip
    if detectors_together is None:
        detectors_together = _side_by_side_helps(len(detectors))
    if detectors_together:
        ckpt = _demo_fit_together(detectors, runs_dir, detector_minutes, seed)
    else:
        ckpt = {name: _demo_fit(name, runs_dir, detector_minutes, seed, args) for name, args in detectors.items()}
    report = os.path.join(out, "comparison")
    done = os.path.join(report, "comparison.json")
    if not os.path.isfile(done) or os.path.getmtime(done) < max(map(os.path.getmtime, ckpt.values())):
        _run_extra("compare", ["--checkpoints", ckpt["faster_rcnn"], ckpt["retinanet"],
                               "--data", str(CONFIGS / "data" / "shapes.yaml"), *data, "--out", report])  # fmt: skip
    classifier = _demo_fit("classifier", runs_dir, classifier_minutes, seed,
                           [*crop_data, "--model.init_args.backbone_checkpoint", ckpt["faster_rcnn"]])
    print("\nlitvision demo outputs")
    for what, where in [("dataset (COCO, VOC, crops)", data_root), ("pretrained backbone", pretrained),
                        ("Faster R-CNN", ckpt["faster_rcnn"]), ("RetinaNet", ckpt["retinanet"]),
                        ("comparison report", os.path.join(report, "comparison.md")),
                        ("classifier", classifier), ("logs (tensorboard --logdir)", runs_dir)]:  # fmt: skip
        print(f"  {what:30s} {where}")


def _demo_fit_args(name: str, runs_dir: str, minutes: float, seed: int, overrides: list[str]) -> list[str] | None:
    """fit's arguments for configs/<name>.yaml (its epochs, capped at ``minutes``); None when that step is done.

    An interrupted step continues from its last.ckpt; one killed between its first best and last saves
    starts over, its lone best.ckpt set aside as best.interrupted.ckpt (a new fit refuses to overwrite it)."""
    best, last = _demo_checkpoints(name, runs_dir)
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


def _demo_checkpoints(name: str, runs_dir: str) -> tuple[str, str]:
    """The step's best.ckpt and last.ckpt paths (the configs' checkpoint file name, Lightning's last)."""
    ckpt_dir = os.path.join(runs_dir, name, "checkpoints")
    return os.path.join(ckpt_dir, "best.ckpt"), os.path.join(ckpt_dir, LAST)


def _demo_finished(name: str, runs_dir: str) -> str:
    """Mark the step done; returns its checkpoint."""
    Path(runs_dir, name, "demo-finished").touch()
    best, last = _demo_checkpoints(name, runs_dir)
    return best if os.path.isfile(best) else last


def _demo_stopped(name: str, log: str | None = None) -> SystemExit:
    where = f"its log: {log}" if log else "error above"
    return SystemExit(f"train.py demo: the {name!r} step stopped (configs/{name}.yaml; {where})")


def _demo_fit(name: str, runs_dir: str, minutes: float, seed: int, overrides: list[str]) -> str:
    """Train configs/<name>.yaml in this process unless done; returns the checkpoint."""
    args = _demo_fit_args(name, runs_dir, minutes, seed, overrides)
    if args is not None:
        try:
            with _only_argv0():  # LightningCLI warns when given args while sys.argv has the demo's own
                _cli(args)
        except SystemExit as e:  # a usage error, printed above with fit's usage line: say which step
            if e.code and e.code != 128 + signal.SIGTERM:
                raise _demo_stopped(name) from e
            raise
    return _demo_finished(name, runs_dir)


@contextlib.contextmanager
def _only_argv0():
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


def _side_by_side_helps(runs: int) -> bool:
    """Whether ``runs`` trainings at once beat one after the other: on a CPU (measured, docs/benchmarks.md) or
    with a GPU each; sharing one GPU is not measured."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count() >= runs
    return torch.get_num_threads() >= runs


def _demo_fit_together(steps: dict[str, list[str]], runs_dir: str, minutes: float, seed: int) -> dict[str, str]:
    """Train several configs at once, one child process each on an equal share of the CPU threads (and a GPU
    each when there are enough), showing each child's progress bar (tqdm, written to RUNS_DIR/NAME/demo.log)
    on a line of its own.

    Why: a detector step at batch 4 on a CPU is bound by per-operator overhead more than by arithmetic
    (Faster R-CNN steps as fast on one thread as on two, docs/benchmarks.md), so two detectors side by side
    take little longer than one."""
    import json
    import subprocess
    import threading

    import torch
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text

    threads = str(max(1, torch.get_num_threads() // len(steps)))
    # Unbuffered: a tqdm bar redraws after "\r", which a line-buffered log file would hold back.
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if torch.cuda.is_available() else []
    gpus = [g for g in gpus if g.strip()] or [str(k) for k in range(torch.cuda.device_count())]
    bars = ["--trainer.callbacks", json.dumps([TQDM_PROGRESS_BAR, LR_MONITOR])]  # a log file cannot show rich's
    children: dict[str, tuple[subprocess.Popen, str]] = {}
    # A SIGTERM/SIGHUP sent to this process alone must not leave the children training: stop them below.
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            handlers[sig] = signal.signal(sig, lambda number, frame: sys.exit(128 + number))
    try:
        for i, (name, overrides) in enumerate(steps.items()):
            args = _demo_fit_args(name, runs_dir, minutes, seed, [*overrides, *bars])
            if args is None:
                continue
            if len(gpus) >= len(steps):  # a GPU each; otherwise they share what there is
                env = {**env, "CUDA_VISIBLE_DEVICES": gpus[i]}
            log = os.path.join(runs_dir, name, "demo.log")
            os.makedirs(os.path.dirname(log), exist_ok=True)
            with open(log, "ab") as f:  # appended: a resumed step keeps the interrupted attempt's log
                child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env,
                                         stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
            children[name] = (child, log)

        def progress() -> Table:
            table = Table.grid(padding=(0, 2))
            for name, (child, log) in children.items():
                latest = (_last_lines(log, 1) or ["starting"])[0]
                state = {None: latest, 0: "done"}.get(child.poll(), f"stopped (exit {child.returncode})")
                # Text: a bar's "[00:20<00:40, ...]" is not rich markup; one line per run, however narrow
                table.add_row(name, Text(state, no_wrap=True, overflow="ellipsis"))
            return table

        if children:
            print(f"training {' and '.join(children)} side by side, {threads} CPU thread(s) each; logs: "
                  + ", ".join(log for _, log in children.values()))
            with Live(progress(), refresh_per_second=2) as live:
                while any(child.poll() is None for child, _ in children.values()):
                    time.sleep(0.5)
                    live.update(progress())
    except BaseException as e:  # Ctrl-C reached the children too: give Lightning time to stop them gracefully
        # Decided before stopping the others, which then exit with 128 + SIGTERM (or 1 after Ctrl-C).
        done = [name for name, (child, _) in children.items() if child.poll() == 0]
        for child, _ in children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=60 if isinstance(e, KeyboardInterrupt) else 0)
            if child.poll() is None:
                child.terminate()
                child.wait()
        for name in done:  # one that had finished before the interruption is kept
            _demo_finished(name, runs_dir)
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    failed = {name: log for name, (child, log) in children.items() if child.returncode}
    for log in failed.values():  # the error is in the log: show its end here
        print(f"\n--- end of {log} ---", *_last_lines(log, 15), sep="\n", file=sys.stderr)
    finished = {name: _demo_finished(name, runs_dir) for name in steps if name not in failed}  # kept for a re-run
    if failed:
        raise SystemExit("\n".join(str(_demo_stopped(name, log)) for name, log in failed.items()))
    return finished


def _last_lines(path: str, n: int) -> list[str]:
    """The last ``n`` lines of a log as a terminal shows them (a tqdm bar redraws itself after a carriage
    return; its cursor movements are dropped)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 16384))
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", f.read().decode(errors="replace"))
    shown = [next((part.rstrip() for part in reversed(line.split("\r")) if part.strip()), "")
             for line in text.split("\n")]  # fmt: skip
    return [line for line in shown if line][-n:]






def _summary(function) -> str:
    """The docstring's first paragraph, on one line (a --help description)."""
    return " ".join(function.__doc__.split("\n\n")[0].split())


def _parse_compare(argv: list[str]) -> dict:
    """compare's own parser: `--checkpoints A B` (nargs) and `--data X.yaml`, a DataModule config."""
    from lightning import LightningDataModule

    parser = ArgumentParser(prog="train.py compare", description=_summary(compare))
    parser.add_function_arguments(compare, skip={"checkpoints", "data"})
    parser.add_argument("--checkpoints", nargs="+", required=True, help="model files to compare")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True, help="required: a data config file "
                                  "(class_path + init_args, e.g. configs/data/shapes.yaml) or class path")
    return parser.instantiate(parser.parse_args(argv)).as_dict()  # builds the DataModule


def _run_extra(command: str, argv: list[str]):
    functions = {"evaluate": evaluate, "shapes": shapes, "demo": demo, "layers": layers}
    if command == "compare":
        return compare(**_parse_compare(argv))
    parser = ArgumentParser(prog=f"train.py {command}", description=_summary(functions[command]))
    # `layers` reads the classifier's own keys: `train.py layers --model.backbone resnet50`.
    nested = "model" if command == "layers" else None
    parser.add_function_arguments(functions[command], nested)
    cfg = parser.parse_args(argv).as_dict()
    return functions[command](**(cfg[nested] if nested else cfg))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in EXTRA_COMMANDS:
        _run_extra(args[0], args[1:])
        return
    _cli(argv)  # None: LightningCLI reads sys.argv itself (and does not warn about both)


if __name__ == "__main__":
    main()
