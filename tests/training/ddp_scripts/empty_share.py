"""Each module family, on 2 processes whose rank 1 reads nothing (every sample unreadable): one training step,
then a validation. Each process reads the whole data set (no distributed sampler), so rank 0's first batch
is items 0 and 1. Rank 0 writes OUT/<family>-after.pt (the weights after the step), OUT/<family>-fit.pt and
OUT/<family>-validate.pt (the synced epoch values).

    python -m tests.training.ddp_scripts.empty_share OUT
"""

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tests.training.ddp_scripts.common import COLLATE, DATA, MODEL, trainer

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name in ("classifier", "detector"):
        model, data = MODEL[name](), DataLoader(DATA[name](), batch_size=2, collate_fn=COLLATE[name])
        fit = trainer(max_steps=1, limit_val_batches=0, use_distributed_sampler=False)
        fit.fit(model, data)
        validate = trainer(use_distributed_sampler=False)
        validate.validate(MODEL[name](), data)
        if fit.is_global_zero:
            torch.save(model.state_dict(), out / f"{name}-after.pt")
            torch.save(dict(fit.callback_metrics), out / f"{name}-fit.pt")
            torch.save(dict(validate.callback_metrics), out / f"{name}-validate.pt")
