"""A training run for test_checkpoint_io's SIGKILL test: ``python -m tests.training.killed_run CKPT_DIR``.

It saves every 2 of its 6 batches per epoch, slowly enough (30 ms a step) to be killed mid-epoch, and
would train for 100 epochs if it were not killed.
"""

import sys

from lightning.pytorch import Trainer, seed_everything

from tests.training.tiny_lightning import TinyRegressor
from training.callbacks import ModelCheckpoint

if __name__ == "__main__":
    seed_everything(0, verbose=False)
    checkpoint = ModelCheckpoint(sys.argv[1] + "/e{epoch:02d}.ckpt", save_freq=2)
    trainer = Trainer(max_epochs=100, callbacks=[checkpoint], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(TinyRegressor(step_sleep=0.03))
