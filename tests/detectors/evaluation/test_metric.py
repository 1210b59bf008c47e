"""detectors.evaluation.metric: DetectionEvaluator's flat output, batching, reset, repeated images, a
Lightning validation loop and the DDP gather."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from detectors.evaluation import COCO_KEYS, DetectionEvaluator, evaluate_detections

from .helpers import difficult_case, img, load_dicts, model_like, synthetic


def test_evaluator_flat_float_output_with_voc_and_iou_keys():
    pred, target = difficult_case()
    target["iscrowd"] = torch.zeros(3, dtype=torch.int64)
    pred2, target2 = img([[0, 0, 8, 8]], [2], [0.3]), img([[0, 0, 10, 10]], [2])  # IoU .64
    evaluator = DetectionEvaluator(["one", "two", "three"])
    evaluator.update([pred], [target])
    evaluator.update([pred2], [target2])
    out = evaluator.compute()
    assert all(type(v) is float for v in out.values())
    assert set(COCO_KEYS) <= set(out)
    assert out["ap/three"] == -1 and out["iou/three"] == -1 and out["voc10_ap50/three"] == -1
    assert out["voc10_ap50/one"] == pytest.approx(0.75) and out["voc10_ap50/two"] == pytest.approx(1.0)
    assert out["voc10_ap50"] == pytest.approx((0.75 + 1.0) / 2)
    assert out["voc07_ap50/one"] == pytest.approx(8.5 / 11)
    assert out["iou/one"] == pytest.approx((1.0 + 0.81) / 2) and out["iou/two"] == pytest.approx(0.64)
    assert out["mean_iou"] == pytest.approx((1.0 + 0.81 + 0.64) / 3)  # over all matched detections
    # COCO side: pycocotools knows no ``difficult``, so class one is TP FP TP FP TP over 3 positives; its
    # 101-point envelope is 1 for recall <= 1/3 (34 points), 2/3 up to 2/3 (33), 0.6 up to 1 (34)
    assert out["map_50"] == pytest.approx(((34 + 33 * 2 / 3 + 34 * 0.6) / 101 + 1.0) / 2, abs=1e-6)


def test_evaluator_batches_and_reset(tmp_path):
    gt_data, preds, targets = model_like(tmp_path, 6)
    evaluator = DetectionEvaluator(gt_data.class_names)
    evaluator.update(preds[:1], targets[:1])  # a first epoch that reset() must forget
    evaluator.compute()
    evaluator.reset()
    for i in range(0, len(preds), 4):
        evaluator.update(preds[i : i + 4], targets[i : i + 4])
    out = evaluator.compute()
    assert out == evaluate_detections(preds, targets, gt_data.class_names)
    back_preds, back_targets = evaluator.images()
    assert len(back_preds) == len(preds)
    assert torch.equal(back_targets[3]["boxes"], targets[3]["boxes"])
    assert torch.equal(back_targets[3]["area"], targets[3]["area"])
    result = evaluator.coco_result()
    assert result.precision.shape == (10, 101, 4, 4, 3)
    assert result.metrics["map"] == pytest.approx(out["map"])


def test_evaluator_update_without_images_adds_typed_empty_states(tmp_path):
    # What a DDP process whose batches were all unreadable does, so it can join the gather: no image is added,
    # and every state has the dtype and rank of a real update's (gloo gathers need both to match).
    gt_data, preds, targets = model_like(tmp_path, 6)
    evaluator = DetectionEvaluator(gt_data.class_names)
    evaluator.update([], [])
    empty = {name: getattr(evaluator, name)[0] for name in evaluator._defaults}
    assert all(t.numel() == 0 for t in empty.values())
    evaluator.update(preds, targets)
    real = {name: getattr(evaluator, name)[1] for name in evaluator._defaults}
    for name, t in empty.items():
        assert (t.dtype, t.dim()) == (real[name].dtype, real[name].dim()), name
    assert evaluator.compute() == evaluate_detections(preds, targets, gt_data.class_names)


def test_evaluator_rejects_bad_input():
    evaluator = DetectionEvaluator(["a", "b"])
    good_t = img([[0, 0, 1, 1]], [1])
    with pytest.raises(ValueError, match=r"prediction 0: labels must lie in 1..2 \(class_names\), got \[3\]"):
        evaluator.update([img([[0, 0, 1, 1]], [3], [0.5])], [good_t])
    good_p = img([[0, 0, 1, 1]], [2], [0.5])
    with pytest.raises(ValueError, match=r"target 1: labels must lie in 1..2 \(class_names\), got \[1, 0\]"):
        evaluator.update([good_p, good_p], [good_t, img([[0, 0, 1, 1], [1, 1, 2, 2]], [1, 0])])
    with pytest.raises(ValueError, match="missing keys"):
        evaluator.update([img([[0, 0, 1, 1]], [1])], [good_t])
    with pytest.raises(ValueError, match="1 prediction dicts but 2"):
        evaluator.update([img([[0, 0, 1, 1]], [1], [0.5])], [good_t, good_t])
    with pytest.raises(ValueError, match="unique"):
        DetectionEvaluator(["a", "a"])


def test_evaluator_in_lightning_validation_loop():
    import lightning as L

    class Perfect(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.evaluator = DetectionEvaluator(["cat", "dog"])

        def validation_step(self, batch, batch_idx):
            targets = batch
            preds = [
                {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))}
                for t in targets
            ]
            self.evaluator.update(preds, targets)

        def on_validation_epoch_end(self):
            self.log_dict({f"val_{k}": v for k, v in self.evaluator.compute().items()})
            self.evaluator.reset()

    data = [[img([[0, 0, 10, 10], [5, 5, 40, 30]], [1, 2])], [img([[1, 1, 3, 3]], [2])]]
    module = Perfect().to(torch.device("cpu"))
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (logged,) = trainer.validate(module, dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert logged["val_map"] == pytest.approx(1.0) and logged["val_ap/dog"] == pytest.approx(1.0)
    assert logged["val_mean_iou"] == pytest.approx(1.0)
    assert module.evaluator.det_counts == []  # reset() emptied the states


def test_evaluator_scores_a_repeated_image_id_once(tmp_path):
    # DistributedSampler pads the last processes' validation shares with the first images again.
    gt, dets = synthetic(8)
    gt_data, preds = load_dicts(tmp_path, gt, dets)
    targets = [{**t, "image_id": i} for t, i in zip(gt_data.targets, gt_data.image_ids, strict=True)]
    expected = evaluate_detections(preds, targets, gt_data.class_names)
    with_ids, without_ids = DetectionEvaluator(gt_data.class_names), DetectionEvaluator(gt_data.class_names)
    for a, b in [(0, 8), (8, 14), (0, 2)]:  # images 0 and 1 twice
        with_ids.update(preds[a:b], targets[a:b])
        without_ids.update(preds[a:b], gt_data.targets[a:b])
    assert with_ids.compute() == pytest.approx(expected, abs=1e-12)
    assert without_ids.compute() != pytest.approx(expected, abs=1e-6)  # no ids: the repeats count (the premise)
    named = DetectionEvaluator(gt_data.class_names)  # ids that are not integers (file names): never merged
    for a, b in [(0, 8), (8, 14), (0, 2)]:
        named.update(preds[a:b], [{**t, "image_id": f"img{i}"} for i, t in enumerate(targets[a:b], start=a)])
    assert named.compute() == pytest.approx(without_ids.compute(), abs=1e-12)


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    Path(out_dir, str(rank)).mkdir()
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    gt, dets = synthetic(7)
    gt_data, preds = load_dicts(Path(out_dir, str(rank)).resolve(), gt, dets)
    targets = [{**t, "image_id": i} for t, i in zip(gt_data.targets, gt_data.image_ids, strict=True)]
    evaluator = DetectionEvaluator(gt_data.class_names)
    # uneven image counts and update counts; rank 1 ends with image 0 again, as DistributedSampler pads
    parts = [(0, 3), (3, 5)] if rank == 0 else [(5, 14), (0, 1)]
    for a, b in parts:
        evaluator.update(preds[a:b], targets[a:b])
    Path(out_dir, f"{rank}.json").write_text(json.dumps(evaluator.compute()))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_evaluator_gathers_across_ddp_processes(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    gt, dets = synthetic(7)
    gt_data, preds = load_dicts(tmp_path, gt, dets)
    order = [*range(0, 5), *range(5, 14)]  # rank 0's images, then rank 1's
    expected = evaluate_detections(
        [preds[i] for i in order], [gt_data.targets[i] for i in order], gt_data.class_names
    )
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == pytest.approx(expected, abs=1e-9)
