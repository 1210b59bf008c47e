"""litvision's training steps against a raw ``torch.autocast`` loop on the same model, in the same process.

:class:`RawLoopAlternation` is a Lightning callback added to ``train.py fit`` (``--trainer.callbacks+``). It
times the fit's steps in blocks of ``block`` steps, and after each of the first ``rounds`` blocks it runs
``block`` steps of :class:`RawLoop`, a plain torchvision training loop, on the module's own torchvision model,
with batches from the same DataModule's train loader. The two alternate, so both see the same GPU clocks,
allocator state and data-loading load; the first round (warm-up: CUDA kernels, allocator, optimiser state)
is left out by :func:`speed_summary`.

What each block's time covers, on both sides: ``block`` optimiser steps and the loading of ``block - 1``
batches (Lightning fetches a step's batch before ``on_train_batch_start``; the raw loop fetches its first
batch before its clock starts), from one CUDA synchronisation to another.

The raw steps leave the fit as it was: the weights and buffers, the CPU and CUDA RNG states are saved before
a raw block and restored after it, and the raw loop has its own optimiser, LR schedulers and GradScaler. A fit
with this callback therefore trains the same model as one without it (tests/bench/test_gpu_check.py).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from detectors.module import _loss_targets
from training.optim import set_cosine_length

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RawLoop:
    """A plain torchvision training loop on ``module.model``, the way torchvision's detection reference trains:
    ``torch.autocast`` around ``model(images, targets)`` (so its RPN and box heads run in half precision, where
    litvision's ``training_losses`` keeps them float32), the loss sum, backward (through a GradScaler under
    16-mixed), gradient-norm clipping at the Trainer's ``gradient_clip_val``, the optimiser step and the
    per-step LR schedulers. Optimiser and schedulers are the module's own ``configure_optimizers()``, built
    afresh, so both sides run the same optimiser kind over the same parameter groups.

    Batches: ``(images, targets)`` from ``trainer.datamodule.train_dataloader()``; images FloatTensor[3, H, W]
    in 0..1, targets ``boxes`` FloatTensor[N, 4] x1 y1 x2 y2 absolute pixels, ``labels`` Int64Tensor[N].
    """

    def __init__(self, trainer, module) -> None:
        self.model, self.device = module.model, module.device
        precision = str(trainer.precision)  # what Lightning runs (it turns 16-mixed into bf16-mixed on CPUs)
        self.dtype = _AUTOCAST.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "16-mixed" else None
        optimizers, schedulers = module.configure_optimizers()
        self.optimizer = optimizers[0]
        self.schedulers = [c["scheduler"] for c in schedulers if c.get("interval") == "step"]
        set_cosine_length(self.schedulers, trainer.estimated_stepping_batches)
        self.clip = trainer.gradient_clip_val
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.loader = trainer.datamodule.train_dataloader()
        self.batches = None

    def _next_batch(self):
        if self.batches is not None:
            batch = next(self.batches, None)
            if batch is not None:
                return batch
        self.batches = iter(self.loader)
        return next(self.batches)

    def step(self, batch) -> Tensor:
        """One optimiser step on ``batch``; returns the (detached) loss."""
        images, targets = batch
        images = [im.to(self.device, non_blocking=True) for im in images]
        keys = ("boxes", "labels", "iscrowd")
        targets = _loss_targets([{k: t[k].to(self.device, non_blocking=True) for k in keys if k in t}
                                 for t in targets])  # fmt: skip
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = sum(self.model(images, targets).values())
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        for scheduler in self.schedulers:
            scheduler.step()
        return loss.detach()

    def run(self, steps: int) -> dict:
        """``steps`` raw steps, timed; the model's weights, buffers and the RNG states are restored after them.
        Returns ``{"seconds", "images", "finite"}`` (finite: every loss was)."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        losses = []
        with torch.enable_grad():
            batch = self._next_batch()
            _synchronize(self.device)
            start = time.perf_counter()
            images = 0
            for i in range(steps):
                if i:
                    batch = self._next_batch()
                images += len(batch[0])
                losses.append(self.step(batch))
            _synchronize(self.device)
            seconds = time.perf_counter() - start
        finite = bool(torch.isfinite(torch.stack(losses)).all())
        self.optimizer.zero_grad(set_to_none=True)
        self.model.load_state_dict(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        return {"seconds": seconds, "images": images, "finite": finite}

    def close(self) -> None:
        """Stop the loader's workers and free the optimiser state."""
        self.batches = None
        self.optimizer.state.clear()


class RawLoopAlternation(Callback):
    """Times the fit's training steps in blocks of ``block`` steps, each of the first ``rounds`` followed by
    ``block`` raw-loop steps (module docstring); writes the timings to ``out`` (JSON) after every block, so a
    run that dies later keeps what was measured.

    ``out`` holds ``{"precision", "device", "block", "rounds", "litvision": [block...], "raw": [block...],
    "peak_memory_gib"}``, each block ``{"seconds", "images"}`` (raw blocks also ``finite``), in run order;
    the peak (CUDA only) is the fit's after the last raw block: its later steps and its validation.
    """

    def __init__(self, out: str, block: int = 8, rounds: int = 4) -> None:
        if block < 1 or rounds < 0:
            raise ValueError(f"block must be >= 1 and rounds >= 0, got {block}, {rounds}")
        self.out, self.block, self.rounds = Path(out), block, rounds
        self.litvision: list[dict] = []
        self.raw: list[dict] = []
        self.raw_loop: RawLoop | None = None
        self._start: float | None = None
        self._images = 0
        self._meta: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if self.rounds:
            self.raw_loop = RawLoop(trainer, pl_module)
        self._meta = {"precision": str(trainer.precision), "device": str(pl_module.device)}
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % self.block == 0:
            _synchronize(pl_module.device)
            self._start, self._images = time.perf_counter(), 0
        self._images += len(batch[0])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._start is None or (batch_idx + 1) % self.block:
            return
        _synchronize(pl_module.device)
        self.litvision.append({"seconds": time.perf_counter() - self._start, "images": self._images})
        self._start = None
        if self.raw_loop is not None and len(self.raw) < self.rounds:
            self.raw.append(self.raw_loop.run(self.block))
            if len(self.raw) == self.rounds:
                self.raw_loop.close()
                if pl_module.device.type == "cuda":  # the peak reported is litvision's alone from here on
                    torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._write(pl_module.device)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(pl_module.device)
        if self.raw_loop is not None:
            self.raw_loop.close()
            self.raw_loop = None

    def _write(self, device: torch.device) -> None:
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        data = {**self._meta, "block": self.block, "rounds": self.rounds, "litvision": self.litvision,
                "raw": self.raw, "peak_memory_gib": peak}  # fmt: skip
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.out)


def speed_summary(timings: dict, warmup: int = 1) -> dict:
    """Images/s of each side over the alternated rounds after ``warmup`` (medians of the blocks' images/s) and
    the median over those rounds of litvision's time per image / the raw loop's (1.00: no wrapper cost).
    ``litvision_all_ips``: the median over every litvision block after the warm-up, alternated or not."""
    raw = timings["raw"][warmup:]
    paired = timings["litvision"][warmup : len(timings["raw"])]
    if not raw or not paired:
        raise ValueError(f"no timed round after the {warmup} warm-up round(s): {len(timings['raw'])} raw blocks")

    def ips(block: dict) -> float:
        return block["images"] / block["seconds"]

    return {
        "litvision_ips": statistics.median(ips(b) for b in paired),
        "raw_ips": statistics.median(ips(b) for b in raw),
        "time_ratio": statistics.median(ips(r) / ips(b) for b, r in zip(paired, raw, strict=True)),
        "litvision_all_ips": statistics.median(ips(b) for b in timings["litvision"][warmup:]),
        "rounds": len(raw),
    }
