"""training.distributed: a process whose whole batch was skipped still joins DDP's gradient all-reduce."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

from classifiers.data import collate_classification
from classifiers.module import FrozenBackboneClassifier

REPO = Path(__file__).resolve().parents[2]
LR = 0.5

# Two CPU processes (gloo), each reading the whole data set (no distributed sampler): rank 0's first batch
# is items 0 and 1, rank 1's is empty because every sample is unreadable there.
SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from classifiers.data import collate_classification
    from tests.training.test_distributed import HalfUnreadable, tiny_classifier

    if __name__ == "__main__":
        out = Path(sys.argv[-1])
        model = tiny_classifier()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, use_distributed_sampler=False)
        trainer.fit(model, DataLoader(HalfUnreadable(), batch_size=2, collate_fn=collate_classification))
        torch.save(model.state_dict(), out / "after.pt")
        torch.save(trainer.callback_metrics["train_loss"], out / "train_loss.pt")  # the synced epoch value
""")


class HalfUnreadable(torch.utils.data.Dataset):
    """8 samples, all unreadable (None, as ``on_bad_sample="skip"`` gives) in the process of rank 1."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            return None
        return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), i % 3


def tiny_classifier() -> FrozenBackboneClassifier:
    torch.manual_seed(0)
    return FrozenBackboneClassifier(backbone="resnet18", num_classes=3, weights=None, freeze="all",
                                    optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0)  # fmt: skip


def test_a_process_with_an_empty_batch_joins_the_all_reduce(tmp_path):
    # Returning None there (what one process does) would leave rank 0 waiting in backward forever.
    subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, check=True, timeout=240)
    after = torch.load(tmp_path / "after.pt", weights_only=True)
    # Expected, by hand: rank 0's gradient on items 0 and 1, averaged with rank 1's zeros, one SGD step.
    model = tiny_classifier()
    images, labels = collate_classification([HalfUnreadable()[0], HalfUnreadable()[1]])
    model.train()
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    # rank 1 took part in the epoch mean with weight 0: the synced train_loss is rank 0's alone
    torch.testing.assert_close(torch.load(tmp_path / "train_loss.pt", weights_only=True), loss.detach(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    for name, p in model.named_parameters():
        expected = p.detach() - LR * p.grad / 2 if p.requires_grad else p.detach()
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert model.head.fc.weight.grad.abs().sum() > 0  # the check above is not trivially "nothing moved"
