"""Staged fine-tuning: train the head on a frozen backbone, then unfreeze (part of) the backbone.

Built on Lightning's ``BaseFinetuning``, which also saves the added parameter group in
checkpoints so a resumed run has the same optimiser.
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.callbacks import BaseFinetuning

from training.errors import BadValueError

from .backbones import select_layers


class UnfreezeBackbone(BaseFinetuning):
    """At the start of epoch ``unfreeze_at_epoch`` (1-based, as Keras counts) make backbone layers trainable.

    Args:
        unfreeze_at_epoch: first epoch that trains the unfrozen layers.
        layers: "all" frozen layers, the top N layers of the ``train.py layers`` list, or name prefixes.
        lr: LR of the new parameter group; default ``lr_factor`` times the head's *current* LR, so
            reductions ReduceLROnPlateau already made carry over. The head's own group is left as is.
        lr_factor: see ``lr``.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int = 5,
        layers: Literal["all"] | int | list[str] = "all",
        lr: float | None = None,
        lr_factor: float = 0.1,
    ):
        super().__init__()
        if unfreeze_at_epoch < 1:
            raise BadValueError(f"unfreeze_at_epoch is 1-based, got {unfreeze_at_epoch}")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.layers = layers
        self.lr = lr
        self.lr_factor = lr_factor

    def setup(self, trainer, pl_module, stage: str) -> None:
        # DDP registers only parameters that require gradients when it wraps the model: layers unfrozen
        # later would never be gradient-synchronised and the replicas would drift apart silently.
        if trainer.world_size > 1:
            raise RuntimeError(
                "UnfreezeBackbone cannot unfreeze layers under multi-process training (DDP syncs only the "
                "parameters trainable at start); train the stages as separate runs instead"
            )
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module) -> None:
        """Nothing to do: the module's ``freeze`` argument froze the backbone when it was built."""

    def _targets(self, pl_module) -> list[str]:
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            names = select_layers(pl_module.backbone, "all")
            if not 0 <= self.layers <= len(names):
                raise BadValueError(f"layers={self.layers}: the backbone has {len(names)} layers (0..{len(names)})")
            return names[len(names) - self.layers :] if self.layers else []
        return select_layers(pl_module.backbone, self.layers)

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        if epoch + 1 < self.unfreeze_at_epoch:
            return
        names = [n for n in self._targets(pl_module) if n in pl_module.frozen]
        if not names:
            return
        # On a resumed run the group is already in the restored optimizer; unfreeze_layers then only
        # re-enables gradients, and the filter below adds nothing twice.
        params = pl_module.unfreeze_layers(names)
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        new = [p for p in params if id(p) not in in_optimizer]
        if new:
            lr = self.lr if self.lr is not None else optimizer.param_groups[0]["lr"] * self.lr_factor
            optimizer.add_param_group({"params": new, "lr": lr})
