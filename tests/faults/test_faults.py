"""Faults that must lose nothing, through the real command on configs/faster_rcnn.yaml (and classifier.yaml,
retinanet.yaml for the wrong-model cases) shrunk in size only: a full disk during a checkpoint write, a
non-finite loss, an unwritable run folder, truncated checkpoints, a checkpoint of another model, and one of
another litvision checkpoint format.

Each case starts from a finished run's ``last.ckpt`` and ``best.ckpt``, makes the fault, and asserts that the
command fails (exit status non-zero; a one-line usage error naming the file where the file or the disk is the
user's), and that both checkpoints are byte for byte as they were and still load (``training.saving.load_model``).

Injected faults: ENOSPC is raised by the file object ``training.checkpoint_io.atomic_write`` writes through, half-way
through a checkpoint; EACCES by its creation of the temporary file (the tests run as root, where chmod 0o500 does
not stop writes; a folder that is a file is the uninjected case); the non-finite losses by the loss functions at
the resumed run's second step.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import training.checkpoint_io as checkpoint_io
from tests.test_resume_shipped import fit_args  # a shipped config shrunk in size only
from training.checkpoint_io import LITVISION_KEY, CheckpointFileError
from training.saving import load_model


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_train(*args) -> tuple[int, str]:
    """``train.py ARGS`` in this process, for a module fixture (``train_py`` is per test): (status, stderr)."""
    import io

    from train import main

    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["train.py"])
        patch.setattr(sys, "stderr", err)
        try:
            main([str(a) for a in args])
            return 0, err.getvalue()
        except SystemExit as e:
            return (e.code if isinstance(e.code, int) else 1), err.getvalue()


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    """config -> the runs folder of a finished one-epoch run of it, made once for the module."""
    made: dict[str, Path] = {}

    def get(config: str) -> Path:
        if config not in made:
            runs = tmp_path_factory.mktemp(config) / "runs"
            code, err = run_train(*fit_args(config, shapes_dir, runs, 1))
            assert code == 0, err[-3000:]
            made[config] = runs
        return made[config]

    return get


class Run:
    """A copy of a finished one-epoch run of ``config``: its checkpoints and their contents before the fault."""

    def __init__(self, runs: Path, config: str, shapes_dir, tmp_path: Path):
        self.config, self.shapes_dir, self.runs = config, shapes_dir, tmp_path / "runs"
        shutil.copytree(runs, self.runs)
        self.dir = self.runs / config / "checkpoints"
        self.last, self.best = self.dir / "last.ckpt", self.dir / "best.ckpt"
        self.before = {p: digest(p) for p in (self.last, self.best)}

    def args(self, epochs: int = 2) -> list[str]:
        return fit_args(self.config, self.shapes_dir, self.runs, epochs)

    def assert_nothing_lost(self) -> None:
        """last.ckpt and best.ckpt unchanged and loadable; no temporary file left beside them."""
        for path, before in self.before.items():
            assert digest(path) == before, f"{path.name} changed"
            load_model(path)
        assert not [p.name for p in self.dir.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def faster_rcnn_run(trained, shapes_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return Run(trained("faster_rcnn"), "faster_rcnn", shapes_dir, tmp_path)


def one_line_error(err: str, path) -> str:
    """The usage error's line, which must name ``path``; no traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and str(path) in lines[0], err[-3000:]
    return lines[0]


# -- a disk that fills, a folder that cannot be written -----------------------------------------------------


class FailingFile:
    """A file object that writes ``limit`` bytes, then fails as a full disk does."""

    def __init__(self, file, limit: int):
        self.file, self.limit = file, limit

    def write(self, data) -> int:
        if self.limit < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.limit -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_during_a_checkpoint_write_names_the_file_and_keeps_the_previous(faster_rcnn_run, train_py,
                                                                                    monkeypatch):
    run = faster_rcnn_run
    limit = run.last.stat().st_size // 2  # the disk fills half-way through a checkpoint

    def save(obj, path) -> None:
        checkpoint_io.atomic_write(path, lambda f: torch.save(obj, FailingFile(f, limit)))

    monkeypatch.setattr(checkpoint_io, "atomic_torch_save", save)
    code, _, err = train_py(*run.args(), "--ckpt_path", "last")
    assert code == 2
    line = one_line_error(err, run.dir)
    assert "No space left on device" in line and "unchanged" in line
    run.assert_nothing_lost()


@pytest.mark.slow
def test_an_unwritable_checkpoint_folder_names_the_file_and_keeps_the_previous(faster_rcnn_run, train_py,
                                                                              monkeypatch):
    """As root, chmod 0o500 does not stop writes: creating the temporary file fails as it would without root."""
    run = faster_rcnn_run

    def mkstemp(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), dir)

    monkeypatch.setattr(checkpoint_io, "tempfile", SimpleNamespace(mkstemp=mkstemp))
    code, _, err = train_py(*run.args(), "--ckpt_path", "last")
    assert code == 2
    line = one_line_error(err, run.dir)
    assert "Permission denied" in line
    run.assert_nothing_lost()


