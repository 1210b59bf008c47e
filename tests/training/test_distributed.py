"""training.distributed: a process whose whole batch (or whole validation share) was skipped as unreadable
still joins DDP's collective operations: the gradient all-reduce, the epoch-end metric and loss syncs; and a
multi-process evaluation scores each image once, with the losses' epoch means of one process."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from classifiers.data import collate_classification
from classifiers.module import FrozenBackboneClassifier
from detectors.data.samples import collate_detection
from detectors.module import RetinaNetModule, _loss_targets
from detectors.val_loss import training_losses

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

    from tests.training.test_distributed import COLLATE, DATA, MODEL

    if __name__ == "__main__":
        out, name = Path(sys.argv[-2]), sys.argv[-1]
        model = MODEL[name]()
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, use_distributed_sampler=False)
        trainer.fit(model, DataLoader(DATA[name](), batch_size=2, collate_fn=COLLATE[name]))
        torch.save(model.state_dict(), out / "after.pt")
        torch.save(dict(trainer.callback_metrics), out / "metrics.pt")  # the synced epoch values
""")


# Validation where rank 1's whole share is unreadable (each process reads every item, rank 1 gets None for
# all): the others must not wait for it in the metric gather or in the val_loss sync.
VALIDATE_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from tests.training.test_distributed import COLLATE, DATA, MODEL

    if __name__ == "__main__":
        out, name = Path(sys.argv[-2]), sys.argv[-1]
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False)
        trainer.validate(MODEL[name](), DataLoader(DATA[name](), batch_size=2, collate_fn=COLLATE[name]))
        torch.save(dict(trainer.callback_metrics), out / "metrics.pt")
""")


# Rank 1's images are NaN, so only its loss is non-finite: both processes must stop with the same clear error
# (before, rank 0 went on into the gradient all-reduce; gloo then fails on the closed connection, NCCL waits
# for its timeout). Each process records the error its training_step raised.
NAN_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import lightning as L
    from torch.utils.data import DataLoader

    from detectors.data.samples import collate_detection
    from tests.training.test_distributed import NaNOnRank1, RecordingDetector

    if __name__ == "__main__":
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, use_distributed_sampler=False)
        trainer.fit(RecordingDetector(Path(sys.argv[-1])), DataLoader(NaNOnRank1(), batch_size=2,
                                                                        collate_fn=collate_detection))
""")


def _on_rank_1() -> bool:
    """In the process of rank 1 of a 2-process run (the one these datasets starve or poison)."""
    return torch.distributed.is_initialized() and torch.distributed.get_rank() == 1


class HalfUnreadable(torch.utils.data.Dataset):
    """8 samples, all unreadable (None, as ``on_bad_sample="skip"`` gives) in the process of rank 1."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        if _on_rank_1():
            return None
        return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), i % 3


class HalfUnreadableDetection(torch.utils.data.Dataset):
    """4 images with 1-2 boxes each, all unreadable in the process of rank 1."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if _on_rank_1():
            return None
        g = torch.Generator().manual_seed(i)
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])[: 1 + i % 2]
        target = {"boxes": boxes, "labels": torch.tensor([1 + i % 3, 2])[: len(boxes)], "image_id": i,
                  "iscrowd": torch.zeros(len(boxes), dtype=torch.int64)}  # fmt: skip
        return torch.rand(3, 64, 64, generator=g), target


# RetinaNet: its loss samples no anchors or ROIs, so it does not depend on each process' RNG state
TINY_DETECTOR = dict(class_names=["a", "b", "c"], backbone="resnet18_fpn", min_size=64, max_size=64)


def tiny_detector() -> RetinaNetModule:
    torch.manual_seed(0)
    return RetinaNetModule(**TINY_DETECTOR, score_thresh=0.0)


