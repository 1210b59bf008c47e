"""Tiny LightningModules for the training tests (CPU, milliseconds per epoch).

``load_model`` finds these classes by their module path ``tests.training.tiny_lightning`` (the
repository root is on sys.path under pytest; subprocess tests run from it).
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.saving import SavableModule


class ScriptedModule(SavableModule, LightningModule):
    """Logs ``script[current_epoch]`` as ``monitor`` in every validation run (nothing past the end).

    Training is a real but trivial SGD on a Linear layer, so optimizers and checkpoints are real.
    ``n_groups=2`` gives the optimizer two param groups with LRs ``lr`` and ``lr / 10``.
    """

    def __init__(
        self,
        script: list[float] | None = None,
        monitor: str = "val_loss",
        lr: float = 0.1,
        n_groups: int = 1,
        train_batches: int = 2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(2, 1)
        self.other = nn.Linear(2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + self.other(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch[0]).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        script = self.hparams.script
        if script is not None and self.current_epoch < len(script):
            self.log(self.hparams.monitor, float(script[self.current_epoch]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = self.hparams.lr
        if self.hparams.n_groups == 2:
            groups = [{"params": self.layer.parameters()}, {"params": self.other.parameters(), "lr": lr / 10}]
            return torch.optim.SGD(groups, lr=lr)
        return torch.optim.SGD(self.parameters(), lr=lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.ones(self.hparams.train_batches, 2)), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.ones(1, 2)), batch_size=1)


class TinyRegressor(SavableModule, LightningModule):
    """MLP regressor with BatchNorm and Dropout on fixed random data, shuffled batches, SGD with
    momentum and a per-step linear warm-up (LambdaLR): every source of state and randomness a
    resumed run must reproduce. Logs ``train_loss`` and ``val_loss``.

    ``weights_path`` loads "pretrained" weights in the constructor (a local file), ``freeze_first``
    freezes the first Linear layer, ``step_sleep`` slows training down (seconds per step).
    """

    def __init__(
        self,
        hidden: int = 16,
        dropout: float = 0.3,
        lr: float = 0.05,
        warmup_steps: int = 4,
        n_train: int = 48,
        batch_size: int = 8,
        weights_path: str | None = None,
        freeze_first: bool = False,
        step_sleep: float = 0.0,
        epoch_scheduler: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )
        if weights_path is not None:
            self.net.load_state_dict(torch.load(weights_path, weights_only=True))
        if freeze_first:
            self.net[0].requires_grad_(False)
        g = torch.Generator().manual_seed(1234)  # the data are fixed; only their order is random
        x = torch.randn(n_train + 16, 4, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n_train + 16, 1, generator=g)
        self._train = TensorDataset(x[:n_train], y[:n_train])
        self._val = TensorDataset(x[n_train:], y[n_train:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.hparams.step_sleep:
            time.sleep(self.hparams.step_sleep)
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> dict:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9)
        if self.hparams.epoch_scheduler:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._train, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._val, batch_size=8)


def assert_same(a, b) -> None:
    """Exact equality of nested tensors / dicts / lists (bit-identical tensors, same keys and order)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def quiet_trainer(dirpath, max_epochs: int, callbacks: list, **kwargs) -> Trainer:
    """A CPU Trainer without progress bar, summary or (by default) logger, for callback tests."""
    return Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=kwargs.pop("logger", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=dirpath,
        **kwargs,
    )
