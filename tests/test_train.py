"""train.py end to end on tiny data (in subprocesses, as a user runs it; in-process where no Trainer is built or
the command is refused before training): help, fit, resume, validate, evaluate, layers, shapes."""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COCO100 = Path(os.environ.get("LITVISION_COCO100", REPO.parent / "shared" / "data" / "coco-val2014-100"))


def run(*args, cwd, check=True):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_here(capsys, *args) -> tuple[int, str, str]:
    """``train.main`` in this process: (exit status, stdout, stderr). For commands refused before any training,
    where an interpreter start-up (~10 s here) would be most of the test. An exception other than SystemExit
    propagates: what a user would see as a traceback fails the test."""
    from train import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_subcommands_and_extra_commands(tmp_path, capsys):
    out = run("--help", cwd=tmp_path).stdout
    for word in ("fit", "validate", "test", "predict", "evaluate", "compare", "layers", "shapes", "demo"):
        assert word in out
    # A typo'd key is an error, even a prefix of a real one (argparse would take it for max_steps).
    code, _, err = run_here(capsys, "fit", "--config", REPO / "configs" / "faster_rcnn.yaml", "--trainer.max_step", "5",
                            "--print_config")  # fmt: skip
    assert code != 0 and "unrecognized arguments: --trainer.max_step" in err


def tiny_fit_args(shapes_dir, runs):
    return [
        "fit", "--config", REPO / "configs" / "faster_rcnn.yaml", "--runs_dir", runs,
        "--data.init_args.root", shapes_dir, "--data.init_args.generate", "false",
        "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
        "--model.init_args.min_size", "64", "--model.init_args.max_size", "64",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1", "--checkpoint.verbose", "1",
    ]  # fmt: skip