class NaNOnRank1(torch.utils.data.Dataset):
    """2 images with a box each; NaN pixels in the process of rank 1."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        image = torch.full((3, 64, 64), float("nan")) if _on_rank_1() else torch.rand(3, 64, 64)
        return image, {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1]), "image_id": i}


class RecordingDetector(RetinaNetModule):
    """The tiny detector, writing ``<rank>.txt`` with the error its training_step raised."""

    def __init__(self, out: Path):
        torch.manual_seed(0)
        super().__init__(**TINY_DETECTOR)
        self.out = out

    def training_step(self, batch, batch_idx: int):
        try:
            return super().training_step(batch, batch_idx)
        except (FloatingPointError, RuntimeError) as e:
            (self.out / f"{self.global_rank}.txt").write_text(str(e))
            raise


def tiny_classifier() -> FrozenBackboneClassifier:
    torch.manual_seed(0)
    return FrozenBackboneClassifier(backbone="resnet18", num_classes=3, weights=None, freeze="all",
                                    optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0)  # fmt: skip


def test_a_process_with_an_empty_batch_joins_the_all_reduce(tmp_path):
    # Returning None there (what one process does) would leave rank 0 waiting in backward forever.
    subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "classifier"], cwd=REPO, check=True, timeout=240)
    after = torch.load(tmp_path / "after.pt", weights_only=True)
    # Expected, by hand: rank 0's gradient on items 0 and 1, averaged with rank 1's zeros, one SGD step.
    model = tiny_classifier()
    images, labels = collate_classification([HalfUnreadable()[0], HalfUnreadable()[1]])
    model.train()
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    # rank 1 took part in the epoch mean with weight 0: the synced train_loss is rank 0's alone
    torch.testing.assert_close(torch.load(tmp_path / "metrics.pt", weights_only=True)["train_loss"], loss.detach(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    for name, p in model.named_parameters():
        expected = p.detach() - LR * p.grad / 2 if p.requires_grad else p.detach()
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert model.head.fc.weight.grad.abs().sum() > 0  # the check above is not trivially "nothing moved"


MODEL = {"classifier": tiny_classifier, "detector": tiny_detector}
DATA = {"classifier": HalfUnreadable, "detector": HalfUnreadableDetection}
COLLATE = {"classifier": collate_classification, "detector": collate_detection}


def _validate_ddp(tmp_path, name: str) -> dict:
    # Before the fix, rank 0 waited in the gather/sync that rank 1 never entered: the timeout fails the test.
    subprocess.run([sys.executable, "-c", VALIDATE_SCRIPT, str(tmp_path), name], cwd=REPO, check=True, timeout=240)
    return torch.load(tmp_path / "metrics.pt", weights_only=True)


def test_classifier_validation_with_a_process_that_read_nothing(tmp_path):
    got = _validate_ddp(tmp_path, "classifier")
    # Expected, by hand: loss and accuracy over rank 0's 8 images alone (4 equal batches: the mean of means).
    model = tiny_classifier().eval()
    images, labels = collate_classification([HalfUnreadable()[i] for i in range(8)])
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(got["val_loss"], nn.functional.cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)
    assert float(got["val_acc"]) == (logits.argmax(1) == labels).float().mean().item()


def test_detector_validation_with_a_process_that_read_nothing(tmp_path):
    got = _validate_ddp(tmp_path, "detector")
    # Expected: the same model validated by one process on the same 4 images.
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    data = DataLoader(HalfUnreadableDetection(), batch_size=2, collate_fn=collate_detection)
    trainer.validate(tiny_detector(), data)
    expected = trainer.callback_metrics
    keys = ["val_loss", *(f"val_{k}" for k in RetinaNetModule.loss_names), "val_map", "val_map_50", "val_mar_100"]
    for key in keys:
        assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-5, abs=1e-6), key
    assert float(expected["val_loss"]) > 0 and float(expected["val_mar_100"]) >= 0  # scored images, not -1


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    run = subprocess.run([sys.executable, "-c", NAN_SCRIPT, str(tmp_path)], cwd=REPO, timeout=240,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode != 0
    assert "non-finite training loss nan at step 0" in (tmp_path / "1.txt").read_text()
    assert "stopped at step 0: another process failed" in (tmp_path / "0.txt").read_text()


@pytest.mark.parametrize("skip", [True, False])
def test_skip_with_sync_batchnorm_is_refused_under_ddp(skip):
    # Real SyncBatchNorm needs GPUs: a stand-in trainer with two processes, after Lightning's conversion.
    model = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_classifier())
    data = SimpleNamespace(hparams={"on_bad_sample": "skip" if skip else "raise"})
    model._trainer = SimpleNamespace(world_size=2, datamodule=data)
    if skip:
        with pytest.raises(ValueError, match="sync_batchnorm"):
            model.on_fit_start()
    else:
        model.on_fit_start()
    model._trainer = SimpleNamespace(world_size=1, datamodule=SimpleNamespace(hparams={"on_bad_sample": "skip"}))
    model.on_fit_start()  # one process: nothing to wait for


def test_a_detector_process_with_an_empty_batch_joins_the_loss_syncs(tmp_path):
    # The detector also logs each loss component, synced: the empty process must log every one of them.
    subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "detector"], cwd=REPO, check=True, timeout=240)
    got = torch.load(tmp_path / "metrics.pt", weights_only=True)
    images, targets = collate_detection([HalfUnreadableDetection()[0], HalfUnreadableDetection()[1]])
    expected = training_losses(tiny_detector().train().model, list(images), _loss_targets(targets))
    assert float(got["train_loss"]) == pytest.approx(float(sum(expected.values())), rel=1e-5)
    for k, v in expected.items():  # rank 0's values alone: rank 1 took part with weight 0
        assert float(got[f"train_{k}"]) == pytest.approx(float(v), rel=1e-5), k


# ----------------------------------------------------------------------------------------- each image once

# Validation of both module families on their DataModules, 2 processes and Lightning's default
# use_distributed_sampler=True: 5 detection images and an odd number of crops, which a padding
# DistributedSampler would score as 6 and N + 1. Each process writes what it scored to <family>-<rank>.json.
EACH_ONCE_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch

    from tests.training.test_distributed import validate_on_datamodules

    if __name__ == "__main__":
        out, root = Path(sys.argv[-2]), Path(sys.argv[-1])
        torch.save(validate_on_datamodules(root, out, devices=2), out / "metrics.pt")
""")


