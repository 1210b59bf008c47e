"""Keras callbacks with tf-keras meaning, as Lightning callbacks.

``ModelCheckpoint`` subclasses Lightning's (file handling, ``last.ckpt``, resume lookup stay Lightning's)
but decides what to save and prints what tf-keras prints: 1-based epochs in file names and messages,
``save_best_only`` on strict improvement, the missing-monitor warning. It also makes resuming exact:
it installs :class:`~training.checkpoint_io.AtomicCheckpointIO`, stores the RNG states (Python, NumPy,
torch) in its checkpoint state and restores them before the first resumed epoch, refuses to resume from a
weights-only file, and turns ``ckpt_path="last"`` without a last checkpoint into an error.

``ReduceLROnPlateau`` is tf-keras' algorithm (absolute ``min_delta``, reduction on the epoch where
``wait`` reaches ``patience``), not torch's. It acts on every param group of every optimizer at the end
of each real validation run (never during the sanity check), and its state is checkpointed.

Log the LR with Lightning's ``LearningRateMonitor(logging_interval="epoch")`` (keys ``lr-<Optimizer>``).
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal
from weakref import proxy

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from training.callback_utils import (
    capture_rng_states,
    filepath_of_process_0,
    format_filepath,
    lr_above_min_lr,
    resolve_mode,
    restore_rng_states,
    same_on_every_process,
    say,
    split_filepath,
)
from training.checkpoint_io import check_resumable, prepare_checkpoint_folder, use_atomic_checkpoint_io
from training.errors import BadValueError, MissingFileError

# ----------------------------------------------------------------------------------------- ModelCheckpoint


class ModelCheckpoint(LightningModelCheckpoint):
    """tf-keras ``ModelCheckpoint`` as a Lightning callback.

    The Keras rules: after each epoch's validation (or every ``save_freq`` training batches) the model is
    saved to ``filepath`` formatted with ``epoch`` (1-based) and the logged metrics. With
    ``save_best_only`` it is saved only when ``monitor`` is strictly better than the best so far (``mode``
    decides which way); a missing monitor warns and saves nothing. Nothing saved is ever deleted, and a
    file of the same name is overwritten. ``verbose=1`` prints tf-keras' lines: ``Epoch 5: val_loss
    improved from 0.40000 to 0.30000, saving model to ...``, ``... did not improve from ...``,
    ``Epoch 5: saving model to ...``.

    Beyond Keras, for resuming: the RNG states travel in ``last.ckpt`` (see ``save_last``) and are restored
    before the first resumed epoch, so a resumed run ends bit-identical to an uninterrupted one.

    Args:
        filepath: Keras-style template, e.g. ``ckpt/weights.{epoch:02d}-{val_loss:.2f}.ckpt``: ``epoch``
            is 1-based, ``batch`` (1-based, in the epoch) exists for step saves, ``step`` is the global
            step, and any logged metric may appear; a key that is not logged raises
            ``training.callback_utils.FilepathKeyError``.
            Only the file name may contain ``{}`` fields; ``last.ckpt`` goes to the same directory.
        monitor: metric compared by ``save_best_only``.
        verbose: 1 prints tf-keras' messages.
        save_best_only: save only when ``monitor`` strictly improves on the best so far (a templated
            filepath keeps one file per improvement, a fixed one is overwritten); False saves every time.
        save_weights_only: the saved files hold architecture + weights, no optimizer/trainer state
            (``load_model`` rebuilds them; resuming from them is refused). ``last.ckpt`` stays full.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (see :func:`training.callback_utils.resolve_mode`).
        save_freq: ``"epoch"`` or an int N: save every N training batches (optimizer steps; equal to
            batches without gradient accumulation) instead of at epoch end.
        initial_value_threshold: initial "best" value for ``save_best_only``.
        save_last: also keep ``last.ckpt`` (full state) up to date at every save and epoch end, and when a
            SIGTERM stops training between batches.
    """

    def __init__(
        self,
        filepath: str,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: Literal["epoch"] | int = "epoch",
        initial_value_threshold: float | None = None,
        save_last: bool = True,
    ) -> None:
        directory, name = split_filepath(filepath)
        if save_freq != "epoch" and (
            isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1
        ):
            raise BadValueError(f"save_freq must be 'epoch' or a positive int (batches), got {save_freq!r}")
        resolved = resolve_mode(mode, monitor)
        super().__init__(
            dirpath=directory or ".",
            filename=name,
            # Lightning's own monitor logic is bypassed; it only sees a monitor when one matters.
            monitor=monitor if save_best_only else None,
            verbose=bool(verbose),
            save_last=bool(save_last),
            save_top_k=-1,  # Keras never deletes what it saved
            save_weights_only=save_weights_only,
            mode=resolved,
            every_n_epochs=1,
            save_on_train_epoch_end=True,  # after validation, every epoch, like Keras' on_epoch_end
            enable_version_counter=False,  # Keras overwrites a file of the same name
        )
        self.keras_monitor = monitor
        self.keras_verbose = int(verbose)
        self.save_best_only = save_best_only
        self.save_freq = save_freq
        self.mode_requested = mode
        if initial_value_threshold is not None:
            self.best = float(initial_value_threshold)
        else:
            self.best = math.inf if resolved == "min" else -math.inf
        self._validated_epoch = -1  # the last epoch whose validation ran: its metrics are current
        self._pending_rng: dict[str, Any] | None = None  # loaded from a checkpoint, restored at fit start

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            filename=self.filename, monitor=self.keras_monitor, save_freq=self.save_freq
        )

    # --- when to save (the Keras rules)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.save_freq == "epoch" or self._skip(trainer):
            return
        step = trainer.global_step
        if step % self.save_freq != 0 or step == self._last_global_step_saved:  # accumulation repeats steps
            return
        self._keras_save(trainer, batch=batch_idx + 1)
        self._save_last_checkpoint(trainer, {})

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._skip(trainer):
            return
        if self.save_freq == "epoch":
            self._keras_save(trainer)
        # Always at epoch end, so last.ckpt holds this epoch's validation results and LR changes.
        self._save_last_checkpoint(trainer, {})

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning stops after the current batch on SIGTERM (a scheduler's preemption): keep that progress in
        # last.ckpt, so `--ckpt_path last|auto` continues from this step, not from the last epoch end. Only
        # between training batches (a half-run validation is not resumable), and never the Keras-named file,
        # which only save_best_only's rule writes.
        if (isinstance(exception, SIGTERMException) and not self._skip(trainer)
                and trainer.state.stage == RunningStage.TRAINING):  # fmt: skip
            self._save_last_checkpoint(trainer, {})

    def _skip(self, trainer: Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.state.fn != "fit" or trainer.sanity_checking

    def _keras_save(self, trainer: Trainer, batch: int | None = None) -> None:
        """Keras' ``_save_model``: save, or with ``save_best_only`` save if ``monitor`` improved."""
        values = self._template_values(trainer, batch)
        filepath = filepath_of_process_0(trainer, lambda: self.format_checkpoint_name(values))
        epoch = trainer.current_epoch + 1
        if not self.save_best_only:
            if self.keras_verbose:
                say(trainer, f"Epoch {epoch}: saving model to {filepath}")
            self.best_model_path = filepath  # "best" = latest, as Lightning's monitor=None
            self._save_checkpoint(trainer, filepath)
            return
        current = same_on_every_process(trainer, values.get(self.keras_monitor))
        if current is None:
            rank_zero_warn(f"Can save best model only with {self.keras_monitor} available, skipping.")
            return
        if not self._improved(current):
            if self.keras_verbose:
                say(trainer, f"Epoch {epoch}: {self.keras_monitor} did not improve from {self.best:.5f}")
            return
        if self.keras_verbose:
            say(trainer, f"Epoch {epoch}: {self.keras_monitor} improved from {self.best:.5f} to {current:.5f},"
                         f" saving model to {filepath}")
        self.best = current
        self.current_score = self.best_model_score = torch.tensor(current)
        self.best_model_path = filepath
        self.best_k_models[filepath] = self.best_model_score
        self._save_checkpoint(trainer, filepath)

    def _improved(self, current: float) -> bool:
        return current < self.best if self.mode == "min" else current > self.best

    def _template_values(self, trainer: Trainer, batch: int | None) -> dict[str, Any]:
        """The filepath template's values: logged metrics, ``epoch`` (1-based), ``step``, ``batch``."""
        values = dict(trainer.callback_metrics)
        if self._validated_epoch != trainer.current_epoch:
            # Validation did not run this epoch: its metrics are from an earlier one (Keras has none).
            values = {k: v for k, v in values.items() if not k.startswith("val")}
        values.update(epoch=trainer.current_epoch + 1, step=trainer.global_step)
        if batch is not None:
            values["batch"] = batch
        return values

    # --- resuming

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Lightning's setup only resolves dirpath (ours is given) and warns about a non-empty directory,
        # which is the normal case when resuming; Keras overwrites without a word.
        from lightning.fabric.utilities.cloud_io import get_filesystem

        self._fs = get_filesystem(self.dirpath)
        use_atomic_checkpoint_io(trainer)
        if stage == "fit" and trainer.is_global_zero and not trainer.fast_dev_run:
            # refused before training when it cannot be written; temporary files left by a run killed while saving
            # removed (a fast_dev_run saves nothing and may share a live run's folder)
            prepare_checkpoint_folder(self.dirpath)
        if stage == "fit" and self.save_best_only and self.mode_requested == "auto":
            rank_zero_info(
                f"ModelCheckpoint: mode='auto' chose '{self.mode}' for monitor '{self.keras_monitor}'"
            )

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":
            check_resumable(checkpoint, trainer.ckpt_path)
        # The RNG states from whichever of our checkpoint callbacks saved them, so that a changed
        # filepath (another state_key) does not silently make the resumed run inexact.
        states = (checkpoint.get("callbacks") or {}).values()
        self._pending_rng = next(
            (s["rng_states"] for s in states if isinstance(s, dict) and "rng_states" in s), None
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the checkpoint is restored and before the train dataloader iterator draws its seeds,
        # so the resumed run draws the same random numbers as an uninterrupted one.
        if self._pending_rng is not None:
            restore_rng_states(self._pending_rng)
            self._pending_rng = None

    def state_dict(self) -> dict[str, Any]:
        # RNG states are captured now, at save time: the next draws are those of the next epoch.
        return {**super().state_dict(), "keras_best": self.best, "rng_states": capture_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best = float(state_dict.get("keras_best", self.best))
        self.current_score = state_dict.get("current_score", self.current_score)  # Lightning saves, never restores it
        self._pending_rng = state_dict.get("rng_states")

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        # Lightning calls this only for ckpt_path="last"; it would warn and train from scratch.
        found = super()._find_last_checkpoints(trainer)
        if not found:
            raise MissingFileError(
                f'ckpt_path="last": there is no last checkpoint to resume from in {self.dirpath} '
                "(no last.ckpt). Run without ckpt_path to start a new training run."
            )
        return found

    # --- Lightning's file writing, with Keras' names

    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None,
                               ver: int | None = None, prefix: str | None = None) -> str:
        if filename is None:
            name = format_filepath(self.filename, metrics)
        else:  # Lightning's last checkpoint name
            name = filename + (f"{self.CHECKPOINT_JOIN_CHAR}v{ver}" if ver is not None else "") + self.FILE_EXTENSION
        return os.path.join(self.dirpath, name)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # As Lightning's, except that last.ckpt is always a full checkpoint, for resuming.
        trainer.save_checkpoint(
            filepath, weights_only=self.save_weights_only and filepath != self.last_model_path
        )
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


# ----------------------------------------------------------------------------------------- ReduceLROnPlateau


class ReduceLROnPlateau(Callback):
    """tf-keras ``ReduceLROnPlateau``: multiply the LR by ``factor`` when ``monitor`` stops improving.

    At the end of each validation run: in cooldown, the cooldown counter is decremented and ``wait``
    reset; if the value beats ``best`` by more than ``min_delta`` (absolute) it becomes the best and
    ``wait`` resets; otherwise, out of cooldown, ``wait`` grows and on reaching ``patience`` every
    param group above ``min_lr`` (compared in float32, as tf-keras does) gets ``lr = max(lr * factor, min_lr)``,
    then ``wait`` resets and the cooldown starts. E.g. a flat ``val_loss`` with ``patience=3`` reduces at
    epochs 4, 7, 10.

    LR schedulers with ``base_lrs`` (LambdaLR warm-up, cosine...) get their base LRs scaled by the same
    ratio, so a scheduler that recomputes the LR from them keeps the reduction.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        if factor >= 1.0:
            raise BadValueError(f"ReduceLROnPlateau does not support a factor >= 1.0. Got {factor}")
        self.monitor = monitor
        self.factor = factor
        self.patience = patience
        self.verbose = int(verbose)
        self.mode_requested = mode
        self.mode = resolve_mode(mode, monitor)
        self.min_delta = abs(min_delta)
        self.cooldown = cooldown
        self.min_lr = min_lr
        self._reset()

    def _reset(self) -> None:
        self.best, self.wait, self.cooldown_counter = (math.inf if self.mode == "min" else -math.inf), 0, 0

    def _improved(self, current: float) -> bool:
        if self.mode == "min":
            return current < self.best - self.min_delta
        return current > self.best + self.min_delta

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset()  # Keras resets on train begin; a resumed run then loads its saved state
            if self.mode_requested == "auto":
                rank_zero_info(
                    f"ReduceLROnPlateau: mode='auto' chose '{self.mode}' for monitor '{self.monitor}'"
                )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keras' ``on_epoch_end``, run after each real validation (epochs without one do not count)."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        current = same_on_every_process(trainer, trainer.callback_metrics.get(self.monitor))
        if current is None:
            rank_zero_warn(f"Learning rate reduction is conditioned on metric `{self.monitor}` which is not available."
                           f" Available metrics are: {','.join(trainer.callback_metrics)}")
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._improved(current):
            self.best, self.wait = current, 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            # With every group at min_lr nothing is reduced: wait keeps growing, no cooldown (as in tf-keras).
            if self.wait >= self.patience and self._reduce(trainer):
                self.cooldown_counter, self.wait = self.cooldown, 0

    def _reduce(self, trainer: Trainer) -> list[float]:
        """Reduce every param group above ``min_lr``, say so; return the new LRs of the groups reduced."""
        new_lrs = []
        for optimizer in trainer.optimizers:
            schedulers = [
                c.scheduler
                for c in trainer.lr_scheduler_configs
                if getattr(c.scheduler, "optimizer", None) is optimizer and hasattr(c.scheduler, "base_lrs")
            ]
            for i, group in enumerate(optimizer.param_groups):
                old = float(group["lr"])
                if not lr_above_min_lr(old, self.min_lr):
                    continue
                new = max(old * self.factor, self.min_lr)
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(new)
                else:
                    group["lr"] = new
                for scheduler in schedulers:
                    scheduler.base_lrs[i] *= new / old
                new_lrs.append(new)
        if new_lrs and self.verbose:
            shown = new_lrs[0] if len(set(new_lrs)) == 1 else new_lrs
            say(trainer, f"Epoch {trainer.current_epoch + 1}: ReduceLROnPlateau reducing learning rate to {shown}.")
        return new_lrs

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.wait = float(state_dict["best"]), int(state_dict["wait"])
        self.cooldown_counter = int(state_dict["cooldown_counter"])
