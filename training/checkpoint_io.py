"""Checkpoint files on disk: atomic writes, safe reads, and the lookups done before resuming.

Every litvision checkpoint is a dict written by ``torch.save``: a Lightning checkpoint, plus the
``litvision`` entry ``{"class_path": "pkg.mod.Class", "format": 1, "logger_version": ...}`` that
``training.saving`` adds (see there for what a file holds and how ``load_model`` rebuilds its model).

Atomicity: every write goes to a temporary file in the target's directory, is flushed and fsynced, then
``os.replace``d over the target, so a crash or a full disk mid-save never leaves a truncated file where a
good one was. Lightning's own ``TorchCheckpointIO`` stages through ``/tmp`` with ``shutil.move`` (a copy,
not a rename, when /tmp is another filesystem) and does not fsync; :class:`AtomicCheckpointIO` replaces it.

Safety: files are read with ``torch.load(weights_only=True)`` only, so a file holding arbitrary pickled
objects is refused before any of its code runs.
"""

from __future__ import annotations

import errno
import functools
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from training.errors import BadFileError, MissingFileError, UsageError

# The checkpoint entry litvision writes next to Lightning's: the model's class path, the file format and
# the logger version of the run that wrote it.
LITVISION_KEY = "litvision"
# The layout of the files litvision writes; a file of another format is refused, not misread.
FORMAT_VERSION = 1


class CheckpointFileError(UsageError, ValueError):
    """A checkpoint/model file that is truncated, corrupt, unsafe or not a litvision model. Names the file."""


class WeightsOnlyCheckpointError(CheckpointFileError):
    """Training was asked to resume from a file that holds weights only."""


# ----------------------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """``write(file)`` into a temp file in ``path``'s directory, fsync, then ``os.replace`` it over ``path``:
    readers see the old file or the whole new one, never a partial write (crash, full disk, SIGKILL).

    A write the system refuses (a full disk, a folder that cannot be written) raises ``BadFileError`` naming
    ``path``: the disk and the folder are the user's to fix, and the file there before is unchanged."""
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would have, or the one it replaces.
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # torch.save reports a failed write of its file object as a RuntimeError raised while handling it.
        cause = next((c for c in _chain(e) if isinstance(c, OSError)), None)
        if cause is not None and not isinstance(cause, UsageError):
            raise _write_error(path, cause) from e
        raise
    _fsync_dir(directory)


def _chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, at most a few deep."""
    chain: list[BaseException] = []
    while error is not None and len(chain) < 8:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _write_error(path: str, error: OSError) -> BadFileError:
    code = errno.errorcode.get(error.errno) if isinstance(error.errno, int) else None
    reason = (error.strerror or str(error)) + (f" ({code})" if code else "")
    kept = "the file there before is unchanged" if os.path.exists(path) else "nothing was written"
    return BadFileError(f"cannot write {path}: {reason}; {kept}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


# atomic_write's temporary names: "." + target name + "." + mkstemp's 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temp_files(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files that saves killed mid-write (SIGKILL, power loss) left in ``directory``.

    Only call it when no other process is saving into ``directory``. Returns the paths removed.
    """
    removed = []
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if _TEMP_NAME.fullmatch(name):
                path = os.path.join(directory, name)
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
    return removed


def check_writable_folder(directory: str | os.PathLike, what: str) -> None:
    """A ``BadFileError`` naming ``what`` and ``directory`` when no file could be written there (a file in its
    path, or a folder this user cannot write), so that no work is done for nothing. Makes nothing."""
    existing = os.path.abspath(os.fspath(directory))
    while not os.path.exists(existing):  # the part of the path that exists (a file stops it)
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        problem = "cannot be written" if os.path.isdir(existing) else "is a file, not a folder"
        raise BadFileError(f"{what} {os.fspath(directory)}: cannot be written: {existing} {problem}")


def prepare_checkpoint_folder(directory: str | os.PathLike) -> None:
    """Before a run saves into ``directory``: :func:`check_writable_folder`, then
    :func:`remove_stale_temp_files`. A run that fails before saving leaves no folder behind."""
    check_writable_folder(directory, "checkpoint folder")
    remove_stale_temp_files(directory)


