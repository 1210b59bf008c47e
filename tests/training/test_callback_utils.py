"""The rules the Keras callbacks share: mode="auto", the filepath template, RNG state capture."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from training.callback_utils import (
    FilepathKeyError,
    capture_rng_states,
    format_filepath,
    lr_above_min_lr,
    resolve_mode,
    restore_rng_states,
    split_filepath,
)

# (monitor, the mode "auto" chooses); test_callbacks checks both callbacks choose the same
MODE_AUTO_CASES = [
    ("val_loss", "min"),
    ("train_loss", "min"),
    ("val_acc", "max"),
    ("categorical_accuracy", "max"),
    ("val_map", "max"),
    ("val_map_50", "max"),
    ("val_map_small", "max"),
    ("val_mar_100", "max"),
    ("val_ap/person", "max"),
    ("val_f1", "max"),
    ("val_precision", "max"),
    ("val_recall", "max"),
    ("val_iou", "max"),
    ("val_miou", "max"),
    ("fmeasure", "max"),
    ("val_gap_loss", "min"),  # "ap" inside a word is not AP
    ("val_margin", "min"),
]


@pytest.mark.parametrize(("monitor", "expected"), MODE_AUTO_CASES)
def test_mode_auto(monitor, expected):
    assert resolve_mode("auto", monitor) == expected
    assert resolve_mode("max", "val_loss") == "max"
    assert resolve_mode("min", "val_acc") == "min"


def test_format_filepath():
    values = {"epoch": 3, "val_loss": torch.tensor(0.1234), "step": 12}
    assert format_filepath("w.{epoch:02d}-{val_loss:.2f}.ckpt", values) == "w.03-0.12.ckpt"
    with pytest.raises(FilepathKeyError, match=r"uses \{val_acc\}, which is not logged at epoch 3; "
                                               "available keys: epoch, step, val_loss"):
        format_filepath("w-{val_acc}.ckpt", values)
    with pytest.raises(ValueError, match="cannot be formatted"):
        format_filepath("w-{epoch:s}.ckpt", values)
    assert split_filepath("runs/a/w-{epoch}.ckpt") == ("runs/a", "w-{epoch}.ckpt")
    with pytest.raises(ValueError, match="not a valid template"):
        split_filepath("w-{epoch.ckpt")


def test_rng_states_round_trip_through_a_weights_only_file():
    buffer = io.BytesIO()
    torch.save(capture_rng_states(), buffer)
    drawn = (random.random(), np.random.rand(), torch.rand(1))
    buffer.seek(0)
    restore_rng_states(torch.load(buffer, weights_only=True))  # plain data and tensors only
    again = (random.random(), np.random.rand(), torch.rand(1))
    assert drawn[:2] == again[:2] and torch.equal(drawn[2], again[2])


def test_lr_above_min_lr_compares_in_float32():
    # 0.1 * 0.1 * 0.1 = 0.0010000000000000002 and 0.1 * 0.2 = 0.020000000000000004 round to min_lr in float32
    # (float32 keeps ~7 significant digits); a relative excess of 1e-6 or more survives the rounding.
    assert not lr_above_min_lr(0.1 * 0.1 * 0.1, 1e-3)
    assert not lr_above_min_lr(0.1 * 0.2, 0.02)
    assert not lr_above_min_lr(1e-3 * (1 + 1e-9), 1e-3)
    assert not lr_above_min_lr(1e-3, 1e-3) and not lr_above_min_lr(9e-4, 1e-3)
    assert lr_above_min_lr(1e-3 * (1 + 1e-6), 1e-3) and lr_above_min_lr(0.0011, 1e-3)
    assert lr_above_min_lr(1e-8, 0.0)
