"""The command line of any litvision model family: LightningCLI with run folders, Keras-style callbacks, safe
resuming and usage errors, plus a runner for commands that are plain functions.

* Runs live in ``RUNS_DIR/NAME``: TensorBoard and CSV logs in ``version_N``, checkpoints in ``checkpoints/``.
* ``--ckpt_path last`` resumes from ``last.ckpt`` and fails when there is none; ``--ckpt_path auto`` resumes
  when there is one, else starts (a job script requeued after a preemption repeats its command).
* A new run refuses to overwrite another run's checkpoints.
* A checkpoint given to any subcommand rebuilds its model as saved, offline (no pretrained weights fetched).
* A :class:`training.errors.UsageError` is printed as its message alone; any other exception is a bug and
  keeps its traceback. Every split a subcommand uses is read before the Trainer starts, so a bad annotation
  file is refused before a run folder exists; a run stopped by a usage error before doing anything leaves none.
* SIGTERM stops a run gracefully and exits with status 143 (128 + SIGTERM), as a job script expects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
import signal
import sys
import types
import typing
from functools import reduce
from operator import or_
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from training.callbacks import ModelCheckpoint, ReduceLROnPlateau
from training.checkpoint_io import check_writable_folder, checkpoint_log_position, resolve_ckpt_path
from training.errors import FileTakenError, MissingFileError, usage_error_in, user_message
from training.loggers import ResumableCSVLogger
from training.saving import offline_model_config

PROG = "train.py"
LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION  # last.ckpt
# Every run's default callbacks besides the Keras-style ones (training.demo's background runs swap in tqdm's bar).
RICH_PROGRESS_BAR = {"class_path": "lightning.pytorch.callbacks.RichProgressBar"}
# refresh_rate explicit: replacing the rich bar from a config would carry over its refresh_rate of 100.
TQDM_PROGRESS_BAR = {"class_path": "lightning.pytorch.callbacks.TQDMProgressBar", "init_args": {"refresh_rate": 1}}
LR_MONITOR = {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
              "init_args": {"logging_interval": "epoch"}}  # fmt: skip


@contextlib.contextmanager
def usage_errors(parser: ArgumentParser):
    """Report a :class:`~training.errors.UsageError` raised inside (or wrapped as the cause of another error,
    as jsonargparse wraps errors raised while instantiating; or raised in a DataLoader worker, whose message
    torch replaces with the worker's traceback) with ``parser``'s usage line and its message alone; exit
    status 2. ``JSONARGPARSE_DEBUG=1`` shows the traceback. Other exceptions pass through."""
    try:
        yield
    except Exception as e:
        error = usage_error_in(e)
        if error is None:
            raise
        parser.error(user_message(error), ex=error)


def int_before_float(function: Any) -> None:
    """Put ``int`` before ``float`` in the ``Union`` annotations of ``function`` that hold both, as the
    Trainer's source writes them (``limit_train_batches: Optional[Union[int, float]]``).

    jsonargparse tries a union's types in order, so the order decides whether ``--trainer.limit_train_batches 1``
    means one batch (int) or 100% (float 1.0). typing caches unions and treats ``Union[int, float]`` and
    ``Union[float, int]`` as equal, so an annotation evaluated while another module's ``Optional[Union[float,
    int]]`` (Lightning Fabric has some) is in that cache comes out float-first, depending on import order.
    ``int | float`` (``types.UnionType``) is not cached, so it keeps the order given.
    """
    annotations = getattr(function, "__annotations__", {})
    for name, hint in list(annotations.items()):
        args = typing.get_args(hint)
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        if is_union and {int, float} <= set(args) and args.index(float) < args.index(int):
            annotations[name] = reduce(or_, sorted(args, key=lambda t: (t is not int, t is type(None))))


class TrainingCLI(LightningCLI):
    """LightningCLI with the Keras-style callbacks, TensorBoard + CSV logs in ``<runs_dir>/<name>/version_N``,
    a ``--ckpt_path last`` that fails instead of silently starting over, and ``--ckpt_path auto``: resume from
    last.ckpt when there is one, else start. A model family's subclass adds its own arguments and callbacks.

    ``commands``: the commands besides LightningCLI's that ``main`` runs, named in the usage line with them.
    """

    # What Lightning and LightningCLI write into a run's version_N folder (besides events.out.tfevents.*).
    LOG_FILES = ("hparams.yaml", "config.yaml", "metrics.csv")

    def __init__(self, *args, commands: dict[str, Command] | None = None, **kwargs) -> None:
        self.commands = dict(commands or {})
        self._new_log_dirs: list[str] = []  # the run's log folders that did not exist before it
        int_before_float(kwargs.get("trainer_class", Trainer).__init__)
        super().__init__(*args, **kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands and self.commands:
            # Set after the subcommands are added: argparse builds their prog from the usage in force then.
            ours = "{" + ",".join(self.subcommands()) + "}"
            usage = self.parser.format_usage().removeprefix("usage: ").strip().replace("%", "%%")
            self.parser.usage = usage.replace(ours, "{" + ",".join([*self.subcommands(), *self.commands]) + "}")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=str, default="litvision", help="run name: logs go to RUNS_DIR/NAME")
        parser.add_argument("--runs_dir", type=str, default="runs", help="directory holding all runs")
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

    def extra_callbacks(self) -> list:
        """Callbacks the subcommand needs besides the configured ones (``self.model`` is built); none here."""
        return []

    def _parse_ckpt_path(self) -> None:
        """As LightningCLI (the model is rebuilt as the checkpoint describes it), but offline: the saved
        weights replace pretrained ones, so ``weights: DEFAULT`` or a ``backbone_checkpoint`` recorded at
        training time is not fetched again, and unsafe or truncated files get litvision's clear errors."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if sub == "fit" and ckpt_path in ("last", "auto"):  # resolved here, so the model is rebuilt as saved too
            with usage_errors(self.parser):
                ckpt_path = self.config[sub]["ckpt_path"] = resolve_ckpt_path(ckpt_path, self._checkpoint_dir(sub))
        if not ckpt_path or not os.path.isfile(ckpt_path):
            return
        configured = (self.config[sub].get("model") or {}).get("class_path")
        with usage_errors(self.parser):  # the config's model class is the user's choice, not the file's
            model = offline_model_config(ckpt_path, trusted_modules=[configured] if configured else ())
        if model is not None:
            class_path, hparams = model
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
        with usage_errors(self.parser):
            if sub["trainer"].get("logger") is not False:  # the loggers make it once the Trainer runs
                check_writable_folder(self.run_dir(), "run folder (--runs_dir/--name)")
            if self.subcommand == "fit" and sub.get("ckpt_path"):
                sub["ckpt_path"] = resolve_ckpt_path(sub["ckpt_path"], ckpt_dir)
                here = os.path.realpath(os.path.dirname(os.path.abspath(sub["ckpt_path"])))  # a linked file stays here
                if here != os.path.realpath(ckpt_dir):
                    refuse_to_overwrite(sub["checkpoint"]["filepath"], resume_from=sub["ckpt_path"])
            elif self.subcommand == "fit" and not sub["trainer"].get("fast_dev_run"):  # it saves nothing
                refuse_to_overwrite(sub["checkpoint"]["filepath"])

    def instantiate_classes(self) -> None:
        with usage_errors(self.parser):
            super().instantiate_classes()

    def after_instantiate_classes(self) -> None:
        if self.plateau_disabled:  # keep `lr_plateau: null` in the config.yaml saved with the run
            self._sub()["lr_plateau"] = None
        super().after_instantiate_classes()

    def _instantiate_trainer(self, config: dict, callbacks: list):
        if self.plateau_disabled:
            callbacks = [c for c in callbacks if not isinstance(c, ReduceLROnPlateau)]
        callbacks = callbacks + self.extra_callbacks()
        if config.get("enable_progress_bar") is False:  # the default RichProgressBar would conflict
            config["callbacks"] = [c for c in config.get("callbacks") or [] if not isinstance(c, ProgressBar)]
        if config.get("logger") is False:  # nothing to log the LR to: Lightning would refuse the monitor
            config["callbacks"] = [c for c in config.get("callbacks") or [] if not isinstance(c, LearningRateMonitor)]
            # Without a logger there is no run folder, and Lightning would write config.yaml into the working
            # directory, replacing a user's own config.yaml there.
            self.save_config_callback = None
        sub = self._sub()
        ckpt = sub.get("ckpt_path") if self.subcommand == "fit" else None
        version, step = checkpoint_log_position(ckpt) if ckpt else (None, 0)  # a resumed run continues its version
        if config.get("logger") in (True, None):
            # TensorBoard hides the events a resumed run logs again (steps after the checkpoint, run before the
            # interruption) when told where it resumed: SummaryWriter's purge_step. The CSV logger drops them.
            tensorboard = {"purge_step": step} if version is not None else {}
            if version is None:
                version = TensorBoardLogger(sub["runs_dir"], sub["name"]).version
            folders = (os.path.join(sub["runs_dir"], sub["name"], f"version_{version}"),
                       os.path.join(sub["runs_dir"], sub["name"]), sub["runs_dir"])  # fmt: skip
            self._new_log_dirs = [d for d in folders if not os.path.exists(d)]
            config["logger"] = [
                TensorBoardLogger(sub["runs_dir"], sub["name"], version=version, **tensorboard),
                ResumableCSVLogger(sub["runs_dir"], sub["name"], version=version),
            ]
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        """LightningCLI's run, once the subcommand's data is read: a bad annotation file of any split is then a
        usage error before the Trainer starts and its loggers make a run folder. A usage error raised while the
        Trainer runs (an image a DataLoader cannot read) is reported the same way, and the run folder of a run
        that failed before doing anything (``remove_unused_log_dirs``) is removed."""
        with usage_errors(self.parser):
            self._read_data(subcommand)
        with usage_errors(self.parser):
            try:
                super()._run_subcommand(subcommand)
            except Exception as e:
                # Kept once a training step has run: its logs are the user's (the checkpoints may follow them).
                unused = subcommand != "fit" or self.trainer.global_step == 0
                if usage_error_in(e) is not None and unused and self.trainer.is_global_zero:  # the one that logs
                    remove_unused_log_dirs(self._new_log_dirs, self.LOG_FILES)
                raise

    def _read_data(self, subcommand: str) -> None:
        """Set the DataModule up for ``subcommand``'s stage before the Trainer runs. The Trainer's own
        ``setup`` call then finds the datasets made (a DataModule's ``setup`` keeps what it made, as
        DetectionDataModule's and the classifier's do), so nothing is read twice. Not where the run's other
        processes start beside this one (torchrun, SLURM, Lightning's own DDP children): there the data is
        prepared once, in Lightning's order, before any process sets it up; a bad file is still a usage error."""
        datamodule = self.datamodule
        environment = getattr(self.trainer.strategy, "cluster_environment", None)
        if datamodule is None or (environment is not None and environment.creates_processes_externally):
            return
        datamodule.prepare_data()
        datamodule.setup(subcommand)


