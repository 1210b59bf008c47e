"""Keras ModelCheckpoint / ReduceLROnPlateau behaviour on scripted metric sequences, their state across a
resume, and their decisions under DDP.

Expected files, messages and LR schedules are worked out by hand from tf-keras' documented algorithm
(tf_keras/callbacks.py), not from the code under test.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger

from tests.training.test_callback_utils import MODE_AUTO_CASES
from tests.training.tiny_lightning import ScriptedModule, TinyRegressor, assert_same, quiet_trainer
from training.callback_utils import FilepathKeyError
from training.callbacks import ModelCheckpoint, ReduceLROnPlateau
from training.checkpoint_io import AtomicCheckpointIO
from training.errors import UsageError


class LRRecorder(Callback):
    """The LR of every param group at the start of each epoch (what the epoch trains with)."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def fit(module, callbacks, max_epochs, tmp_path, **trainer_kwargs) -> Trainer:
    trainer = quiet_trainer(tmp_path, max_epochs, callbacks, **trainer_kwargs)
    trainer.fit(module)
    return trainer


def epoch_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch ")]


def ckpt_files(directory) -> set[str]:
    return {f for f in os.listdir(directory) if not f.startswith(".")} if os.path.isdir(directory) else set()


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


# ----------------------------------------------------------------------------------------- mode


@pytest.mark.parametrize(("monitor", "expected"), MODE_AUTO_CASES)
def test_mode_auto(monitor, expected):
    assert ModelCheckpoint("m.ckpt", monitor=monitor, save_best_only=True).mode == expected
    assert ReduceLROnPlateau(monitor=monitor).mode == expected


def test_mode_auto_choice_is_reported(tmp_path):
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero_logger.addHandler(handler)
    try:
        callbacks = [
            ModelCheckpoint(str(tmp_path / "m.ckpt"), monitor="val_map", save_best_only=True),
            ReduceLROnPlateau(monitor="train_loss"),
        ]
        fit(ScriptedModule(script=[0.5], monitor="val_map"), callbacks, 1, tmp_path)
    finally:
        rank_zero_logger.removeHandler(handler)
    assert "ModelCheckpoint: mode='auto' chose 'max' for monitor 'val_map'" in records
    assert "ReduceLROnPlateau: mode='auto' chose 'min' for monitor 'train_loss'" in records


def test_invalid_arguments():
    with pytest.raises(ValueError, match="save_freq"):
        ModelCheckpoint("m.ckpt", save_freq=0)
    with pytest.raises(ValueError, match="save_freq"):
        ModelCheckpoint("m.ckpt", save_freq="batch")
    with pytest.raises(ValueError, match="named fields"):
        ModelCheckpoint("m-{}.ckpt")
    with pytest.raises(ValueError, match="only the file name"):
        ModelCheckpoint("run{epoch}/m.ckpt")
    with pytest.raises(ValueError, match="mode"):
        ModelCheckpoint("m.ckpt", mode="largest")
    with pytest.raises(ValueError, match="factor >= 1.0"):
        ReduceLROnPlateau(factor=1.0)
    # refused settings are the user's to fix: the command line prints the message alone
    for refused in (lambda: ModelCheckpoint("m.ckpt", save_freq=0), lambda: ReduceLROnPlateau(factor=2.0),
                    lambda: ModelCheckpoint("m.ckpt", mode="largest"), lambda: ModelCheckpoint("m-{}.ckpt")):
        with pytest.raises(UsageError):
            refused()


# ----------------------------------------------------------------------------------------- ModelCheckpoint


