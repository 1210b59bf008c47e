"""Resuming the shipped configs: a run interrupted after an epoch-end last.ckpt and resumed with ``--ckpt_path
last`` ends bit-identical to the run that was never interrupted (CPU): weights, optimiser, schedulers, callback
state, loop state. The detector configs' schedule (warm-up and cosine decay) is the case that differed.

The tests stop ``train.main`` in this process with an exception raised by a callback at an epoch's start, which
leaves what a kill there leaves (litvision writes last.ckpt on exceptions only for SIGTERM). Real kills (SIGKILL
and SIGTERM at 13 points of each config's run, inside checkpoint writes included) are tests/faults/test_kills.py,
which uses this module's harness.
"""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """What StopAt raises: the run stops there, as if killed."""


class StopAt(Callback):
    """Stops the run at the start of training epoch ``epoch`` (0-based): raises :class:`Interrupted`."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted


def fit_args(config: str, shapes_dir, runs, epochs: int, val_batches: int = 1) -> list[str]:
    """A shipped config shrunk in size only: 64-px detector inputs (32-px crops for the classifiers), 2 steps of 2
    images an epoch, no backbone checkpoint."""
    if config in ("classifier", "pretrain"):
        data = ["--data.init_args.root", shapes_dir / "classification" / "train", "--data.init_args.val_root",
                shapes_dir / "classification" / "val", "--data.init_args.image_size", "[32, 32]"]  # fmt: skip
    else:
        data = ["--data.init_args.root", shapes_dir, "--data.init_args.generate", "false",
                "--model.init_args.min_size", "64", "--model.init_args.max_size", "64"]  # fmt: skip
    return [str(a) for a in [
        "fit", "--config", REPO / "configs" / f"{config}.yaml", "--runs_dir", runs, *data,
        "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
        "--model.init_args.backbone_checkpoint", "null",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", val_batches,
        "--trainer.enable_progress_bar", "false", "--trainer.max_epochs", epochs,
    ]]  # fmt: skip


def stop_callback(**init_args) -> list[str]:
    return ["--trainer.callbacks+", json.dumps({"class_path": "tests.test_resume_shipped.StopAt",
                                               "init_args": init_args})]  # fmt: skip


def in_run(value):
    """A path as it is inside the runs folder (the two runs have their own); any other value unchanged."""
    return value.split("/runs/")[-1] if isinstance(value, str) else value


def assert_same(a, b, where: str = "") -> None:
    """Equal checkpoint contents: tensors bit for bit, floats exactly, paths after the run folder."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        a, b = ({in_run(k): v for k, v in d.items()} for d in (a, b))
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, str):
        assert in_run(a) == in_run(b), where
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN


def last_checkpoint(runs: Path, config: str) -> dict:
    return torch.load(runs / config / "checkpoints" / "last.ckpt", weights_only=True)


def assert_resumed_run_is_exact(uninterrupted: dict, resumed: dict) -> None:
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "callbacks", "loops", "global_step", "epoch"):
        assert_same(uninterrupted[key], resumed[key], key)


# One fast representative: Faster R-CNN's config is the one whose resumed runs differed.
@pytest.mark.parametrize("config", ["faster_rcnn", *(pytest.param(c, marks=pytest.mark.slow)
                                                     for c in ("retinanet", "classifier", "pretrain"))])  # fmt: skip
def test_an_interrupted_and_resumed_run_ends_bit_identical(config, shapes_dir, tmp_path, train_py, monkeypatch):
    monkeypatch.chdir(tmp_path)
    whole, parts = tmp_path / "a" / "runs", tmp_path / "b" / "runs"
    code, out, err = train_py(*fit_args(config, shapes_dir, whole, 2))
    assert code == 0, err[-3000:]
    with pytest.raises(Interrupted):  # after epoch 1's last.ckpt, before any step of epoch 2
        train_py(*fit_args(config, shapes_dir, parts, 2), *stop_callback(epoch=1))
    assert last_checkpoint(parts, config)["global_step"] == 2
    code, out, err = train_py(*fit_args(config, shapes_dir, parts, 2), "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    uninterrupted, resumed = last_checkpoint(whole, config), last_checkpoint(parts, config)
    assert uninterrupted["global_step"] == 4
    assert_resumed_run_is_exact(uninterrupted, resumed)
