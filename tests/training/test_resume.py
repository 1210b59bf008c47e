"""Resuming: exact continuation, callback state, refusals, and a run killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch import seed_everything
from lightning.pytorch.loggers import CSVLogger

from tests.training.tiny_lightning import ScriptedModule, TinyRegressor, assert_same, quiet_trainer
from training.callbacks import ModelCheckpoint, ReduceLROnPlateau
from training.saving import (
    CheckpointFileError,
    WeightsOnlyCheckpointError,
    checkpoint_log_position,
    load_checkpoint_file,
    load_model,
    resolve_ckpt_path,
)

REPO_ROOT = Path(__file__).resolve().parents[2]




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
        lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Epoch ")]
        return trainer, lines

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


def test_resume_from_weights_only_file_is_refused(tmp_path):
    cb = ModelCheckpoint(str(tmp_path / "w{epoch}.ckpt"), save_weights_only=True)
    quiet_trainer(tmp_path, 1, [cb]).fit(ScriptedModule(script=[1.0]))
    weights_file = str(tmp_path / "w1.ckpt")
    with pytest.raises(WeightsOnlyCheckpointError, match="holds weights only") as info:
        quiet_trainer(tmp_path, 2, [ModelCheckpoint(str(tmp_path / "w{epoch}.ckpt"))]).fit(
            ScriptedModule(script=[1.0]), ckpt_path=weights_file
        )
    assert weights_file in str(info.value)
    assert type(load_model(weights_file)) is ScriptedModule  # still a loadable model


def test_ckpt_path_last_without_checkpoint_is_an_error(tmp_path):
    cb = ModelCheckpoint(str(tmp_path / "ckpt" / "m.ckpt"))
    with pytest.raises(FileNotFoundError, match="no last checkpoint to resume from"):
        quiet_trainer(tmp_path, 1, [cb]).fit(ScriptedModule(script=[1.0]), ckpt_path="last")

    ckpt_dir = tmp_path / "ckpt"
    assert resolve_ckpt_path(None, ckpt_dir) is None
    with pytest.raises(FileNotFoundError, match="last.ckpt does not exist"):
        resolve_ckpt_path("last", ckpt_dir)
    assert resolve_ckpt_path("auto", ckpt_dir) is None  # nothing to resume: a new run
    with pytest.raises(FileNotFoundError, match="other.ckpt"):
        resolve_ckpt_path(str(tmp_path / "other.ckpt"), ckpt_dir)
    quiet_trainer(tmp_path, 1, [ModelCheckpoint(str(ckpt_dir / "m.ckpt"))]).fit(ScriptedModule(script=[1.0]))
    assert resolve_ckpt_path("last", ckpt_dir) == str(ckpt_dir / "last.ckpt")
    assert resolve_ckpt_path("auto", ckpt_dir) == str(ckpt_dir / "last.ckpt")
    assert resolve_ckpt_path(str(ckpt_dir / "m.ckpt"), None) == str(ckpt_dir / "m.ckpt")


def test_resume_from_truncated_last_ckpt_names_the_file(tmp_path):
    quiet_trainer(tmp_path, 1, [ModelCheckpoint(str(tmp_path / "m.ckpt"))]).fit(ScriptedModule(script=[1.0]))
    last = tmp_path / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointFileError, match="truncated or corrupt") as info:
        quiet_trainer(tmp_path, 2, [ModelCheckpoint(str(tmp_path / "m.ckpt"))]).fit(
            ScriptedModule(script=[1.0]), ckpt_path="last"
        )
    assert os.path.realpath(last) in str(info.value)


def test_checkpoint_records_logger_version(tmp_path):
    logger = CSVLogger(tmp_path, name="logs", version=7)
    quiet_trainer(tmp_path, 1, [ModelCheckpoint(str(tmp_path / "m.ckpt"))], logger=logger).fit(
        ScriptedModule(script=[1.0])
    )
    assert checkpoint_log_position(tmp_path / "last.ckpt")[0] == 7
    assert checkpoint_log_position(tmp_path / "m.ckpt")[0] == 7


KILLED_RUN = """
import sys
from lightning.pytorch import Trainer, seed_everything
from tests.training.tiny_lightning import TinyRegressor
from training.callbacks import ModelCheckpoint

seed_everything(0, verbose=False)
checkpoint = ModelCheckpoint(sys.argv[1] + "/e{epoch:02d}.ckpt", save_freq=2)  # every 2 of 6 batches
trainer = Trainer(max_epochs=100, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", devices=1)
trainer.fit(TinyRegressor(step_sleep=0.03))
"""


@pytest.mark.slow
def test_run_killed_with_sigkill_mid_epoch_resumes(tmp_path):
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    ckpt_dir = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ckpt_dir)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        # wait until the run is in its 3rd epoch (the first step save of epoch 3), then kill it mid-epoch
        while not (ckpt_dir / "e03.ckpt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the training subprocess made no progress"
            time.sleep(0.01)
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    for path in ckpt_dir.glob("*.ckpt"):  # every file the killed run left is whole
        load_checkpoint_file(path)
    killed_at = load_checkpoint_file(ckpt_dir / "last.ckpt")["global_step"]
    assert 12 <= killed_at < 30  # killed in epoch 3 (steps 13-18), after the end-of-epoch-2 save

    # resume in this process and finish 5 epochs of 6 batches
    checkpoint = ModelCheckpoint(str(ckpt_dir / "e{epoch:02d}.ckpt"), save_freq=2)
    trainer = quiet_trainer(tmp_path, 5, [checkpoint])
    trainer.fit(TinyRegressor(), ckpt_path="last")
    assert trainer.current_epoch == 5
    assert trainer.global_step == 30
    assert load_checkpoint_file(ckpt_dir / "last.ckpt")["global_step"] == 30