def test_save_best_only_templated_keeps_each_improvement(tmp_path, capsys):
    d = os.path.realpath(tmp_path / "ckpt")
    module = ScriptedModule(script=[0.5, 0.4, 0.45, 0.4, 0.3])
    cb = ModelCheckpoint(os.path.join(d, "w.{epoch:02d}-{val_loss:.2f}.ckpt"), save_best_only=True, verbose=1)
    fit(module, [cb], 5, tmp_path)

    assert epoch_lines(capsys) == [
        f"Epoch 1: val_loss improved from inf to 0.50000, saving model to {d}/w.01-0.50.ckpt",
        f"Epoch 2: val_loss improved from 0.50000 to 0.40000, saving model to {d}/w.02-0.40.ckpt",
        "Epoch 3: val_loss did not improve from 0.40000",
        "Epoch 4: val_loss did not improve from 0.40000",  # equal is not an improvement
        f"Epoch 5: val_loss improved from 0.40000 to 0.30000, saving model to {d}/w.05-0.30.ckpt",
    ]
    assert ckpt_files(d) == {"w.01-0.50.ckpt", "w.02-0.40.ckpt", "w.05-0.30.ckpt", "last.ckpt"}
    assert load(f"{d}/w.02-0.40.ckpt")["epoch"] == 1  # Lightning's 0-based counter inside the file
    best = load(f"{d}/w.05-0.30.ckpt")
    assert all(torch.equal(best["state_dict"][k], v) for k, v in module.state_dict().items())
    assert cb.best == pytest.approx(0.3)
    assert cb.best_model_path == f"{d}/w.05-0.30.ckpt"


def test_save_best_only_max_mode_prints_minus_inf(tmp_path, capsys):
    d = os.path.realpath(tmp_path)
    cb = ModelCheckpoint(str(tmp_path / "acc.ckpt"), monitor="val_acc", save_best_only=True, verbose=1)
    fit(ScriptedModule(script=[0.5, 0.75, 0.625], monitor="val_acc"), [cb], 3, tmp_path)
    assert epoch_lines(capsys) == [
        f"Epoch 1: val_acc improved from -inf to 0.50000, saving model to {d}/acc.ckpt",
        f"Epoch 2: val_acc improved from 0.50000 to 0.75000, saving model to {d}/acc.ckpt",
        "Epoch 3: val_acc did not improve from 0.75000",
    ]


def test_save_best_only_fixed_filepath_is_overwritten(tmp_path):
    cb = ModelCheckpoint(str(tmp_path / "best.ckpt"), save_best_only=True)
    fit(ScriptedModule(script=[0.5, 0.3, 0.4]), [cb], 3, tmp_path)
    assert ckpt_files(tmp_path) == {"best.ckpt", "last.ckpt"}
    assert load(tmp_path / "best.ckpt")["epoch"] == 1  # epoch 2 (1-based) had the best value
    assert load(tmp_path / "last.ckpt")["epoch"] == 2


def test_save_every_epoch_messages(tmp_path, capsys):
    d = os.path.realpath(tmp_path)
    module = ScriptedModule(script=[0.5, 0.6, 0.7])
    fit(module, [ModelCheckpoint(str(tmp_path / "m-{epoch}.ckpt"), verbose=1)], 3, tmp_path)
    assert epoch_lines(capsys) == [f"Epoch {e}: saving model to {d}/m-{e}.ckpt" for e in (1, 2, 3)]
    assert ckpt_files(tmp_path) == {"m-1.ckpt", "m-2.ckpt", "m-3.ckpt", "last.ckpt"}
    assert [load(tmp_path / f"m-{e}.ckpt")["epoch"] for e in (1, 2, 3)] == [0, 1, 2]


def test_initial_value_threshold(tmp_path, capsys):
    d = os.path.realpath(tmp_path)
    cb = ModelCheckpoint(
        str(tmp_path / "b.ckpt"), save_best_only=True, verbose=1, initial_value_threshold=0.4
    )
    fit(ScriptedModule(script=[0.5, 0.25]), [cb], 2, tmp_path)
    assert epoch_lines(capsys) == [
        "Epoch 1: val_loss did not improve from 0.40000",
        f"Epoch 2: val_loss improved from 0.40000 to 0.25000, saving model to {d}/b.ckpt",
    ]


@pytest.mark.parametrize("save_last", [False, True])
def test_missing_monitor_warns_and_saves_nothing(tmp_path, save_last):
    cb = ModelCheckpoint(str(tmp_path / "ckpt" / "b.ckpt"), save_best_only=True, save_last=save_last)
    with pytest.warns(UserWarning, match="Can save best model only with val_loss available, skipping."):
        fit(ScriptedModule(script=None), [cb], 2, tmp_path)
    assert ckpt_files(tmp_path / "ckpt") == ({"last.ckpt"} if save_last else set())


