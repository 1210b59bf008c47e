"""`train.py export` on detectors trained a few steps from the shipped configs: onnxruntime (and TorchScript)
outputs equal the eager module's, computed here independently; metadata; refusals; a failing check."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.v2.functional import pil_to_tensor

from detectors.export import DetectorGraph, match_detections
from training.saving import load_model

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def train_detector(config: str, shapes_dir, runs_dir, *extra) -> Path:
    """``train.py fit --config configs/CONFIG.yaml`` shrunk: the tests' shapes set, 96 px, two steps, with
    torchvision's pretrained layout (FrozenBatchNorm2d) and the config's channels_last kept."""
    from train import main

    argv, sys.argv = sys.argv, ["train.py"]  # LightningCLI warns when sys.argv holds pytest's own
    try:
        main(["fit", "--config", str(CONFIGS / f"{config}.yaml"), "--runs_dir", str(runs_dir),
              "--data.init_args.root", str(shapes_dir), "--data.init_args.generate", "false",
              "--data.init_args.num_workers", "0", "--model.init_args.backbone_checkpoint", "null",
              "--model.init_args.pretrained_layout", "true", "--model.init_args.min_size", "96",
              "--model.init_args.max_size", "96", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", *extra])  # fmt: skip
    finally:
        sys.argv = argv
    return Path(runs_dir) / config / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def faster_rcnn_ckpt(shapes_dir, tmp_path_factory):
    torch.manual_seed(0)
    return train_detector("faster_rcnn", shapes_dir, tmp_path_factory.mktemp("runs"))


def val_images(shapes_dir) -> list[torch.Tensor]:
    files = sorted((Path(shapes_dir) / "images" / "val").glob("*.jpg"))
    return [pil_to_tensor(Image.open(f).convert("RGB")).float() / 255 for f in files]


def sorted_detections(boxes, scores, labels):
    """Rows ordered by label, then box: an order that does not depend on the score ties NMS leaves."""
    rows = np.concatenate([labels[:, None].astype(np.float64), boxes.astype(np.float64), scores[:, None]], axis=1)
    return rows[np.lexsort(rows[:, ::-1].T[1:])] if len(rows) else rows


def test_onnx_export_matches_eager_on_the_val_images_and_keeps_classes_and_category_ids(
        faster_rcnn_ckpt, shapes_dir, tmp_path, train_py):  # fmt: skip
    import onnxruntime

    module = load_model(faster_rcnn_ckpt).eval()
    # The export has litvision's additions to handle: the channels_last pre-hook, FrozenBatchNorm2d.
    assert module.model.backbone._forward_pre_hooks
    assert any(isinstance(m, FrozenBatchNorm2d) for m in module.modules())
    out = tmp_path / "faster_rcnn.onnx"
    out.write_bytes(b"the user's file")
    data = ["--data", CONFIGS / "data" / "shapes.yaml", "--data.init_args.root", shapes_dir,
            "--data.init_args.generate", "false", "--data.init_args.num_workers", "0"]  # fmt: skip
    code, _, err = train_py("export", "--ckpt_path", faster_rcnn_ckpt, "--out", out, *data)
    assert code == 2 and "already exists" in err and "--overwrite true" in err
    assert out.read_bytes() == b"the user's file"
    code, stdout, err = train_py("export", "--ckpt_path", faster_rcnn_ckpt, "--out", out, *data, "--overwrite", "true")
    assert code == 0, err
    check = [line for line in stdout.splitlines() if line.startswith("export check")]
    assert len(check) == 1 and check[0].endswith(": OK") and "4 validation image(s)" in check[0]
    assert os.listdir(tmp_path) == ["faster_rcnn.onnx"]  # the temporary folder is gone

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    meta = session.get_modelmeta().custom_metadata_map
    categories = json.loads((Path(shapes_dir) / "annotations" / "instances_val.json").read_text())["categories"]
    assert json.loads(meta["class_names"]) == [c["name"] for c in categories] == module.class_names
    assert json.loads(meta["category_ids"]) == [c["id"] for c in categories] == [1, 3, 7]
    assert json.loads(meta["dynamic_dims"]) == ["height", "width"]
    total = 0
    with torch.no_grad():
        for image in val_images(shapes_dir):
            boxes, scores, labels, n = session.run(None, {"images": image[None].numpy()})
            eager = module([image])[0]
            assert n[0] == len(eager["boxes"]) and (labels[0, n[0]:] == 0).all()
            got = sorted_detections(boxes[0, : n[0]], scores[0, : n[0]], labels[0, : n[0]])
            want = sorted_detections(eager["boxes"].numpy(), eager["scores"].numpy(), eager["labels"].numpy())
            np.testing.assert_array_equal(got[:, 0], want[:, 0])
            np.testing.assert_allclose(got[:, 1:5], want[:, 1:5], atol=1e-3, rtol=0)
            np.testing.assert_allclose(got[:, 5], want[:, 5], atol=1e-4, rtol=0)
            total += int(n[0])
    assert total > 0  # something was compared
    # Another input size runs too: height and width are free.
    image = torch.rand(3, 80, 120)
    boxes, _, _, n = session.run(None, {"images": image[None].numpy()})
    eager = module([image])[0]
    assert n[0] == len(eager["boxes"])


def test_a_check_that_fails_exits_non_zero_with_the_reason_and_writes_nothing(faster_rcnn_ckpt, tmp_path,
                                                                              train_py, monkeypatch):  # fmt: skip
    forward = DetectorGraph.forward

    def shifted(self, images):  # an exporter that moves every box by 0.01 px
        boxes, scores, labels, n = forward(self, images)
        return boxes + 0.01, scores, labels, n

    monkeypatch.setattr(DetectorGraph, "forward", shifted)
    out = tmp_path / "model.onnx"
    code, _, err = train_py("export", "--ckpt_path", faster_rcnn_ckpt, "--out", out, "--check_images", "1")
    assert code == 2
    message = err.strip().splitlines()[-1]
    assert "does not reproduce the eager one" in message and "no exported detection matches" in message
    assert "Traceback" not in err and os.listdir(tmp_path) == []


@pytest.mark.slow
def test_torchscript_export_of_the_channels_last_faster_rcnn_runs_any_batch_size(faster_rcnn_ckpt, tmp_path,
                                                                                 train_py):  # fmt: skip
    # torch.jit.script cannot compile litvision's channels_last pre-hook: export replaces it with a module.
    out = tmp_path / "faster_rcnn.pt"
    code, stdout, err = train_py("export", "--ckpt_path", faster_rcnn_ckpt, "--out", out, "--format", "torchscript")
    assert code == 0, err
    from training.export import read_metadata

    assert read_metadata(out)["batch_size"] == "dynamic"
    scripted = torch.jit.load(str(out))
    module = load_model(faster_rcnn_ckpt).eval()
    images = torch.rand(3, 3, 96, 96)
    with torch.no_grad():
        boxes, scores, labels, n = scripted(images)
        eager = module(list(images))
    for i, det in enumerate(eager):
        assert int(n[i]) == len(det["boxes"])
        torch.testing.assert_close(labels[i, : n[i]], det["labels"])
        torch.testing.assert_close(boxes[i, : n[i]], det["boxes"], atol=1e-3, rtol=0)


@pytest.mark.slow
def test_exported_program_refuses_a_detector_in_one_line_naming_onnx(faster_rcnn_ckpt, tmp_path, train_py):
    code, _, err = train_py("export", "--ckpt_path", faster_rcnn_ckpt, "--out", tmp_path / "m.pt2",
                            "--format", "exported_program")  # fmt: skip
    assert code == 2
    assert "--format exported_program cannot export FasterRCNNModule" in err and "use --format onnx" in err
    assert len(err) < 2000  # torch.export's dump of the traced graph is not shown
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_retinanet_onnx_export_with_many_low_scores(shapes_dir, tmp_path, train_py):
    """RetinaNet from configs/retinanet.yaml with score_thresh 0: 100 detections an image, many near-ties."""
    torch.manual_seed(0)
    ckpt = train_detector("retinanet", shapes_dir, tmp_path / "runs", "--model.init_args.score_thresh", "0.0")
    out = tmp_path / "retinanet.onnx"
    code, stdout, err = train_py("export", "--ckpt_path", ckpt, "--out", out, "--batch_size", "2")
    assert code == 0, err
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    module = load_model(ckpt).eval()
    images = torch.stack(val_images(shapes_dir)[:2])
    boxes, scores, labels, n = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        eager = module(list(images))
    for i, det in enumerate(eager):
        assert n[i] == len(det["boxes"]) > 0
        got = sorted_detections(boxes[i, : n[i]], scores[i, : n[i]], labels[i, : n[i]])
        want = sorted_detections(det["boxes"].numpy(), det["scores"].numpy(), det["labels"].numpy())
        np.testing.assert_array_equal(got[:, 0], want[:, 0])
        np.testing.assert_allclose(got[:, 1:5], want[:, 1:5], atol=1e-3, rtol=0)


def test_matching_pairs_detections_in_any_order_and_names_the_one_that_differs():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [1.0, 2.0, 3.0, 4.0]])
    scores, labels = torch.tensor([0.9, 0.5, 0.5]), torch.tensor([1, 2, 2])
    order = torch.tensor([2, 0, 1])  # the tied pair comes out in the other order
    tol = {"boxes": 1e-3, "scores": 1e-4}
    moved = boxes[order] + torch.tensor([0.0, 0.0, 0.0, 5e-4])
    found = match_detections([moved, scores[order], labels[order]], [boxes, scores, labels], tol)
    assert found == pytest.approx((5e-4, 0.0, 0), abs=1e-6)
    wrong_label = labels.clone()
    wrong_label[0] = 3
    found = match_detections([boxes, scores, wrong_label], [boxes, scores, labels], tol)
    assert isinstance(found, str) and "label 1 score 0.9000" in found and "closest: label 3" in found
    too_far = boxes.clone()
    too_far[0, 2] += 2e-3  # 2e-3 px: beyond 1e-3
    assert isinstance(match_detections([too_far, scores, labels], [boxes, scores, labels], tol), str)


def test_detections_tied_at_the_lowest_score_may_differ_others_may_not():
    """Where a detection limit cuts between equal scores, 1e-7 decides which box is kept: only there may the two
    outputs hold different detections (also one more or one fewer)."""
    tol = {"boxes": 1e-3, "scores": 1e-4}
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [30.0, 30.0, 40.0, 40.0]])
    scores, labels = torch.tensor([0.9, 0.30002, 0.30001]), torch.tensor([1, 1, 2])
    other = boxes.clone()
    other[2] = torch.tensor([50.0, 50.0, 60.0, 60.0])  # the other of two boxes tied at the cut
    assert match_detections([other, scores, labels], [boxes, scores, labels], tol)[2] == 2  # one each side
    assert match_detections([boxes[:2], scores[:2], labels[:2]], [boxes, scores, labels], tol)[2] == 1
    above = scores.clone()
    above[2] = 0.2  # the cut now lies at 0.2: the boxes at 0.3 must match
    found = match_detections([other, above, labels], [boxes, scores, labels], tol)
    assert isinstance(found, str) and "no exported detection matches label 2 score 0.3000" in found
    found = match_detections([boxes, scores, labels], [other, above, labels], tol)  # the other way round
    assert isinstance(found, str) and "the exported model has a detection the eager one has not" in found
    swapped, higher = boxes.clone(), torch.tensor([0.9, 0.5, 0.30001])
    swapped[1] = torch.tensor([70.0, 70.0, 80.0, 80.0])  # a box above the cut differs
    assert isinstance(match_detections([swapped, higher, labels], [boxes, higher, labels], tol), str)
