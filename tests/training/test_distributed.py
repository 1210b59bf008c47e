"""training.distributed: a process whose whole batch (or whole validation share) was skipped as unreadable
still joins DDP's collective operations: the gradient all-reduce, the epoch-end metric and loss syncs; and a
multi-process evaluation scores each image once, with the losses' epoch means of one process.

The multi-process runs are the scripts in tests/training/ddp_scripts (2 CPU processes over gloo), each run
once, however many tests read what it wrote.
"""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from classifiers.data import collate_classification
from detectors.data.samples import collate_detection
from detectors.module import RetinaNetModule, _loss_targets
from detectors.val_loss import training_losses
from tests.training.ddp_scripts.common import (
    LR,
    HalfUnreadable,
    HalfUnreadableDetection,
    tiny_classifier,
    tiny_detector,
    trainer,
    validate_on_datamodules,
)

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    # A hang (a process waiting in a collective operation the other never entered) fails on the timeout.
    return subprocess.run([sys.executable, "-m", f"tests.training.ddp_scripts.{name}", *map(str, args)], cwd=REPO,
                          check=check, timeout=300, capture_output=not check, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def empty_share(tmp_path_factory) -> Path:
    """The output folder of ddp_scripts/empty_share.py: both families trained one step and validated on two
    processes, rank 1 reading nothing."""
    out = tmp_path_factory.mktemp("empty_share")
    run_script("empty_share", out)
    return out


def test_a_process_with_an_empty_batch_joins_the_all_reduce(empty_share):
    # Returning None there (what one process does) would leave rank 0 waiting in backward forever.
    after = torch.load(empty_share / "classifier-after.pt", weights_only=True)
    # Expected, by hand: rank 0's gradient on items 0 and 1, averaged with rank 1's zeros, one SGD step.
    model = tiny_classifier()
    images, labels = collate_classification([HalfUnreadable()[0], HalfUnreadable()[1]])
    model.train()
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    # rank 1 took part in the epoch mean with weight 0: the synced train_loss is rank 0's alone
    metrics = torch.load(empty_share / "classifier-fit.pt", weights_only=True)
    torch.testing.assert_close(metrics["train_loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        expected = p.detach() - LR * p.grad / 2 if p.requires_grad else p.detach()
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert model.head.fc.weight.grad.abs().sum() > 0  # the check above is not trivially "nothing moved"


def test_a_detector_process_with_an_empty_batch_joins_the_loss_syncs(empty_share):
    # The detector also logs each loss component, synced: the empty process must log every one of them.
    got = torch.load(empty_share / "detector-fit.pt", weights_only=True)
    images, targets = collate_detection([HalfUnreadableDetection()[0], HalfUnreadableDetection()[1]])
    expected = training_losses(tiny_detector().train().model, list(images), _loss_targets(targets))
    assert float(got["train_loss"]) == pytest.approx(float(sum(expected.values())), rel=1e-5)
    for k, v in expected.items():  # rank 0's values alone: rank 1 took part with weight 0
        assert float(got[f"train_{k}"]) == pytest.approx(float(v), rel=1e-5), k


def test_classifier_validation_with_a_process_that_read_nothing(empty_share):
    # Rank 0 would wait in the gather/sync that rank 1 never entered: the script's timeout fails the test.
    got = torch.load(empty_share / "classifier-validate.pt", weights_only=True)
    # Expected, by hand: loss and accuracy over rank 0's 8 images alone (4 equal batches: the mean of means).
    model = tiny_classifier().eval()
    images, labels = collate_classification([HalfUnreadable()[i] for i in range(8)])
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(got["val_loss"], nn.functional.cross_entropy(logits, labels), rtol=1e-5, atol=1e-6)
    assert float(got["val_acc"]) == (logits.argmax(1) == labels).float().mean().item()


def test_detector_validation_with_a_process_that_read_nothing(empty_share):
    got = torch.load(empty_share / "detector-validate.pt", weights_only=True)
    # Expected: the same model validated by one process on the same 4 images.
    one = trainer(devices=1)
    one.validate(tiny_detector(), DataLoader(HalfUnreadableDetection(), batch_size=2, collate_fn=collate_detection))
    expected = one.callback_metrics
    keys = ["val_loss", *(f"val_{k}" for k in RetinaNetModule.loss_names), "val_map", "val_map_50", "val_mar_100"]
    for key in keys:
        assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-5, abs=1e-6), key
    assert float(expected["val_loss"]) > 0 and float(expected["val_mar_100"]) >= 0  # scored images, not -1


def test_a_non_finite_loss_on_one_process_stops_every_process(tmp_path):
    # Only rank 1's loss is NaN: both processes must stop with the same clear error (rank 0 going on into the
    # gradient all-reduce would fail on gloo's closed connection, or with NCCL wait for its timeout).
    run = run_script("nan_loss", tmp_path, check=False)
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


# ----------------------------------------------------------------------------------------- each image once


def test_ddp_validation_scores_each_image_once(tmp_path):
    # 5 detection images and an odd number of crops, which a padding DistributedSampler would score as 6 and
    # N + 1.
    from detectors.data.shapes import generate_shapes

    root = tmp_path / "shapes"
    generate_shapes(root, num_train=4, num_val=5, image_size=(160, 160), seed=0, voc=False)
    crops = sorted((root / "classification" / "val").rglob("*.png"))
    if len(crops) % 2 == 0:  # odd, so that two processes cannot split it evenly
        crops.pop().unlink()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    expected = validate_on_datamodules(root, one, devices=1)
    run = run_script("each_image_once", two, root, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    # Values gathered by the metrics' compute() are not synced again: no Lightning advice to sync them.
    assert "sync_dist=True" not in run.stderr
    got = torch.load(two / "metrics.pt", weights_only=True)

    ids = [i for rank in (0, 1) for i in json.loads((two / f"detector-{rank}.json").read_text())]
    assert sorted(ids) == sorted(json.loads((one / "detector-0.json").read_text())) and len(ids) == 5
    counts = [n for rank in (0, 1) for n in json.loads((two / f"classifier-{rank}.json").read_text())]
    assert sum(counts) == len(crops)
    for family in ("detector", "fasterrcnn", "classifier"):
        # one process' numbers: per-image weighted losses (each component), the metrics gathered once each
        keys = [k for k in expected[family] if k.startswith("val_")]
        assert "val_loss" in keys and ("val_acc" in keys if family == "classifier" else "val_map" in keys)
        for key in keys:
            assert got[family][key] == pytest.approx(expected[family][key], rel=1e-5, abs=1e-6), (family, key)
        assert expected[family]["val_loss"] > 0
    # The detectors' COCO+VOC scoring ran once per validation, on rank 0 only, and both processes hold
    # (and log) the very same values: the callbacks of every process decide alike.
    ranks = [torch.load(two / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["scorings"] for r in ranks] == [2, 0]
    assert ranks[0]["metrics"] == ranks[1]["metrics"] == got


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