def test_unlogged_template_key_is_an_error_listing_available_keys(tmp_path):
    cb = ModelCheckpoint(str(tmp_path / "w-{val_acc:.2f}.ckpt"))
    with pytest.raises(FilepathKeyError) as info:
        fit(ScriptedModule(script=[0.5]), [cb], 1, tmp_path)
    assert isinstance(info.value, KeyError) and isinstance(info.value, UsageError)
    message = str(info.value)
    assert "{val_acc}" in message
    assert "available keys: epoch, step, train_loss, val_loss" in message


def test_stale_validation_metrics_are_not_used(tmp_path, capsys):
    # Validation every 2nd epoch: on epochs 1 and 3 val_loss is not available (Keras: skip + warn),
    # even though Lightning still holds the previous value.
    d = os.path.realpath(tmp_path)
    cb = ModelCheckpoint(str(tmp_path / "b-{epoch}.ckpt"), save_best_only=True, verbose=1)
    with pytest.warns(UserWarning, match="Can save best model only with val_loss available"):
        fit(ScriptedModule(script=[0.5, 0.4, 0.3, 0.2]), [cb], 4, tmp_path, check_val_every_n_epoch=2)
    assert epoch_lines(capsys) == [
        f"Epoch 2: val_loss improved from inf to 0.40000, saving model to {d}/b-2.ckpt",
        f"Epoch 4: val_loss improved from 0.40000 to 0.20000, saving model to {d}/b-4.ckpt",
    ]
    # last.ckpt is still written every epoch
    assert load(tmp_path / "last.ckpt")["epoch"] == 3


def test_save_freq_in_batches(tmp_path, capsys):
    d = os.path.realpath(tmp_path)
    cb = ModelCheckpoint(str(tmp_path / "s-{epoch}-{batch}-{step}.ckpt"), save_freq=3, verbose=1)
    fit(ScriptedModule(script=None, train_batches=4), [cb], 2, tmp_path)
    # 4 batches per epoch: global steps 3 and 6 are epoch 1 batch 3 and epoch 2 batch 2.
    assert epoch_lines(capsys) == [
        f"Epoch 1: saving model to {d}/s-1-3-3.ckpt",
        f"Epoch 2: saving model to {d}/s-2-2-6.ckpt",
    ]
    assert ckpt_files(tmp_path) == {"s-1-3-3.ckpt", "s-2-2-6.ckpt", "last.ckpt"}
    assert load(tmp_path / "s-2-2-6.ckpt")["global_step"] == 6
    assert load(tmp_path / "last.ckpt")["global_step"] == 8  # last.ckpt also at every epoch end


def test_last_ckpt_is_full_even_with_save_weights_only(tmp_path):
    cb = ModelCheckpoint(str(tmp_path / "w{epoch}.ckpt"), save_weights_only=True)
    trainer = fit(ScriptedModule(script=[0.5, 0.4]), [cb], 2, tmp_path)
    weights = load(tmp_path / "w2.ckpt")
    last = load(tmp_path / "last.ckpt")
    assert "optimizer_states" not in weights and "callbacks" not in weights
    assert (
        "state_dict" in weights
        and weights["litvision"]["class_path"] == "tests.training.tiny_lightning.ScriptedModule"
    )
    assert len(last["optimizer_states"]) == 1 and last["loops"] and last["callbacks"]
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ----------------------------------------------------------------------------------------- ReduceLROnPlateau


def reductions(lines: list[str]) -> list[tuple[int, str]]:
    out = []
    for line in lines:
        head, _, tail = line.partition(": ReduceLROnPlateau reducing learning rate to ")
        assert tail.endswith("."), line
        out.append((int(head.removeprefix("Epoch ")), tail[:-1]))
    return out


