"""training.cli through train.py on tiny data: run folders, resuming, the overwrite refusal, offline rebuilds,
usage errors, SIGTERM, and the runner of the commands that are plain functions. train.main runs in this
process; only the SIGTERM test starts train.py as a process of its own (a signal to a separate interpreter)."""

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from training.cli import Command, refuse_to_overwrite, remove_unused_log_dirs, run_command, usage_errors
from training.errors import BadValueError, UsageError

REPO = Path(__file__).resolve().parents[2]


def tiny_fit_args(shapes_dir, runs):
    return [
        "fit", "--config", REPO / "configs" / "faster_rcnn.yaml", "--runs_dir", runs,
        "--data.init_args.root", shapes_dir, "--data.init_args.generate", "false",
        "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
        "--model.init_args.min_size", "64", "--model.init_args.max_size", "64",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1", "--checkpoint.verbose", "1",
    ]  # fmt: skip


def fit(train_py, *args) -> str:
    """train.py ARGS, which must succeed; its stdout."""
    code, out, err = train_py(*args)
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    return out


def test_fit_resume_validate(shapes_dir, tmp_path, train_py, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.chdir(tmp_path)
    # --ckpt_path last with nothing to resume is an error, not a silent fresh start. litvision's own refusals are
    # usage errors, the message alone (train_py fails on any other exception: a traceback).
    code, _, err = train_py(*tiny_fit_args(shapes_dir, runs), "--ckpt_path", "last")
    assert code != 0 and "no last checkpoint to resume from" in err
    code, _, err = train_py(*tiny_fit_args(shapes_dir, runs), "--model.init_args.backbone", "mobilenet_v3_larg_fpn")
    assert code == 2 and "error: unknown detector variant 'fasterrcnn_mobilenet_v3_larg_fpn'" in err

    out = fit(train_py, *tiny_fit_args(shapes_dir, runs), "--trainer.max_epochs", "1")
    assert "Epoch 1: val_loss improved from inf to" in out  # Keras' message, 1-based epoch
    ckpts = runs / "faster_rcnn" / "checkpoints"
    assert (ckpts / "best.ckpt").is_file() and (ckpts / "last.ckpt").is_file()
    version = runs / "faster_rcnn" / "version_0"
    rows = list(csv.DictReader((version / "metrics.csv").open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train_loss_step", "val_loss", "val_map", "val_map_50", "val_ap/triangle"} <= logged
    # The config's backbone_lr_scale gives the body its own, named parameter group.
    assert {"lr-AdamW/backbone", "lr-AdamW/heads"} <= logged
    assert not any(k.startswith("lr-AdamW-") for k in logged)  # one optimiser, not one name per scheduler
    lrs = [(float(r["lr-AdamW/backbone"]), float(r["lr-AdamW/heads"])) for r in rows if r["lr-AdamW/heads"]]
    assert lrs and all(b == pytest.approx(0.3 * h) for b, h in lrs)
    assert any(p.name.startswith("events.out.tfevents") for p in version.iterdir())

    # A new run (no --ckpt_path) would overwrite them: refused, naming them, nothing touched.
    saved = {f: (ckpts / f).read_bytes() for f in ("best.ckpt", "last.ckpt")}
    code, _, err = train_py(*tiny_fit_args(shapes_dir, runs), "--trainer.max_epochs", "1")
    assert code != 0 and "best.ckpt and " in err and "--ckpt_path last" in err
    assert saved == {f: (ckpts / f).read_bytes() for f in saved}
    assert not (runs / "faster_rcnn" / "version_1").exists()

    out = fit(train_py, *tiny_fit_args(shapes_dir, runs), "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert "Epoch 2:" in out
    assert not (runs / "faster_rcnn" / "version_1").exists()  # the resumed run keeps its logger version
    epochs = {r["epoch"] for r in csv.DictReader((version / "metrics.csv").open())} - {""}  # "": LR rows
    assert epochs == {"0", "1"}

    out = fit(train_py, "validate", "--config", REPO / "configs" / "faster_rcnn.yaml", "--runs_dir", runs,
              "--data.init_args.root", shapes_dir, "--data.init_args.num_workers", "0",
              "--trainer.limit_val_batches", "1", "--ckpt_path", ckpts / "best.ckpt")  # fmt: skip
    assert "val_map" in out
    # A checkpoint of another model type than the config's is refused, not silently swapped in.
    code, _, err = train_py("validate", "--config", REPO / "configs" / "retinanet.yaml", "--runs_dir", runs,
                            "--data.init_args.root", shapes_dir, "--ckpt_path", ckpts / "best.ckpt")  # fmt: skip
    assert code != 0 and "holds a FasterRCNNModule but the config's model is RetinaNetModule" in err


def test_resumed_run_logs_each_step_once_in_tensorboard_and_csv(shapes_dir, tmp_path, train_py, monkeypatch):
    """Resuming from an earlier checkpoint runs its later steps again: TensorBoard and the CSV show them once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    every_epoch = ["--checkpoint.filepath", "e{epoch}.ckpt", "--checkpoint.save_best_only", "false"]
    fit(train_py, *tiny_fit_args(shapes_dir, runs), *every_epoch, "--trainer.max_epochs", "2")
    ckpts = runs / "faster_rcnn" / "checkpoints"
    fit(train_py, *tiny_fit_args(shapes_dir, runs), *every_epoch, "--trainer.max_epochs", "2",
        "--ckpt_path", ckpts / "e1.ckpt")  # fmt: skip
    version = runs / "faster_rcnn" / "version_0"
    assert len(list(version.glob("events.out.tfevents*"))) == 2  # the resumed run wrote to the same version
    events = EventAccumulator(str(version))
    events.Reload()
    steps = [e.step for e in events.Scalars("train_loss_step")]
    assert steps == [0, 1, 2, 3]  # steps 2 and 3 ran twice
    assert [e.step for e in events.Scalars("val_loss")] == [1, 3]
    rows = [r for r in csv.DictReader((version / "metrics.csv").open()) if r["train_loss_step"]]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]


def test_ckpt_path_auto_starts_then_resumes_with_one_command(shapes_dir, tmp_path, train_py, monkeypatch):
    """A requeued job repeats its command: the first start finds nothing, the second resumes. The resumed model is
    the checkpoint's, not the config's (here told to use a box head of another width)."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    command = [*tiny_fit_args(shapes_dir, runs), "--ckpt_path", "auto"]
    first = fit(train_py, *command, "--trainer.max_epochs", "1")
    assert "Epoch 1: val_loss improved from inf" in first
    second = fit(train_py, *command, "--trainer.max_epochs", "2", "--model.init_args.box_representation_size", "128")
    assert "Epoch 2:" in second and "Epoch 1:" not in second
    version = runs / "faster_rcnn" / "version_0"
    assert {r["epoch"] for r in csv.DictReader((version / "metrics.csv").open())} - {""} == {"0", "1"}
    assert not (runs / "faster_rcnn" / "version_1").exists()
    hparams = torch.load(runs / "faster_rcnn" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["box_representation_size"] == 256  # configs/faster_rcnn.yaml's, kept from the checkpoint


def test_a_run_stopped_by_sigterm_exits_143_and_resumes_from_that_step(tmp_path, train_py, monkeypatch):
    """Lightning stops gracefully on SIGTERM but would exit 0 (a job script must see 128 + SIGTERM) and would keep
    only the last epoch end's last.ckpt: the step it stopped at is saved, and the resumed run finishes the epoch."""
    from detectors.data.shapes import generate_shapes

    shapes_dir = tmp_path / "shapes"  # an epoch of 60 one-image steps: the signal lands inside it
    generate_shapes(shapes_dir, num_train=60, num_val=4, image_size=(160, 160), seed=0, voc=False,
                    classification=False)  # fmt: skip
    runs = tmp_path / "runs"
    bar = ["--trainer.enable_progress_bar", "true", "--trainer.callbacks",
           json.dumps([{"class_path": "lightning.pytorch.callbacks.TQDMProgressBar"}])]  # fmt: skip
    args = [*tiny_fit_args(shapes_dir, runs), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "60",
            "--data.init_args.batch_size", "1", *bar]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    log_path = tmp_path / "log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:  # a few batches in: Lightning's handler set
                if any(int(n) >= 3 for n in re.findall(r"\| *(\d+)/60", log_path.read_text(errors="replace"))):
                    break
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log_path.read_text()[-3000:]
        finally:
            proc.kill()
    assert "Traceback" not in log_path.read_text()
    ckpts = runs / "faster_rcnn" / "checkpoints"
    assert not (ckpts / "best.ckpt").exists()  # the Keras file: only an epoch end's monitor value writes it
    stopped_at = torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]
    assert 3 <= stopped_at < 60
    monkeypatch.chdir(tmp_path)
    fit(train_py, *args, "--ckpt_path", "last")
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 60  # the epoch, finished
    assert (ckpts / "best.ckpt").exists()


@pytest.mark.parametrize("config", ["faster_rcnn", "retinanet"])
def test_mixed_precision_is_a_trainer_flag(config, shapes_dir, tmp_path, train_py, monkeypatch, caplog):
    # What a GPU run passes (--trainer.precision bf16-mixed), here on the CPU, where Lightning autocasts
    # to bfloat16 the same way: no code change, finite losses, metrics computed.
    monkeypatch.chdir(tmp_path)
    args = tiny_fit_args(shapes_dir, tmp_path / "runs")
    args[2] = REPO / "configs" / f"{config}.yaml"
    code, out, err = train_py(*args, "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed")
    assert code == 0, err[-3000:]
    assert "Using bfloat16 Automatic Mixed Precision" in out + err + caplog.text
    rows = list(csv.DictReader((tmp_path / "runs" / config / "version_0" / "metrics.csv").open()))
    losses = [float(r["train_loss_step"]) for r in rows if r.get("train_loss_step")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert [float(r["val_map_50"]) for r in rows if r.get("val_map_50")]  # mAP computed under autocast


def test_validate_rebuilds_a_pretrained_checkpoint_offline(shapes_dir, tmp_path, monkeypatch):
    """--ckpt_path re-reads the model config from the checkpoint; the pretrained-weights file it was built
    from is gone (or offline), and the saved weights must be enough."""
    from detectors.models import build_detector
    from detectors.module import FasterRCNNModule
    from train import LitvisionCLI
    from training.saving import save_model

    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "coco_like.pth"
    torch.save(build_detector("fasterrcnn", "resnet18_fpn", num_classes=91, min_size=64, max_size=64).state_dict(),
               weights)  # fmt: skip
    module = FasterRCNNModule(class_names=["rectangle", "ellipse", "triangle"], backbone="resnet18_fpn",
                              weights_path=str(weights), min_size=64, max_size=64)  # fmt: skip
    ckpt = tmp_path / "model.ckpt"
    save_model(module, ckpt)
    weights.unlink()
    cli = LitvisionCLI(args=["validate", "--config", str(REPO / "configs" / "faster_rcnn.yaml"),
                             "--data.init_args.root", str(shapes_dir), "--data.init_args.num_workers", "0",
                             "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                             "--ckpt_path", str(ckpt)])  # fmt: skip
    assert cli.model.hparams["weights_path"] is None and cli.model.hparams["pretrained_layout"]
    assert cli.model.hparams["backbone"] == "resnet18_fpn"  # the checkpoint's architecture, not the config's
    assert "val_map" in cli.trainer.callback_metrics


def test_overwrite_refusal_names_a_way_out_that_works(tmp_path):
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    refuse_to_overwrite(str(best))  # nothing there yet
    best.write_bytes(b"a run's model")
    with pytest.raises(FileExistsError) as info:  # no last.ckpt: "--ckpt_path last" would fail, not offered
        refuse_to_overwrite(str(best))
    assert isinstance(info.value, UsageError)
    assert "--ckpt_path last" not in str(info.value) and "--name" in str(info.value)
    last.write_bytes(b"its full state")
    with pytest.raises(FileExistsError, match="best.ckpt and .*last.ckpt .*--ckpt_path last"):
        refuse_to_overwrite(str(best))
    with pytest.raises(FileExistsError, match="continuing /elsewhere/last.ckpt here would overwrite"):
        refuse_to_overwrite(str(best), resume_from="/elsewhere/last.ckpt")
    with pytest.raises(FileExistsError, match="last.ckpt already holds"):  # a template: only last.ckpt is known
        refuse_to_overwrite(str(tmp_path / "w-{epoch}.ckpt"))
    assert best.read_bytes() == b"a run's model"


def test_only_usage_errors_are_reported_as_usage_errors(capsys):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="train.py fit")
    with pytest.raises(SystemExit) as refused, usage_errors(parser):  # an explicit check of a configuration value
        raise BadValueError("unknown detector variant 'x'")
    assert refused.value.code == 2 and "error: unknown detector variant 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as wrapped, usage_errors(parser):  # wrapped the way jsonargparse wraps it
        try:
            raise BadValueError("unknown detector variant 'y'")
        except ValueError as e:
            raise ValueError("Does not validate against any of the Union subtypes") from e
    err = capsys.readouterr().err
    assert wrapped.value.code == 2 and "error: unknown detector variant 'y'" in err and "Union" not in err
    with pytest.raises(ValueError, match="too many values"), usage_errors(parser):  # a bug: keeps its traceback
        _a, _b = (1, 2, 3)
    with pytest.raises(ValueError, match="invalid literal"), usage_errors(parser):  # raised by another library
        int("abc")
    with pytest.raises(ValueError, match="handling"), usage_errors(parser):  # a bug while handling a usage error
        try:
            raise BadValueError("refused")
        except ValueError:
            raise ValueError("a bug while handling it") from None


def refusing_command(value: int = 0) -> int:
    """A command for the tests: refuses a negative value, fails like a bug on 1, returns the value.

    Args:
        value: the value.
    """
    if value < 0:
        raise BadValueError(f"value must be >= 0, got {value}")
    if value == 1:
        raise ValueError("a bug")
    return value


def test_a_commands_usage_error_is_one_line_with_its_prog_and_a_bug_keeps_its_traceback(capsys):
    command = Command(f"{__name__}:refusing_command", "a command for the tests")
    assert run_command("refuse", command, ["--value", "3"]) == 3
    with pytest.raises(SystemExit) as refused:
        run_command("refuse", command, ["--value", "-2"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "usage: train.py refuse" in err and "error: value must be >= 0, got -2" in err
    with pytest.raises(ValueError, match="a bug"):
        run_command("refuse", command, ["--value", "1"])


def test_a_bad_train_annotation_file_is_refused_before_a_run_folder_exists(shapes_dir, tmp_path, train_py,
                                                                           monkeypatch):  # fmt: skip
    """The train split is read before the Trainer starts, as the val split is (it gives the model its classes)."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    annotations = data / "annotations" / "instances_train.json"
    coco = json.loads(annotations.read_text())
    coco["annotations"][0]["category_id"] = 99
    annotations.write_text(json.dumps(coco))
    code, out, err = train_py(*tiny_fit_args(data, tmp_path / "runs"), "--trainer.max_epochs", "1")
    assert code == 2 and "Traceback" not in out + err
    assert f"error: {annotations}: annotation id {coco['annotations'][0]['id']}: category_id 99 is not declared" in err
    assert not (tmp_path / "runs").exists()


def test_a_run_stopped_after_a_training_step_keeps_its_logs(shapes_dir, tmp_path, train_py, monkeypatch):
    """A bad validation image found after the first training step: a usage error, and the step's logs stay. Each
    split was read once, though the CLI sets the data up before the Trainer does."""
    from detectors.data import DetectionDataModule

    reads = []
    make_dataset = DetectionDataModule.make_dataset
    monkeypatch.setattr(DetectionDataModule, "make_dataset", lambda dm, split, train: reads.append(split) or
                        make_dataset(dm, split, train))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    image = data / "images" / "val" / json.loads((data / "annotations" / "instances_val.json").read_text())[
        "images"][0]["file_name"]  # fmt: skip
    image.write_bytes(b"")
    runs = tmp_path / "runs"
    code, out, err = train_py(*tiny_fit_args(data, runs), "--trainer.max_epochs", "1",
                              "--trainer.limit_train_batches", "1", "--trainer.num_sanity_val_steps", "0")  # fmt: skip
    assert code == 2 and "Traceback" not in out + err
    assert f"error: {image}: not a readable image" in err
    assert sorted(reads) == ["train", "val"]
    rows = list(csv.DictReader((runs / "faster_rcnn" / "version_0" / "metrics.csv").open()))
    assert [r["step"] for r in rows if r.get("train_loss_step")] == ["0"]


def test_only_the_loggers_files_of_an_unused_run_folder_are_removed(tmp_path):
    runs = tmp_path / "runs"
    version = runs / "name" / "version_0"
    version.mkdir(parents=True)
    for name in ("hparams.yaml", "config.yaml", "metrics.csv", "events.out.tfevents.1.host.2.0"):
        (version / name).write_text("x")
    folders = [str(version), str(runs / "name"), str(runs)]
    remove_unused_log_dirs(folders, ("hparams.yaml", "config.yaml", "metrics.csv"))
    assert not runs.exists()
    version.mkdir(parents=True)
    (version / "hparams.yaml").write_text("x")
    (version / "notes.txt").write_text("a user's file")
    (runs / "name" / "checkpoints").mkdir()
    remove_unused_log_dirs([str(version)], ("hparams.yaml",))
    assert sorted(p.name for p in version.iterdir()) == ["notes.txt"]
    assert (runs / "name" / "checkpoints").is_dir()


def test_an_int_limit_is_a_number_of_batches_whatever_order_typing_cached_the_union(shapes_dir, tmp_path, monkeypatch):
    """``--trainer.limit_train_batches 1`` is one batch, not 100%, even when the Trainer's annotation was
    evaluated float-first (typing's union cache; the import order decides it)."""
    from lightning import Trainer

    from train import LitvisionCLI

    float_first = typing.Union[float, int, None]  # noqa: UP007 (a cache entry of its own: float first)
    assert typing.get_args(float_first)[0] is float
    for name in ("limit_train_batches", "limit_val_batches"):
        monkeypatch.setitem(Trainer.__init__.__annotations__, name, float_first)
    monkeypatch.chdir(tmp_path)
    args = [str(a) for a in tiny_fit_args(shapes_dir, tmp_path / "runs")[1:]]
    cli = LitvisionCLI(args=[*args, "--trainer.limit_train_batches", "1"], run=False)
    assert cli.trainer.limit_train_batches == 1 and isinstance(cli.trainer.limit_train_batches, int)
    assert cli.trainer.limit_val_batches == 1 and isinstance(cli.trainer.limit_val_batches, int)


def test_a_run_without_a_logger_leaves_the_working_directorys_config_yaml_alone(shapes_dir, tmp_path, train_py,
                                                                               monkeypatch):
    """``--trainer.logger false``: no run folder, so no config.yaml is saved; Lightning would write it into the
    working directory, over a user's own config.yaml there."""
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "config.yaml"
    mine.write_text("# the user's own config\n")
    args = tiny_fit_args(shapes_dir, tmp_path / "runs")
    code, out, err = train_py("validate", *args[1:], "--trainer.logger", "false")
    assert code == 0, err[-2000:]
    assert mine.read_text() == "# the user's own config\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