@functools.cache
def _umask() -> int:
    # os.umask can only be read by setting it; done once, at the first save.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` with atomic local writes and safe, clearly failing reads.

    ``ModelCheckpoint`` installs it on ``setup`` when the trainer uses the plain default; pass
    ``Trainer(plugins=[AtomicCheckpointIO()])`` to have it everywhere. Remote (``scheme://``) paths fall
    back to Lightning's implementation.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if _is_remote(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Lightning passes no map_location: "cpu" as its own default does, so a GPU run's checkpoint opens on
        # a CPU machine and DDP processes do not all load it onto cuda:0 (the strategy moves the weights).
        if _is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        # weights_only is always True: the project never unpickles arbitrary objects.
        return load_checkpoint_file(path, map_location=map_location)


def use_atomic_checkpoint_io(trainer: Any) -> None:
    """Swap the trainer's plain default ``TorchCheckpointIO`` for :class:`AtomicCheckpointIO`."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def _is_remote(path: Any) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


# ----------------------------------------------------------------------------------------- reading


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint dict with ``torch.load(weights_only=True)``; every failure names the file.

    ``mmap=True`` maps the file instead of reading it: tensors are read only when touched, for lookups of a
    checkpoint's hyperparameters or step (half the time of a whole read on a 479 MB ResNet-50 ``last.ckpt``,
    docs/benchmarks.md, "Reading a checkpoint before resuming"). Files in torch's pre-1.6 format cannot be
    mapped and are read whole.

    Raises ``MissingFileError`` (a ``FileNotFoundError``), ``CheckpointFileError`` (unsafe pickled objects,
    truncated or corrupt data, not a dict).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"Checkpoint file not found: {path}")
    try:
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and str(e).startswith("mmap can only be used")):  # the legacy format cannot be mapped
                raise
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        if "GLOBAL" in detail:  # weights_only met a reference to a Python callable/class
            raise CheckpointFileError(
                f"{path}: refused to load: the file contains pickled Python objects other than tensors and "
                "plain data (numbers, strings, lists, dicts), and loading them could run code. Nothing from "
                f"it was executed. Detail: {detail}"
            ) from None
        raise CheckpointFileError(f"{path}: truncated or corrupt checkpoint file ({detail})") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, IndexError, KeyError) as e:
        # IndexError/KeyError: torch's weights-only unpickler on a malformed legacy (non-zip) stream.
        raise CheckpointFileError(
            f"{path}: truncated or corrupt checkpoint file, cannot be read ({type(e).__name__}: {_first_line(e)})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointFileError(
            f"{path}: not a checkpoint (holds a {type(checkpoint).__name__}, not a dict)"
        )
    _check_format(checkpoint, path)
    return checkpoint


def _check_format(checkpoint: Mapping[str, Any], path: str) -> None:
    """Refuse a file of another litvision format (a file without the entry is a plain Lightning checkpoint)."""
    info = checkpoint.get(LITVISION_KEY)
    version = info.get("format", FORMAT_VERSION) if isinstance(info, Mapping) else FORMAT_VERSION
    if version != FORMAT_VERSION:
        raise CheckpointFileError(
            f"{path}: written in litvision checkpoint format {version!r}, and this litvision reads format "
            f"{FORMAT_VERSION} only: open it with the litvision version that wrote it, or retrain"
        )


def _unpickler_detail(e: BaseException) -> str:
    """The informative line of torch's long weights_only error (which names the offending global)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line
    return lines[-1] if lines else type(e).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------------- resuming


def check_resumable(checkpoint: Mapping[str, Any], path: Any) -> None:
    """Raise ``WeightsOnlyCheckpointError`` if ``checkpoint`` cannot resume training (no optimizer state)."""
    if "optimizer_states" not in checkpoint:
        raise WeightsOnlyCheckpointError(
            f"{path} holds weights only (architecture + weights, written with save_weights_only=True or "
            "save_model(weights_only=True)): it has no optimizer, LR-scheduler, loop or callback state, so "
            "training cannot resume from it. Resume from last.ckpt, or load it with "
            "training.saving.load_model() and start a new run."
        )


def resolve_ckpt_path(ckpt_path: str | os.PathLike | None, dirpath: str | os.PathLike | None) -> str | None:
    """Resolve ``--ckpt_path`` for resuming: ``None`` -> ``None``; ``"last"`` -> ``dirpath/last.ckpt``;
    ``"auto"`` -> ``dirpath/last.ckpt`` if it exists, else ``None`` (a new run).

    Unlike Lightning (which only warns and starts from scratch), a missing file is an error:
    ``MissingFileError`` naming the path or directory. ``"auto"`` is the explicit way to accept either.
    """
    if ckpt_path is None:
        return None
    name = os.fspath(ckpt_path)
    if name in ("last", "auto"):
        if dirpath is None:
            raise MissingFileError(f"--ckpt_path {name}: no checkpoint directory is configured to look in")
        last = os.path.join(os.fspath(dirpath), "last.ckpt")
        if os.path.isfile(last):
            return last
        if name == "auto":
            return None  # nothing to resume: a new run
        raise MissingFileError(
            f"--ckpt_path last: no last checkpoint to resume from: {last} does not exist. "
            "Run without --ckpt_path to start a new training run."
        )
    if not os.path.isfile(name):
        raise MissingFileError(f"--ckpt_path: checkpoint file not found: {name}")
    return name


def checkpoint_log_position(path: str | os.PathLike) -> tuple[int | str | None, int]:
    """(logger version, global step) of the run that wrote ``path``: a resumed run logs on in that version
    from that step, and whatever was logged at or after the step came from the steps it runs again."""
    checkpoint = load_checkpoint_file(path, mmap=True)
    info = checkpoint.get(LITVISION_KEY)
    return (info.get("logger_version") if isinstance(info, dict) else None), int(checkpoint.get("global_step", 0))