class _RecordsScored:
    """Writes OUT/<family>-<rank>.json: the image ids (detector) or the number of images (classifier) that
    this process scored in the validation epoch."""

    def on_validation_epoch_start(self) -> None:
        self.scored = []
        return super().on_validation_epoch_start()

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.scored += [int(t["image_id"]) for t in targets] if isinstance(targets, (list, tuple)) else [len(images)]
        return super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        (self.out / f"{self.family}-{self.global_rank}.json").write_text(json.dumps(self.scored))
        return super().on_validation_epoch_end()


class RecordingRetinaNet(_RecordsScored, RetinaNetModule):
    family = "detector"

    def __init__(self, out: Path):
        torch.manual_seed(0)
        super().__init__(**TINY_DETECTOR, score_thresh=0.0)
        self.out = out


class RecordingClassifier(_RecordsScored, FrozenBackboneClassifier):
    family = "classifier"

    def __init__(self, out: Path):
        torch.manual_seed(0)
        super().__init__(backbone="resnet18", num_classes=3, weights=None, freeze="all")
        self.out = out


def validate_on_datamodules(root: Path, out: Path, devices: int) -> dict[str, dict[str, float]]:
    from classifiers.data import ImageFolderDataModule
    from detectors.data.datamodule import DetectionDataModule

    runs = {"detector": (RecordingRetinaNet, DetectionDataModule(str(root), batch_size=2, num_workers=0)),
            "classifier": (RecordingClassifier, ImageFolderDataModule(
                str(root / "classification" / "train"), val_root=str(root / "classification" / "val"),
                augment=False, batch_size=2, num_workers=0))}  # fmt: skip
    metrics = {}
    for family, (cls, data) in runs.items():
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
        trainer.validate(cls(out), datamodule=data)
        metrics[family] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics


def test_ddp_validation_scores_each_image_once(tmp_path):
    from detectors.data.shapes import generate_shapes

    root = tmp_path / "shapes"
    generate_shapes(root, num_train=4, num_val=5, image_size=(160, 160), seed=0, voc=False)
    crops = sorted((root / "classification" / "val").rglob("*.png"))
    if len(crops) % 2 == 0:  # odd, so that two processes cannot split it evenly
        crops.pop().unlink()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    expected = validate_on_datamodules(root, one, devices=1)
    subprocess.run([sys.executable, "-c", EACH_ONCE_SCRIPT, str(two), str(root)], cwd=REPO, check=True, timeout=300)
    got = torch.load(two / "metrics.pt", weights_only=True)

    ids = [i for rank in (0, 1) for i in json.loads((two / f"detector-{rank}.json").read_text())]
    assert sorted(ids) == sorted(json.loads((one / "detector-0.json").read_text())) and len(ids) == 5
    counts = [n for rank in (0, 1) for n in json.loads((two / f"classifier-{rank}.json").read_text())]
    assert sum(counts) == len(crops)
    for family in ("detector", "classifier"):
        keys = ["val_loss", "val_map", "val_map_50", "val_mar_100"] if family == "detector" else ["val_loss", "val_acc"]
        for key in keys:  # one process' numbers: per-image weighted losses, the metrics gathered once each
            assert got[family][key] == pytest.approx(expected[family][key], rel=1e-5, abs=1e-6), (family, key)
    assert expected["detector"]["val_loss"] > 0


def test_epoch_mean_weights_each_batch_by_its_size():
    from training.distributed import EpochMean

    mean = EpochMean()
    for value, n in [(2.0, 3), (1.0, 1), (5.0, 0)]:  # the last: a process that took part with nothing
        mean.update(torch.tensor(value), n)
    assert float(mean.compute()) == pytest.approx((2.0 * 3 + 1.0) / 4)
    with pytest.warns(UserWarning, match="called before the ``update``"):  # torchmetrics says so too
        assert math.isnan(float(EpochMean().compute()))  # nothing scored anywhere: NaN, not 0


@pytest.mark.parametrize(("world_size", "use_distributed_sampler", "items", "expected"), [
    (2, True, 5, [[0, 2, 4], [1, 3]]),  # no repeats: shares one apart
    (1, True, 5, [[0, 1, 2, 3, 4]]),
    (2, False, 5, [[0, 1, 2, 3, 4]] * 2),  # the user's choice: each process reads what its loader gives
    (3, True, 2, [[0, 1]] * 3),  # a process would get nothing: Lightning's (padding) sampler takes over
])  # fmt: skip
def test_evaluation_sampler(world_size, use_distributed_sampler, items, expected):
    from training.distributed import evaluation_sampler

    shares = []
    for rank in range(world_size):
        trainer = SimpleNamespace(world_size=world_size, global_rank=rank,
                                  _accelerator_connector=SimpleNamespace(use_distributed_sampler=use_distributed_sampler))  # fmt: skip
        shares.append(list(evaluation_sampler(SimpleNamespace(trainer=trainer), list(range(items)))))
    assert shares == expected
    assert list(evaluation_sampler(SimpleNamespace(trainer=None), [7, 8])) == [0, 1]  # outside a Trainer