def test_fit_resume_validate(shapes_dir, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.chdir(tmp_path)
    # --ckpt_path last with nothing to resume is an error, not a silent fresh start. litvision's own refusals are
    # usage errors, the message alone (run_here fails on any other exception: a traceback).
    code, _, err = run_here(capsys, *tiny_fit_args(shapes_dir, runs), "--ckpt_path", "last")
    assert code != 0 and "no last checkpoint to resume from" in err
    code, _, err = run_here(capsys, *tiny_fit_args(shapes_dir, runs), "--model.init_args.backbone", "mobilenet_v3_larg_fpn")
    assert code == 2 and "error: unknown detector variant 'fasterrcnn_mobilenet_v3_larg_fpn'" in err

    proc = run(*tiny_fit_args(shapes_dir, runs), "--trainer.max_epochs", "1", cwd=tmp_path)
    assert "Epoch 1: val_loss improved from inf to" in proc.stdout  # Keras' message, 1-based epoch
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
    code, _, err = run_here(capsys, *tiny_fit_args(shapes_dir, runs), "--trainer.max_epochs", "1")
    assert code != 0 and "best.ckpt and " in err and "--ckpt_path last" in err
    assert saved == {f: (ckpts / f).read_bytes() for f in saved}
    assert not (runs / "faster_rcnn" / "version_1").exists()

    proc = run(*tiny_fit_args(shapes_dir, runs), "--trainer.max_epochs", "2", "--ckpt_path", "last", cwd=tmp_path)
    assert "Epoch 2:" in proc.stdout
    assert not (runs / "faster_rcnn" / "version_1").exists()  # the resumed run keeps its logger version
    epochs = {r["epoch"] for r in csv.DictReader((version / "metrics.csv").open())} - {""}  # "": LR rows
    assert epochs == {"0", "1"}

    proc = run("validate", "--config", REPO / "configs" / "faster_rcnn.yaml", "--runs_dir", runs,
               "--data.init_args.root", shapes_dir, "--data.init_args.num_workers", "0",
               "--trainer.limit_val_batches", "1", "--ckpt_path", ckpts / "best.ckpt", cwd=tmp_path)  # fmt: skip
    assert "val_map" in proc.stdout
    # A checkpoint of another model type than the config's is refused, not silently swapped in.
    code, _, err = run_here(capsys, "validate", "--config", REPO / "configs" / "retinanet.yaml", "--runs_dir", runs,
                            "--data.init_args.root", shapes_dir, "--ckpt_path", ckpts / "best.ckpt")  # fmt: skip
    assert code != 0 and "holds a FasterRCNNModule but the config's model is RetinaNetModule" in err


def test_resumed_run_logs_each_step_once_in_tensorboard_and_csv(shapes_dir, tmp_path):
    """Resuming from an earlier checkpoint runs its later steps again: TensorBoard and the CSV show them once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tmp_path / "runs"
    every_epoch = ["--checkpoint.filepath", "e{epoch}.ckpt", "--checkpoint.save_best_only", "false"]
    run(*tiny_fit_args(shapes_dir, runs), *every_epoch, "--trainer.max_epochs", "2", cwd=tmp_path)
    ckpts = runs / "faster_rcnn" / "checkpoints"
    run(*tiny_fit_args(shapes_dir, runs), *every_epoch, "--trainer.max_epochs", "2", "--ckpt_path", ckpts / "e1.ckpt",
        cwd=tmp_path)  # fmt: skip
    version = runs / "faster_rcnn" / "version_0"
    assert len(list(version.glob("events.out.tfevents*"))) == 2  # the resumed run wrote to the same version
    events = EventAccumulator(str(version))
    events.Reload()
    steps = [e.step for e in events.Scalars("train_loss_step")]
    assert steps == [0, 1, 2, 3]  # steps 2 and 3 ran twice
    assert [e.step for e in events.Scalars("val_loss")] == [1, 3]
    rows = [r for r in csv.DictReader((version / "metrics.csv").open()) if r["train_loss_step"]]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]


def test_ckpt_path_auto_starts_then_resumes_with_one_command(shapes_dir, tmp_path):
    """A requeued job repeats its command: the first start finds nothing, the second resumes. The resumed model is
    the checkpoint's, not the config's (here told to use a box head of another width)."""
    runs = tmp_path / "runs"
    command = [*tiny_fit_args(shapes_dir, runs), "--ckpt_path", "auto"]
    first = run(*command, "--trainer.max_epochs", "1", cwd=tmp_path)
    assert "Epoch 1: val_loss improved from inf" in first.stdout
    second = run(*command, "--trainer.max_epochs", "2", "--model.init_args.box_representation_size", "128",
                 cwd=tmp_path)  # fmt: skip
    assert "Epoch 2:" in second.stdout and "Epoch 1:" not in second.stdout
    version = runs / "faster_rcnn" / "version_0"
    assert {r["epoch"] for r in csv.DictReader((version / "metrics.csv").open())} - {""} == {"0", "1"}
    assert not (runs / "faster_rcnn" / "version_1").exists()
    hparams = torch.load(runs / "faster_rcnn" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["box_representation_size"] == 256  # configs/faster_rcnn.yaml's, kept from the checkpoint


def test_a_run_stopped_by_sigterm_exits_143_and_resumes_from_that_step(tmp_path):
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
    run(*args, "--ckpt_path", "last", cwd=tmp_path)
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 60  # the epoch, finished
    assert (ckpts / "best.ckpt").exists()


@pytest.mark.parametrize("config", ["faster_rcnn", "retinanet"])
def test_mixed_precision_is_a_trainer_flag(config, shapes_dir, tmp_path):
    # What a GPU run passes (--trainer.precision bf16-mixed), here on the CPU, where Lightning autocasts
    # to bfloat16 the same way: no code change, finite losses, metrics computed.
    args = tiny_fit_args(shapes_dir, tmp_path / "runs")
    args[2] = REPO / "configs" / f"{config}.yaml"
    proc = run(*args, "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed", cwd=tmp_path)
    assert "Using bfloat16 Automatic Mixed Precision" in proc.stdout + proc.stderr
    rows = list(csv.DictReader((tmp_path / "runs" / config / "version_0" / "metrics.csv").open()))
    losses = [float(r["train_loss_step"]) for r in rows if r.get("train_loss_step")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert [float(r["val_map_50"]) for r in rows if r.get("val_map_50")]  # mAP computed under autocast


@pytest.mark.skipif(not COCO100.is_dir(), reason="shared COCO subset not available")
def test_evaluate_matches_pycocotools(tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dt = COCO100 / "instances_val2014_100.json", COCO100 / "instances_val2014_fakebbox100_results.json"
    out = tmp_path / "metrics.json"
    proc = run("evaluate", "--gt", gt, "--predictions", dt, "--out", out, cwd=tmp_path)
    assert "map" in proc.stdout
    metrics = json.loads(out.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(dt)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
            "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]  # fmt: skip
    for key, expected in zip(keys, ev.stats, strict=True):
        assert metrics[key] == pytest.approx(expected, abs=1e-6), key


@pytest.mark.parametrize(("command", "words"), [
    ("compare", ["--checkpoints", "required: a data config file", "--resamples", "--seed"]),
    ("evaluate", ["--gt", "--predictions", "--out"]),
    ("layers", ["--model.backbone", "--model.freeze"]),
    ("shapes", ["--out", "--num_train", "--voc"]),
    ("demo", ["--out", "--detectors_together"]),
])
def test_extra_commands_explain_their_arguments(command, words, capsys):
    from train import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: train.py {command}")
    for word in words:
        assert word in out, word


def test_layers_and_shapes_commands(tmp_path, capsys):
    # In this process (train.main, as the console script calls it): these commands build no Trainer, and three
    # interpreter start-ups cost ~25 s of the suite.
    from train import main

    main(["layers", "--model.backbone", "mobilenet_v3_small", "--model.freeze", "3"])
    out = capsys.readouterr().out
    assert "features.0.0" not in out and "0.0" in out and "freeze=N freezes indices 0..N-1" in out
    main(["shapes", "--out", str(tmp_path / "s"), "--num_train", "4", "--num_val", "4", "--height", "160",
          "--width", "160", "--voc", "false", "--classification", "false"])  # fmt: skip
    assert (tmp_path / "s" / "annotations" / "instances_val.json").is_file()
    assert not (tmp_path / "s" / "voc").exists()
    # A demo directory whose dataset has other parameters (an older default) is refused, saying what to do.
    (tmp_path / "demo").mkdir()
    os.replace(tmp_path / "s", tmp_path / "demo" / "shapes")
    with pytest.raises(FileExistsError, match="delete .* or choose another --out"):
        main(["demo", "--out", str(tmp_path / "demo")])
    assert not (tmp_path / "demo" / "runs").exists()  # refused before any training


def test_validate_rebuilds_a_pretrained_checkpoint_offline(shapes_dir, tmp_path, monkeypatch):
    """--ckpt_path re-reads the model config from the checkpoint; the pretrained-weights file it was built
    from is gone (or offline), and the saved weights must be enough."""
    import torch

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
    from train import _refuse_to_overwrite

    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    _refuse_to_overwrite(str(best))  # nothing there yet
    best.write_bytes(b"a run's model")
    with pytest.raises(FileExistsError) as info:  # no last.ckpt: "--ckpt_path last" would fail, not offered
        _refuse_to_overwrite(str(best))
    assert "--ckpt_path last" not in str(info.value) and "--name" in str(info.value)
    last.write_bytes(b"its full state")
    with pytest.raises(FileExistsError, match="best.ckpt and .*last.ckpt .*--ckpt_path last"):
        _refuse_to_overwrite(str(best))
    with pytest.raises(FileExistsError, match="continuing /elsewhere/last.ckpt here would overwrite"):
        _refuse_to_overwrite(str(best), resume_from="/elsewhere/last.ckpt")
    with pytest.raises(FileExistsError, match="last.ckpt already holds"):  # a template: only last.ckpt is known
        _refuse_to_overwrite(str(tmp_path / "w-{epoch}.ckpt"))
    assert best.read_bytes() == b"a run's model"


def test_only_litvisions_own_raise_statements_become_usage_errors():
    from detectors.models import build_detector
    from train import _own_check

    with pytest.raises(ValueError) as refused:  # an explicit check of a configuration value
        build_detector("fasterrcnn", "no_such_backbone", num_classes=2)
    assert _own_check(refused.value) is refused.value
    try:  # the same refusal, wrapped the way jsonargparse wraps it
        raise ValueError("Does not validate against any of the Union subtypes") from refused.value
    except ValueError as wrapped:
        assert _own_check(wrapped) is refused.value
    with pytest.raises(ValueError) as bug:  # a bug in litvision's code, not a raise statement: keeps its traceback
        exec(compile("a, b = (1, 2, 3)", str(REPO / "detectors" / "models.py"), "exec"))
    assert _own_check(bug.value) is None
    with pytest.raises(ValueError) as foreign:  # raised by another library
        int("abc")
    assert _own_check(foreign.value) is None