def refuse_to_overwrite(filepath: str, resume_from: str | None = None) -> None:
    """A run must not replace another run's checkpoints (every version of RUNS_DIR/NAME shares checkpoints/):
    Keras' ModelCheckpoint would, and a forgotten ``--ckpt_path last`` would lose the trained model."""
    last = os.path.join(os.path.dirname(filepath), LAST)
    taken = [f for f in (filepath, last) if "{" not in os.path.basename(f) and os.path.exists(f)]
    if not taken:
        return
    held = f"{' and '.join(taken)} already hold{'s' * (len(taken) == 1)} an earlier run's model"
    elsewhere = "start a separate run with another --name (or --runs_dir), or move the files away"
    if resume_from:
        raise FileTakenError(f"{held}, which continuing {resume_from} here would overwrite: {elsewhere}")
    resume = "continue that run with --ckpt_path last, " if os.path.exists(last) else ""
    raise FileTakenError(f"{held}, which a new run would overwrite: {resume}{elsewhere}")


def remove_unused_log_dirs(folders: list[str], log_files: tuple[str, ...]) -> None:
    """Remove ``folders`` (a new run's version_N, then the folders above it that it created), which a run that
    failed before doing anything leaves with only its loggers' files: those files (``log_files`` and TensorBoard
    event files) are deleted, and each folder only if nothing else is in it."""
    if not folders:
        return
    version = folders[0]
    for name in os.listdir(version) if os.path.isdir(version) else []:
        path = os.path.join(version, name)
        if (name in log_files or name.startswith("events.out.tfevents.")) and os.path.isfile(path):
            os.remove(path)
    for folder in folders:
        with contextlib.suppress(OSError):  # missing, or holding something else: kept
            os.rmdir(folder)