def test_plateau_flat_patience_3(tmp_path, capsys):
    rec = LRRecorder()
    rl = ReduceLROnPlateau(factor=0.5, patience=3, verbose=1)
    # sanity check enabled (Trainer default): it must not count as an epoch
    trainer = fit(ScriptedModule(script=[1.0] * 10, lr=0.1), [rl, rec], 10, tmp_path)
    assert reductions(epoch_lines(capsys)) == [(4, "0.05"), (7, "0.025"), (10, "0.0125")]
    assert [lrs[0] for lrs in rec.lrs] == [0.1] * 4 + [0.05] * 3 + [0.025] * 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0125


def test_plateau_cooldown(tmp_path, capsys):
    # patience=2, cooldown=2, flat: reduce at 3; epoch 4 in cooldown (counter 2->1); epoch 5 counter 1->0,
    # no longer in cooldown so wait=1; epoch 6 wait=2 -> reduce; likewise 9.
    rl = ReduceLROnPlateau(factor=0.5, patience=2, cooldown=2, verbose=1)
    fit(ScriptedModule(script=[1.0] * 10), [rl], 10, tmp_path)
    assert [e for e, _ in reductions(epoch_lines(capsys))] == [3, 6, 9]


@pytest.mark.parametrize(("min_delta", "expected_epochs"), [(0.01, [3, 6]), (0.0, [])])
def test_plateau_min_delta_is_absolute(tmp_path, capsys, min_delta, expected_epochs):
    # val_loss falls by 0.004 per epoch. With min_delta=0.01 only a value below best - 0.01 counts:
    # best 1.0 (ep1), 0.996 and 0.992 do not -> reduce at 3; 0.988 < 0.99 improves (ep4), 0.984 and
    # 0.980 are not below 0.978 -> reduce at 6; 0.976 improves. min_delta=0: every epoch improves.
    values = [1.0 - 0.004 * i for i in range(7)]
    rl = ReduceLROnPlateau(factor=0.5, patience=2, min_delta=min_delta, verbose=1)
    fit(ScriptedModule(script=values), [rl], 7, tmp_path)
    assert [e for e, _ in reductions(epoch_lines(capsys))] == expected_epochs


def test_plateau_min_lr(tmp_path, capsys):
    # lr 0.1, factor 0.5, min_lr 0.03, patience 1: 0.05 at epoch 2, max(0.025, 0.03)=0.03 at 3, then
    # lr is not > min_lr so nothing more happens.
    rl = ReduceLROnPlateau(factor=0.5, patience=1, min_lr=0.03, verbose=1)
    trainer = fit(ScriptedModule(script=[1.0] * 5, lr=0.1), [rl], 5, tmp_path)
    assert reductions(epoch_lines(capsys)) == [(2, "0.05"), (3, "0.03")]
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.03


def keras_plateau(values, lr, factor, patience, min_lr, cooldown=0, min_delta=1e-4):
    """tf-keras ReduceLROnPlateau.on_epoch_end (mode min), written out from tf_keras/callbacks.py, over a
    sequence of monitored values: the (epoch, new LR) reductions, the LR each epoch trains with, and the final
    (wait, cooldown_counter). tf-keras keeps its LR in a float32 variable and reduces only while
    ``old_lr > np.float32(min_lr)``; litvision's LR is a Python float, so the comparison is made on both sides
    rounded to float32, and the new LR ``max(old_lr * factor, min_lr)`` is computed in float64."""
    best, wait, cooldown_counter, reductions, trained_with = np.inf, 0, 0, [], []
    for epoch, current in enumerate(values, start=1):
        trained_with.append(lr)
        if cooldown_counter > 0:
            cooldown_counter -= 1
            wait = 0
        if np.less(current, best - min_delta):
            best, wait = current, 0
        elif not cooldown_counter > 0:
            wait += 1
            if wait >= patience and np.float32(lr) > np.float32(min_lr):
                lr = max(lr * factor, min_lr)
                reductions.append((epoch, repr(lr)))
                cooldown_counter, wait = cooldown, 0
    return reductions, trained_with, (wait, cooldown_counter)


