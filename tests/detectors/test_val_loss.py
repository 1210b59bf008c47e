"""val_loss is a function of the weights and the data only: the same at any validation batch size and in any image
order, for both detectors (over processes: tests/training/test_distributed.py, each image once)."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from detectors.data.datamodule import DetectionDataModule
from detectors.data.samples import collate_detection
from detectors.module import FasterRCNNModule, RetinaNetModule

# Tiny convolutions: on a few shared cores, intra-op threads cost far more than they bring.
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(class_names=["rectangle", "ellipse", "triangle"], backbone="resnet18_fpn", min_size=64, max_size=64)
MODULES = {  # Faster R-CNN samples anchors and ROIs for its loss; RetinaNet samples nothing
    "fasterrcnn": (FasterRCNNModule, dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                                          box_batch_size_per_image=16)),  # fmt: skip
    "retinanet": (RetinaNetModule, dict(group_norm_head=True)),
}


@pytest.fixture(scope="module")
def images(shapes_dir):
    """The 8 train images of the shapes fixture with the validation transforms (no augmentation)."""
    data = DetectionDataModule(str(shapes_dir), val_split="train", num_workers=0)
    data.setup("validate")
    return data.val_dataloader().dataset


def val_losses(module, dataset, batch_size: int, order: list[int]) -> dict[str, float]:
    loader = DataLoader(Subset(dataset, order), batch_size=batch_size, collate_fn=collate_detection)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.validate(module, loader, verbose=False)
    names = ["val_loss", *(f"val_{k}" for k in module.loss_names)]  # the sum and its components
    return {k: float(trainer.callback_metrics[k]) for k in names}


@pytest.mark.parametrize("name", MODULES)
def test_val_loss_is_the_same_at_every_batch_size_and_order(name, images):
    cls, options = MODULES[name]
    torch.manual_seed(0)
    module = cls(**TINY, **options)
    ids = list(range(len(images)))
    reference = val_losses(module, images, 1, ids)
    assert all(v > 0 for v in reference.values())
    shuffled = torch.randperm(len(ids), generator=torch.Generator().manual_seed(3)).tolist()
    for batch_size, order in [(2, ids), (4, shuffled), (8, ids)]:
        got = val_losses(module, images, batch_size, order)
        # Equal up to float summation order: the batch's backbone pass and the epoch mean add in another order.
        assert got == pytest.approx(reference, rel=1e-5, abs=1e-7), (batch_size, order)
