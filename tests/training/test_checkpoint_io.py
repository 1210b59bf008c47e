"""Checkpoint files: safe reads, clear errors on bad files, atomic writes (a run killed with SIGKILL
included), and the lookups and refusals before resuming."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from tests.training.tiny_lightning import ScriptedModule, TinyRegressor, quiet_trainer
from training.callbacks import ModelCheckpoint
from training.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointFileError,
    WeightsOnlyCheckpointError,
    atomic_torch_save,
    checkpoint_log_position,
    load_checkpoint_file,
    resolve_ckpt_path,
)
from training.errors import UsageError
from training.saving import load_model, save_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_file_errors_are_usage_errors():
    # the command line prints their message alone: the user's file is at fault, not litvision
    assert issubclass(WeightsOnlyCheckpointError, CheckpointFileError)
    assert issubclass(CheckpointFileError, UsageError) and issubclass(CheckpointFileError, ValueError)


# ----------------------------------------------------------------------------------------- unsafe files


class _Payload:
    """Unpickling this runs os.mkdir(marker): stands for arbitrary code in a malicious file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    module = ScriptedModule(script=[1.0])
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "litvision": {"class_path": "tests.training.tiny_lightning.ScriptedModule", "format": 1},
            "payload": _Payload(str(marker)),
        },
        path,
    )
    with pytest.raises(CheckpointFileError, match="refused to load") as info:
        load_model(path)
    assert str(path) in str(info.value) and "posix.mkdir" in str(info.value)
    assert not marker.exists()

    # the same file given to resume (through the checkpoint IO ModelCheckpoint installs)
    trainer = quiet_trainer(tmp_path, 1, [ModelCheckpoint(str(tmp_path / "m.ckpt"))])
    with pytest.raises(CheckpointFileError, match="refused to load"):
        trainer.fit(ScriptedModule(script=[1.0]), ckpt_path=str(path))
    assert not marker.exists()

    # the payload is live: an unrestricted unpickler would have run it
    torch.load(path, weights_only=False)
    assert marker.is_dir()


# ----------------------------------------------------------------------------------------- bad files


# load_model reads the file whole; the hyperparameter/step lookups before a resume map it (mmap=True).
READERS = {"load_model": load_model, "mapped": lambda path: load_checkpoint_file(path, mmap=True)}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_truncated_or_corrupt_file_errors_clearly(tmp_path, damage, reader):
    path = tmp_path / "m.ckpt"
    save_model(TinyRegressor(hidden=8), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": random.Random(0).randbytes(4096)}[damage])
    with pytest.raises(CheckpointFileError, match="truncated or corrupt") as info:
        READERS[reader](path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_mapped_read_equals_plain_read(tmp_path, zip_format):
    """torch cannot map its pre-1.6 (non-zip) format: that file is read whole instead, with the same result."""
    path = tmp_path / "m.ckpt"
    saved = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "global_step": 12,
             "litvision": {"logger_version": 3}, "hyper_parameters": {"hidden": 8}}  # fmt: skip
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    mapped = load_checkpoint_file(path, mmap=True)
    assert torch.equal(mapped["state_dict"]["w"], saved["state_dict"]["w"])
    assert mapped["hyper_parameters"] == {"hidden": 8}
    assert checkpoint_log_position(path) == (3, 12)


def test_random_bytes_always_get_the_clear_error(tmp_path):
    """Random bytes reach torch's legacy (non-zip) unpickler, which fails in several ways (IndexError,
    KeyError, UnpicklingError...); every one must become the same named error."""
    path = tmp_path / "noise.ckpt"
    for seed in range(300):
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(CheckpointFileError, match="truncated or corrupt"):
            load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        load_model(tmp_path / "nothing.ckpt")


# ----------------------------------------------------------------------------------------- atomic writes


class _FailsMidSave:
    """Pickling this raises, as a full disk or a crash would in the middle of torch.save."""

    def __reduce__(self):
        raise OSError(28, "No space left on device (simulated)")


def test_failed_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "model.ckpt"
    module = TinyRegressor(hidden=8)
    save_model(module, path)
    before = path.read_bytes()
    with pytest.raises(OSError, match="simulated"):
        atomic_torch_save({"state_dict": module.state_dict(), "x": _FailsMidSave()}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.ckpt"]  # no temporary file left behind
    load_model(path)


def test_atomic_save_file_mode_and_checkpoint_io(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_torch_save({"a": torch.ones(2)}, tmp_path / "new.ckpt")
    assert os.stat(tmp_path / "new.ckpt").st_mode & 0o777 == 0o666 & ~mask

    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": torch.arange(3)}, str(tmp_path / "sub" / "c.ckpt"))
    assert torch.equal(io.load_checkpoint(str(tmp_path / "sub" / "c.ckpt"))["a"], torch.arange(3))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        io.load_checkpoint(str(tmp_path / "missing.ckpt"))


def _as_if_saved_on_cuda(src: Path, dst: Path) -> None:
    """Rewrite a torch.save zip so its storages say "cuda:0", as a GPU run's checkpoint does."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):  # protocol-2 pickle: BINUNICODE opcode, 4-byte length, text
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(name, data)


def test_checkpoint_io_opens_a_gpu_checkpoint_on_the_cpu(tmp_path):
    # Lightning calls load_checkpoint without map_location (resume, validate/test/predict --ckpt_path).
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, tmp_path / "cpu.ckpt")
    _as_if_saved_on_cuda(tmp_path / "cpu.ckpt", tmp_path / "gpu.ckpt")
    if not torch.cuda.is_available():  # the rewritten file really is a CUDA checkpoint
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.ckpt", weights_only=True)
    w = AtomicCheckpointIO().load_checkpoint(str(tmp_path / "gpu.ckpt"))["state_dict"]["w"]
    assert w.device.type == "cpu" and torch.equal(w, torch.arange(3.0))


def test_checkpoint_callback_removes_temp_files_of_killed_saves(tmp_path):
    stale = tmp_path / ".last.ckpt.k3j_9x2a.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"partial")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("not ours")
    trainer = quiet_trainer(tmp_path, 1, [ModelCheckpoint(str(tmp_path / "m.ckpt"))])
    trainer.fit(ScriptedModule(script=[1.0]))
    assert not stale.exists()
    assert unrelated.exists()
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ----------------------------------------------------------------------------------------- resuming


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


def test_resolve_ckpt_path(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    assert resolve_ckpt_path(None, ckpt_dir) is None
    with pytest.raises(FileNotFoundError, match="last.ckpt does not exist"):
        resolve_ckpt_path("last", ckpt_dir)
    assert resolve_ckpt_path("auto", ckpt_dir) is None  # nothing to resume: a new run
    with pytest.raises(FileNotFoundError, match="other.ckpt"):
        resolve_ckpt_path(str(tmp_path / "other.ckpt"), ckpt_dir)
    # A real run, so the test also checks that ModelCheckpoint writes last.ckpt where resolve_ckpt_path looks.
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


@pytest.mark.slow
def test_run_killed_with_sigkill_mid_epoch_resumes(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.training.killed_run", str(ckpt_dir)],
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