def test_keras_plateau_reference_on_the_issues_example():
    # Worked by hand: lr 0.1, factor 0.1, min_lr 1e-3, patience 1, flat. Epoch 2: 0.1 * 0.1 =
    # 0.010000000000000002; epoch 3: 0.0010000000000000002, which is 0.001 in float32, so no more reductions
    # and wait grows by one per epoch from epoch 4: 5 at epoch 8.
    reductions, _, state = keras_plateau([1.0] * 8, lr=0.1, factor=0.1, patience=1, min_lr=1e-3)
    assert reductions == [(2, "0.010000000000000002"), (3, "0.0010000000000000002")]
    assert state == (5, 0)


# (lr, factor, patience, cooldown, min_lr, epochs): the LR lands within float rounding of min_lr, or (the last
# two) just above it by more than float32's resolution, where a genuine reduction must still happen.
NEAR_MIN_LR = {
    "issue-0.1x0.1-to-1e-3": (0.1, 0.1, 1, 0, 1e-3, 8),
    "issue-0.1x0.2-to-0.02-cooldown": (0.1, 0.2, 2, 1, 0.02, 10),
    "float64-above-float32-equal": (1e-3 * (1 + 1e-9), 0.5, 1, 0, 1e-3, 4),
    "float32-above-reduces-to-min_lr": (1e-3 * (1 + 1e-6), 0.5, 1, 2, 1e-3, 6),
    "0.3x0.1x0.1-above-min_lr-3e-3": (0.3, 0.1, 2, 0, 2.9e-3, 9),
}


@pytest.mark.parametrize("case", NEAR_MIN_LR.values(), ids=list(NEAR_MIN_LR))
def test_plateau_at_min_lr_compares_as_tf_keras(tmp_path, capsys, case):
    lr, factor, patience, cooldown, min_lr, epochs = case
    expected, trained_with, state = keras_plateau([1.0] * epochs, lr, factor, patience, min_lr, cooldown)
    rec = LRRecorder()
    rl = ReduceLROnPlateau(factor=factor, patience=patience, cooldown=cooldown, min_lr=min_lr, verbose=1)
    trainer = fit(ScriptedModule(script=[1.0] * epochs, lr=lr), [rl, rec], epochs, tmp_path)
    assert reductions(epoch_lines(capsys)) == expected
    assert [lrs[0] for lrs in rec.lrs] == trained_with
    assert (rl.wait, rl.cooldown_counter) == state
    assert trainer.optimizers[0].param_groups[0]["lr"] == (float(expected[-1][1]) if expected else lr)


def test_plateau_mode_auto_max(tmp_path, capsys):
    rl = ReduceLROnPlateau(monitor="val_acc", factor=0.5, patience=2, verbose=1)
    fit(ScriptedModule(script=[0.5, 0.6, 0.6, 0.6], monitor="val_acc"), [rl], 4, tmp_path)
    assert reductions(epoch_lines(capsys)) == [(4, "0.05")]


def test_plateau_missing_monitor_warns(tmp_path):
    rl = ReduceLROnPlateau(monitor="val_acc", patience=1)
    with pytest.warns(
        UserWarning, match=r"conditioned on metric `val_acc` which is not available\. Available"
    ):
        trainer = fit(ScriptedModule(script=[1.0] * 3), [rl], 3, tmp_path)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.1


def test_plateau_counts_only_epochs_with_validation(tmp_path, capsys):
    # Validation on epochs 2, 4, 6, 8: best at 2, wait 1 at 4, wait 2 at 6 -> one reduction, at epoch 6.
    rl = ReduceLROnPlateau(factor=0.5, patience=2, verbose=1)
    fit(ScriptedModule(script=[1.0] * 8), [rl], 8, tmp_path, check_val_every_n_epoch=2)
    assert reductions(epoch_lines(capsys)) == [(6, "0.05")]


def test_plateau_every_param_group_and_min_lr_per_group(tmp_path, capsys):
    # groups at 0.1 and 0.01; epoch 2: 0.05 and max(0.005, 0.008); epoch 3: only the first is > min_lr.
    rl = ReduceLROnPlateau(factor=0.5, patience=1, min_lr=0.008, verbose=1)
    trainer = fit(ScriptedModule(script=[1.0] * 3, lr=0.1, n_groups=2), [rl], 3, tmp_path)
    assert reductions(epoch_lines(capsys)) == [(2, "[0.05, 0.008]"), (3, "0.025")]
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [0.025, 0.008]


