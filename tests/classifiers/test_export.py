"""`train.py export` on the classifier trained a few steps from configs/classifier.yaml: onnxruntime and
ExportedProgram outputs equal the eager module's (computed here), metadata, and a check that fails."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from classifiers.export import ClassifierGraph
from training.export import read_metadata
from training.saving import load_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def classifier_ckpt(shapes_dir, tmp_path_factory):
    """configs/classifier.yaml shrunk: the tests' shapes crops, two steps, no detector backbone."""
    from train import main

    runs = tmp_path_factory.mktemp("runs")
    crops = Path(shapes_dir) / "classification"
    argv, sys.argv = sys.argv, ["train.py"]
    torch.manual_seed(0)
    try:
        main(["fit", "--config", str(REPO / "configs" / "classifier.yaml"), "--runs_dir", str(runs),
              "--data.init_args.root", str(crops / "train"), "--data.init_args.val_root", str(crops / "val"),
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "8",
              "--model.init_args.backbone_checkpoint", "null", "--trainer.max_steps", "2",
              "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
              "--trainer.logger", "false"])  # fmt: skip
    finally:
        sys.argv = argv
    return runs / "classifier" / "checkpoints" / "last.ckpt"


def crops_data(shapes_dir) -> list[str]:
    crops = Path(shapes_dir) / "classification"
    return ["--data", "classifiers.data.ImageFolderDataModule", "--data.init_args.root", str(crops / "train"),
            "--data.init_args.val_root", str(crops / "val"), "--data.init_args.image_size", "[64, 64]",
            "--data.init_args.num_workers", "0"]  # fmt: skip


@pytest.mark.slow  # the fast suite exports a detector to ONNX (tests/detectors/test_export.py)
def test_onnx_export_gives_the_eager_probabilities_for_any_batch_and_size(classifier_ckpt, shapes_dir, tmp_path,
                                                                          train_py):  # fmt: skip
    import onnxruntime

    out = tmp_path / "classifier.onnx"
    code, stdout, err = train_py("export", "--ckpt_path", classifier_ckpt, "--out", out, *crops_data(shapes_dir))
    assert code == 0, err
    assert "export check, onnxruntime (CPU) vs eager on 4 validation image(s)" in stdout and ": OK" in stdout
    module = load_model(classifier_ckpt).eval()
    meta = read_metadata(out)
    assert meta["class_names"] == module.class_names == sorted(os.listdir(Path(shapes_dir) / "classification" / "val"))
    assert meta["task"] == "classification" and meta["dynamic_dims"] == ["batch", "height", "width"]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, 64, 80)  # batch and size other than the export's
    logits, probabilities = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        eager = module(images)
    np.testing.assert_allclose(logits, eager.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(probabilities, eager.softmax(-1).numpy(), atol=1e-5, rtol=0)


@pytest.mark.slow  # the fast suite fails a detector's check (tests/detectors/test_export.py)
def test_a_check_that_fails_exits_non_zero_and_keeps_no_file(classifier_ckpt, tmp_path, train_py, monkeypatch):
    forward = ClassifierGraph.forward

    def off(self, images):  # an exporter that gets the probabilities slightly wrong
        logits, probabilities = forward(self, images)
        return logits, probabilities + 1e-3

    monkeypatch.setattr(ClassifierGraph, "forward", off)
    code, _, err = train_py("export", "--ckpt_path", classifier_ckpt, "--out", tmp_path / "c.onnx",
                            "--check_images", "2")  # fmt: skip
    assert code == 2
    assert "does not reproduce the eager one" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_exported_program_and_torchscript_give_the_eager_logits(classifier_ckpt, tmp_path, train_py):
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        eager = load_model(classifier_ckpt).eval()(images)
    for format, name in (("exported_program", "c.pt2"), ("torchscript", "c.pt")):
        code, _, err = train_py("export", "--ckpt_path", classifier_ckpt, "--out", tmp_path / name, "--format", format)
        assert code == 0, err
        assert read_metadata(tmp_path / name)["litvision_format"] == format
        loaded = torch.export.load(str(tmp_path / name)).module() if format == "exported_program" else torch.jit.load(
            str(tmp_path / name))
        with torch.no_grad():
            logits, _ = loaded(images)
        torch.testing.assert_close(logits, eager, atol=1e-4, rtol=1e-4)
