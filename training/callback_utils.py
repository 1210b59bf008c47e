"""What the Keras callbacks of ``training.callbacks`` share: tf-keras' ``mode="auto"`` rule, the checkpoint
filepath template, the RNG states a checkpoint carries, printing, and agreeing across DDP processes."""

from __future__ import annotations

import os
import random
import re
import string
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

from training.errors import BadValueError

# Name tokens of metrics where larger is better (mode="auto"), besides tf-keras' own "acc" substring.
_MAX_TOKEN = re.compile(r"m?ap\d*|mar\d*|f1|precision|recall|m?iou")


def resolve_mode(mode: str, monitor: str) -> Literal["min", "max"]:
    """``"min"``/``"max"`` as given; ``"auto"``: max for accuracy/mAP/mAR/AP/F1/precision/recall/IoU.

    "auto" follows tf-keras (name contains "acc" or starts with "fmeasure") and also treats as max a name
    token (split at ``_ / - .``) that is map/mar/ap/f1/precision/recall/iou, optionally followed by
    digits (``val_map_50``, ``val_ap/cat``, ``map50``, ``val_mar_100``); anything else is min.
    """
    if mode in ("min", "max"):
        return mode  # type: ignore[return-value]
    if mode != "auto":
        raise BadValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    name = monitor.lower()
    if "acc" in name or name.startswith("fmeasure"):
        return "max"
    tokens = [t for t in re.split(r"[^a-z0-9]+", name) if t]
    return "max" if any(_MAX_TOKEN.fullmatch(t) for t in tokens) else "min"


def lr_above_min_lr(lr: float, min_lr: float) -> bool:
    """tf-keras ReduceLROnPlateau's test before a reduction: ``old_lr > np.float32(min_lr)`` with its float32
    LR, so both sides are compared as float32. An LR within float32 rounding of ``min_lr`` has reached it:
    lr 0.1, factor 0.1, min_lr 1e-3 stops at 0.0010000000000000002 (float32 0.001) instead of "reducing" it
    to 0.001 every ``patience`` epochs."""
    return bool(np.float32(lr) > np.float32(min_lr))


def same_on_every_process(trainer: Trainer, value: Any) -> float | None:
    """Process 0's value of a monitored metric (None if it has none), on every process. Under DDP a metric
    logged without ``sync_dist`` differs between processes; decisions taken on it must not: a checkpoint
    saved by some processes only deadlocks in its barrier, and per-process LR reductions make the replicas
    drift apart."""
    value = None if value is None else float(value)
    return trainer.strategy.broadcast(value) if trainer.world_size > 1 else value


def say(trainer: Trainer, message: str) -> None:
    """Print like tf-keras' print_msg (on process 0), without breaking a tqdm progress bar."""
    if not trainer.is_global_zero:
        return
    if isinstance(trainer.progress_bar_callback, TQDMProgressBar):
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        Tqdm.write(message)
    else:  # no bar, or rich (whose live display redirects stdout above the bar)
        print(message, flush=True)


# ----------------------------------------------------------------------------------------- file names


class FilepathKeyError(BadValueError, KeyError):
    """A ``{key}`` of the checkpoint filepath template that was not logged."""

    def __str__(self) -> str:  # KeyError would show the message quoted
        return str(self.args[0])


def split_filepath(filepath: str | os.PathLike) -> tuple[str, str]:
    """``(directory, file name template)`` of a ModelCheckpoint filepath; refuses a template that cannot
    name files (no file name, ``{fields}`` in the directory, unnamed or malformed fields)."""
    filepath = os.fspath(filepath)
    directory, name = os.path.split(filepath)
    if not name:
        raise BadValueError(f"ModelCheckpoint filepath must name a file, got {filepath!r}")
    if "{" in directory or "}" in directory:
        raise BadValueError(f"ModelCheckpoint filepath {filepath!r}: only the file name may contain {{fields}}")
    template_keys(name)
    return directory, name


def template_keys(template: str) -> list[str]:
    """The keys a ``str.format`` template reads (``{val_loss:.2f}`` -> ``val_loss``)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise BadValueError(f"ModelCheckpoint filepath {template!r} is not a valid template: {e}") from None
    keys = [re.split(r"[.\[]", f, maxsplit=1)[0] for f in fields]
    if "" in keys:
        raise BadValueError(f"ModelCheckpoint filepath {template!r}: use named fields like {{epoch:02d}}, not {{}}")
    return keys


def format_filepath(template: str, values: dict[str, Any]) -> str:
    """Keras ``filepath.format(epoch=..., **logs)``, but a missing key is an error naming it and the
    available keys (Lightning would silently write 0)."""
    values = {
        k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in values.items()
    }
    for key in template_keys(template):
        if key not in values:
            raise FilepathKeyError(
                f"ModelCheckpoint filepath {template!r} uses {{{key}}}, which is not logged"
                f" at epoch {values.get('epoch', '?')}; available keys: {', '.join(sorted(values))}"
            )
    try:
        return template.format(**values)
    except (ValueError, TypeError, IndexError, AttributeError) as e:
        raise BadValueError(
            f"ModelCheckpoint filepath {template!r} cannot be formatted with {values}: {e}"
        ) from None


def filepath_of_process_0(trainer: Trainer, format_name: Callable[[], str]) -> str:
    """``format_name()`` as process 0 computes it, on every process: template values may differ between
    processes (metrics logged without sync_dist), or be missing on one of them. Process 0's refusal is
    raised on every process, so that none waits for the others in a barrier."""
    if trainer.world_size <= 1:
        return format_name()
    try:
        path, error = format_name(), None
    except ValueError as e:  # the template's refusals (FilepathKeyError, BadValueError)
        path, error = None, (isinstance(e, FilepathKeyError), str(e))
    path, error = trainer.strategy.broadcast((path, error))
    if error is not None:
        raise (FilepathKeyError if error[0] else BadValueError)(error[1])
    return path


# ----------------------------------------------------------------------------------------- RNG state


def capture_rng_states() -> dict[str, Any]:
    """Python, NumPy and torch (CPU, CUDA) RNG states as plain data + tensors (weights_only-loadable)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the RNGs to ``states`` from :func:`capture_rng_states` (CUDA only on the same number of GPUs)."""
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