def test_plateau_lr_is_logged_every_epoch(tmp_path):
    logger = CSVLogger(tmp_path, name="logs", version=0)
    rl = ReduceLROnPlateau(factor=0.5, patience=2)
    callbacks = [rl, LearningRateMonitor(logging_interval="epoch")]
    fit(ScriptedModule(script=[1.0] * 4, lr=0.1), callbacks, 4, tmp_path, logger=logger)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        logged = [float(row["lr-SGD"]) for row in csv.DictReader(f) if row.get("lr-SGD")]
    # flat, patience 2: best at 1, wait 1 at 2, wait 2 at 3 -> reduced at the end of epoch 3
    assert logged == [0.1, 0.1, 0.1, 0.05]


def test_plateau_state_round_trip():
    rl = ReduceLROnPlateau(patience=3)
    rl.best, rl.wait, rl.cooldown_counter = 0.25, 2, 1
    other = ReduceLROnPlateau(patience=3)
    other.load_state_dict(rl.state_dict())
    assert (other.best, other.wait, other.cooldown_counter) == (0.25, 2, 1)


# ----------------------------------------------------------------------------------------- resuming


def train_regressor(
    dirpath: Path, max_epochs: int, ckpt_path: str | None = None, seed: int = 0, **module_kwargs
):
    seed_everything(seed, verbose=False)
    module = TinyRegressor(**module_kwargs)
    # min_delta=10 never counts as improvement: with patience 1 and cooldown 2 the LR is halved at the
    # end of epochs 2, 4 and 6, so the plateau counters are mid-cooldown at the interruption (epoch 3).
    plateau = ReduceLROnPlateau(factor=0.5, patience=1, cooldown=2, min_delta=10.0)
    ckpt = ModelCheckpoint(str(dirpath / "e{epoch:02d}.ckpt"))
    trainer = quiet_trainer(dirpath, max_epochs, [ckpt, plateau], deterministic=True)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer, plateau


@pytest.mark.parametrize("epoch_scheduler", [False, True], ids=["step-warmup", "epoch-StepLR"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, epoch_scheduler):
    # Dropout, BatchNorm, shuffled batches, momentum, a warm-up scheduler and plateau reductions: the
    # resumed run must draw the same random numbers and restore every state to end bit-identical.
    module_a, trainer_a, plateau_a = train_regressor(tmp_path / "a", 6, epoch_scheduler=epoch_scheduler)
    train_regressor(tmp_path / "b", 3, epoch_scheduler=epoch_scheduler)
    # another seed on resume: the RNG state must come from the checkpoint, not from seeding
    module_b, trainer_b, plateau_b = train_regressor(
        tmp_path / "b", 6, ckpt_path="last", seed=999, epoch_scheduler=epoch_scheduler
    )

    assert_same(module_b.state_dict(), module_a.state_dict())
    assert_same(trainer_b.optimizers[0].state_dict(), trainer_a.optimizers[0].state_dict())
    assert_same(
        trainer_b.lr_scheduler_configs[0].scheduler.state_dict(),
        trainer_a.lr_scheduler_configs[0].scheduler.state_dict(),
    )
    assert plateau_b.state_dict() == plateau_a.state_dict()
    assert (
        (trainer_b.global_step, trainer_b.current_epoch)
        == (trainer_a.global_step, trainer_a.current_epoch)
        == (36, 6)
    )
    # three plateau halvings (epochs 2, 4, 6) survive the scheduler: LambdaLR recomputes from base_lrs
    expected_lr = 0.05 * 0.5**3 * (0.7**6 if epoch_scheduler else 1.0)
    assert trainer_b.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected_lr, rel=1e-12)
    assert sorted(os.listdir(tmp_path / "b")) == [f"e{e:02d}.ckpt" for e in range(1, 7)] + ["last.ckpt"]