@pytest.mark.slow
def test_a_checkpoint_folder_that_is_a_file_is_refused_before_training(shapes_dir, tmp_path, train_py, monkeypatch):
    """A checkpoint folder that cannot be made (a file has its name): refused before any step, naming the file; the
    file is kept and the new run leaves no log folder."""
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    blocker = runs / "faster_rcnn" / "checkpoints"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("the user's")
    code, _, err = train_py(*fit_args("faster_rcnn", shapes_dir, runs, 1))
    assert code == 2
    assert "is a file, not a folder" in one_line_error(err, blocker)
    assert blocker.read_text() == "the user's"
    assert sorted(p.name for p in blocker.parent.iterdir()) == ["checkpoints"]


@pytest.mark.slow
def test_a_run_folder_under_a_file_is_a_usage_error(shapes_dir, tmp_path, train_py, monkeypatch):
    """A run folder that cannot be made (its parent is a file): an error that names it, nothing left behind."""
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("the user's")
    code, _, err = train_py(*fit_args("faster_rcnn", shapes_dir, blocker / "runs", 1))
    assert code == 2
    one_line_error(err, blocker)
    assert blocker.read_text() == "the user's"


# -- a non-finite loss ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_checkpoints(value, faster_rcnn_run, train_py, monkeypatch):
    """The loss turns non-finite at the resumed run's second step (global step 3): the run stops there, naming the
    step and the images, before anything is saved from the diverged weights."""
    import detectors.module

    run = faster_rcnn_run
    losses = detectors.module.training_losses
    steps = []

    def diverging(model, images, targets):
        steps.append(len(steps))
        result = losses(model, images, targets)
        return {k: v * value for k, v in result.items()} if len(steps) == 2 else result

    monkeypatch.setattr(detectors.module, "training_losses", diverging)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step 3 \(image ids \[\d+, \d+\]\)"):
        train_py(*run.args(), "--ckpt_path", "last")
    run.assert_nothing_lost()


@pytest.mark.slow
def test_a_non_finite_classifier_loss_stops_the_run_and_keeps_the_checkpoints(trained, shapes_dir, tmp_path,
                                                                             train_py, monkeypatch):
    run = Run(trained("classifier"), "classifier", shapes_dir, tmp_path)
    forward = torch.nn.CrossEntropyLoss.forward
    calls = []

    def diverging(self, logits, labels):
        calls.append(self.training)
        loss = forward(self, logits, labels)
        return loss * float("nan") if calls.count(True) == 2 and self.training else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", diverging)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at step 3 "):
        train_py(*run.args(), "--ckpt_path", "last")
    run.assert_nothing_lost()


# -- checkpoints that cannot be used ------------------------------------------------------------------------


def truncation_offsets(size: int) -> list[int]:
    return sorted(random.Random(20).sample(range(1, size), 10))


@pytest.mark.slow
def test_truncated_checkpoints_are_refused_naming_the_file(faster_rcnn_run, train_py):
    run = faster_rcnn_run
    data = run.last.read_bytes()
    for offset in truncation_offsets(len(data)):
        truncated = run.dir / f"truncated_{offset}.ckpt"
        truncated.write_bytes(data[:offset])
        with pytest.raises(CheckpointFileError, match=re.escape(str(truncated))):
            load_model(truncated)
        code, _, err = train_py(*run.args(), "--ckpt_path", truncated)
        assert code == 2, offset
        assert "truncated or corrupt" in one_line_error(err, truncated)
        assert truncated.read_bytes() == data[:offset]  # the user's file is left as it is
        run.assert_nothing_lost()


@pytest.mark.slow
@pytest.mark.parametrize("other", ["classifier", "retinanet"])
def test_a_checkpoint_of_another_model_is_refused_naming_the_file(other, faster_rcnn_run, trained, train_py):
    run = faster_rcnn_run
    foreign = run.dir / f"{other}.ckpt"
    shutil.copy(trained(other) / other / "checkpoints" / "last.ckpt", foreign)
    for command in ("fit", "validate"):
        args = run.args() if command == "fit" else ["validate", *run.args()[1:]]
        code, _, err = train_py(*args, "--ckpt_path", foreign)
        assert code == 2, command
        line = one_line_error(err, foreign)
        assert "FasterRCNNModule" in line and ("Classifier" in line if other == "classifier" else "RetinaNet" in line)
    run.assert_nothing_lost()


def test_a_checkpoint_of_another_format_version_is_refused_naming_the_file(faster_rcnn_run, train_py):
    run = faster_rcnn_run
    checkpoint = torch.load(run.last, weights_only=True)
    assert checkpoint[LITVISION_KEY]["format"] == 1  # what this litvision writes (docs/training.md)
    checkpoint[LITVISION_KEY]["format"] = 2
    other = run.dir / "format_2.ckpt"
    torch.save(checkpoint, other)
    with pytest.raises(CheckpointFileError, match=re.escape(str(other)) + ".*format 2.*reads format 1"):
        load_model(other)
    code, _, err = train_py(*run.args(), "--ckpt_path", other)
    assert code == 2
    assert "open it with the litvision version that wrote it" in one_line_error(err, other)
    run.assert_nothing_lost()
