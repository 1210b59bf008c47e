"""One training step on 2 processes where only rank 1's images are NaN, so only its loss is non-finite. Each
process writes OUT/<rank>.txt with the error its training_step raised.

    python -m tests.training.ddp_scripts.nan_loss OUT
"""

import sys
from pathlib import Path

from torch.utils.data import DataLoader

from detectors.data.samples import collate_detection
from tests.training.ddp_scripts.common import NaNOnRank1, RecordingDetector, trainer

if __name__ == "__main__":
    run = trainer(max_steps=1, limit_val_batches=0, use_distributed_sampler=False)
    run.fit(RecordingDetector(Path(sys.argv[1])), DataLoader(NaNOnRank1(), batch_size=2, collate_fn=collate_detection))