# -- commands besides LightningCLI's -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Command:
    """A command that is a plain function: its signature gives the arguments, its docstring the ``--help``.

    function: ``"module:function"``, imported only when the command runs (``--help`` stays fast).
    summary: its line in the main ``--help``.
    nested: the arguments go under this key (``layers --model.backbone resnet50``: the config's own keys).
    several: list parameters that take several values (``--checkpoints A B``).
    classes: parameter -> ``"module:BaseClass"``: the value is a config file (class_path + init_args) or a
        class path, and the function receives the instance (``--data configs/data/shapes.yaml``).
    """

    function: str
    summary: str
    nested: str | None = None
    several: tuple[str, ...] = ()
    classes: dict[str, str] = dataclasses.field(default_factory=dict)


def _import(path: str) -> Any:
    """The object a ``"module:name"`` path names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _parameter_help(function) -> dict[str, str]:
    """Each parameter's description in the function's docstring (Google style, as jsonargparse reads it)."""
    import docstring_parser

    return {p.arg_name: p.description for p in docstring_parser.parse(function.__doc__ or "").params}


def command_parser(name: str, command: Command) -> tuple[ArgumentParser, Any]:
    """The parser of ``train.py NAME`` and the function it runs."""
    function = _import(command.function)
    description = " ".join((function.__doc__ or "").split("\n\n")[0].split())  # the first paragraph, one line
    parser = ArgumentParser(prog=f"{PROG} {name}", description=description)
    parser.add_function_arguments(function, command.nested, skip={*command.several, *command.classes})
    helps, parameters = _parameter_help(function), inspect.signature(function).parameters
    for param in command.several:
        required = parameters[param].default is inspect.Parameter.empty
        parser.add_argument(f"--{param}", nargs="+", required=required, help=helps.get(param))
    for param, base in command.classes.items():
        required = parameters[param].default is inspect.Parameter.empty  # a default (None): optional
        what = f"a {param} config file or class path ({base.partition(':')[2]})"
        parser.add_subclass_arguments(_import(base), param, required=required,
                                      help=f"{'required' if required else 'optional'}: {what}: {helps.get(param, '')}")
    return parser, function


def check_config_files(command: Command, argv: list[str]) -> None:
    """Refuse a class argument given as a config file that does not exist (``--data configs/data/shapez.yaml``):
    jsonargparse would take the name for a class path and report why no class of that name can be imported."""
    for flag, value in zip(argv, argv[1:], strict=False):
        param = flag.removeprefix("--")
        if param in command.classes and value.endswith((".yaml", ".yml", ".json")) and not os.path.isfile(value):
            raise MissingFileError(f"{value}: {param} config file not found")


def run_command(name: str, command: Command, argv: list[str]) -> Any:
    """Parse ``argv`` for the command, build its class arguments and call it; a UsageError it raises is
    reported as a usage error of ``train.py NAME``."""
    parser, function = command_parser(name, command)
    with usage_errors(parser):
        check_config_files(command, argv)
        config = parser.instantiate(parser.parse_args(argv)).as_dict()
        return function(**(config[command.nested] if command.nested else config))


def main(cli: type[TrainingCLI], commands: dict[str, Command], argv: list[str] | None = None) -> None:
    """Run ``train.py COMMAND ...``: one of ``commands``, else LightningCLI's subcommands through ``cli``.
    ``argv`` None: the command line (LightningCLI then reads sys.argv itself and does not warn about both)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in commands:
        run_command(args[0], commands[args[0]], args[1:])
        return
    epilog = ("more commands: " + "; ".join(f"{name}: {c.summary}" for name, c in commands.items())
              + f" (python {PROG} COMMAND --help)")  # fmt: skip
    try:
        # allow_abbrev: argparse would take a typo'd --trainer.max_step for --trainer.max_steps.
        cli(args=argv, save_config_kwargs={"overwrite": True}, parser_kwargs={"allow_abbrev": False, "epilog": epilog},
            commands=commands)
    except SIGTERMException as e:
        # Lightning stops gracefully on SIGTERM, then exits with status 0, as if the run had finished: a job
        # script, a scheduler or the side-by-side demo would take the interrupted run for a complete one.
        raise SystemExit(128 + signal.SIGTERM) from e