def test_plateau_and_checkpoint_state_survive_resume(tmp_path, capsys):
    # Flat val_loss, patience 3: reductions at 4, 7, 10. Interrupted after 5 epochs (wait=1 then), the
    # resumed run must reduce at 7 and 10 -- a fresh state would reduce at 9 instead.
    def run(max_epochs, ckpt_path=None):
        plateau = ReduceLROnPlateau(factor=0.5, patience=3, verbose=1)
        ckpt = ModelCheckpoint(str(tmp_path / "best.ckpt"), save_best_only=True, verbose=1)
        trainer = quiet_trainer(tmp_path, max_epochs, [ckpt, plateau])
        trainer.fit(ScriptedModule(script=[1.0] * 10, lr=0.1), ckpt_path=ckpt_path)
        return trainer, epoch_lines(capsys)

    _, first = run(5)
    assert "Epoch 4: ReduceLROnPlateau reducing learning rate to 0.05." in first
    trainer, second = run(10, ckpt_path="last")
    assert [x for x in second if "ReduceLROnPlateau" in x] == [
        "Epoch 7: ReduceLROnPlateau reducing learning rate to 0.025.",
        "Epoch 10: ReduceLROnPlateau reducing learning rate to 0.0125.",
    ]
    # the checkpoint's best (1.0 from epoch 1) was restored too: no "improved from inf" after resuming
    assert [x for x in second if "val_loss" in x] == [
        f"Epoch {e}: val_loss did not improve from 1.00000" for e in range(6, 11)
    ]
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0125


def test_ckpt_path_last_without_checkpoint_is_an_error(tmp_path):
    cb = ModelCheckpoint(str(tmp_path / "ckpt" / "m.ckpt"))
    with pytest.raises(FileNotFoundError, match="no last checkpoint to resume from"):
        quiet_trainer(tmp_path, 1, [cb]).fit(ScriptedModule(script=[1.0]), ckpt_path="last")


# ----------------------------------------------------------------------------------------- DDP

# Each process logs its own values of a metric "m", without sync_dist.
PER_RANK = {0: [3.0, 2.0, 2.0, 2.0], 1: [1.0, 0.5, 0.25, 0.1]}


class PerRankMetric(ScriptedModule):
    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("m", PER_RANK[self.global_rank][self.current_epoch])  # no sync_dist


class Record(Callback):
    """Writes what each process ended with to ``out/<rank>.json``."""

    def __init__(self, out: Path, checkpoint: ModelCheckpoint):
        self.out, self.checkpoint = out, checkpoint

    def on_train_end(self, trainer, pl_module) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        best = {"lr": lr, "best": self.checkpoint.best, "path": os.path.basename(self.checkpoint.best_model_path)}
        (self.out / f"{trainer.global_rank}.json").write_text(json.dumps(best))


def test_callbacks_decide_on_process_0s_value_under_ddp(tmp_path):
    # Two processes (spawned: this process only launches them) log different values of a metric that is not
    # synced: both callbacks must take process 0's decisions everywhere, or process 1 would save and reduce on
    # its own values: a checkpoint barrier that process 0 never enters, LRs that differ between replicas.
    ckpt = ModelCheckpoint(str(tmp_path / "best-{m:.2f}.ckpt"), monitor="m", save_best_only=True)
    plateau = ReduceLROnPlateau(monitor="m", patience=1, factor=0.5)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=4, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      callbacks=[ckpt, plateau, Record(tmp_path, ckpt)])
    trainer.fit(PerRankMetric())
    # Keras' rules on process 0's values 3, 2, 2, 2: best 2 (epoch 2); no improvement at epochs 3 and 4 with
    # patience 1 -> two reductions, 0.1 -> 0.05 -> 0.025. Process 1's own values would give best 0.1, lr 0.1,
    # and its file names (best-0.50.ckpt at epoch 2) would name files that were never written.
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == {"lr": pytest.approx(0.025), "best": 2.0, "path": "best-2.00.ckpt"}, rank
    assert sorted(p.name for p in tmp_path.glob("best-*.ckpt")) == ["best-2.00.ckpt", "best-3.00.ckpt"]
