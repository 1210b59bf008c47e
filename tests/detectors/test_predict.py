"""predictions.json (COCO results) and drawn images: the writer on known detections; `train.py predict`."""

import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import DataLoader

from detectors.data.coco import CocoDetection
from detectors.data.images import ImageFileDataset
from detectors.data.samples import collate_detection
from detectors.data.voc import VOCDetection
from detectors.data.yolo import YoloDetection
from detectors.predict import CocoPredictionWriter, merge_rank_files

REPO_ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["rectangle", "ellipse", "triangle"]
SHAPES_IDS = {"rectangle": 1, "ellipse": 3, "triangle": 7}  # the generator's documented COCO ids

# The same detections for every image: XYXY boxes, labels 1..3, scores.
KNOWN_BOXES = [[10.0, 20.0, 50.0, 80.0], [0.5, 0.25, 159.5, 159.75], [100.25, 6.5, 103.75, 100.0]]
KNOWN_LABELS = [1, 2, 3]
KNOWN_SCORES = [0.9, 0.5, 0.125]
# Worked by hand: [x1, y1, x2 - x1, y2 - y1]; category = the shapes id of class_names[label - 1].
EXPECTED = [
    {"category_id": 1, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.9},
    {"category_id": 3, "bbox": [0.5, 0.25, 159.0, 159.5], "score": 0.5},
    {"category_id": 7, "bbox": [100.25, 6.5, 3.5, 93.5], "score": 0.125},
]


class KnownDetections(L.LightningModule):
    """Stands in for a detector: returns KNOWN_* for every image, shaped as DetectionModule.predict_step."""

    def __init__(self, class_names=CLASSES):
        super().__init__()
        self.class_names = list(class_names)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def predict_step(self, batch, batch_idx):
        images, targets = batch
        return [
            {
                "boxes": torch.tensor(KNOWN_BOXES),
                "labels": torch.tensor(KNOWN_LABELS),
                "scores": torch.tensor(KNOWN_SCORES),
                "image_id": t["image_id"],
            }
            for t in targets
        ]


def _predict(module, dataset, writer):
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_detection)  # 4 images: batches of 3 + 1
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[writer],
    )
    trainer.predict(module, dataloaders=loader, return_predictions=False)


def _quiet_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _load_res(gt: COCO, path):
    with contextlib.redirect_stdout(io.StringIO()):
        return gt.loadRes(str(path))


def _val(shapes_dir):
    return shapes_dir / "images" / "val", shapes_dir / "annotations" / "instances_val.json"


def test_writer_known_detections_coco_ids_xywh_and_loadres(shapes_dir, tmp_path):
    images_dir, gt_file = _val(shapes_dir)
    out = tmp_path / "out"
    _predict(KnownDetections(), CocoDetection(images_dir, gt_file), CocoPredictionWriter(str(out)))

    gt = _quiet_coco(gt_file)
    gt_ids = sorted(gt.getImgIds())
    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == 3 * len(gt_ids)
    for image_id in gt_ids:
        mine = sorted((r for r in results if r["image_id"] == image_id), key=lambda r: -r["score"])
        assert [r["category_id"] for r in mine] == [e["category_id"] for e in EXPECTED]
        for r, e in zip(mine, EXPECTED, strict=True):
            assert r["bbox"] == pytest.approx(e["bbox"], abs=1e-6)
            assert r["score"] == pytest.approx(e["score"], abs=1e-6)
            assert type(r["score"]) is float

    dt = _load_res(gt, out / "predictions.json")  # pycocotools accepts the file
    assert sorted(dt.getImgIds()) == gt_ids
    assert sorted(dt.getCatIds()) == [1, 3, 7]
    # loadRes derives the area from the XYWH box: w * h of the known boxes
    assert sorted({a["area"] for a in dt.dataset["annotations"]}) == pytest.approx(
        sorted([2400, 159 * 159.5, 3.5 * 93.5])
    )

    categories = json.loads((out / "categories.json").read_text())
    assert categories == [{"id": SHAPES_IDS[n], "name": n} for n in ("rectangle", "ellipse", "triangle")]
    images = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in images] == gt_ids
    for entry in images:
        info = gt.imgs[entry["id"]]
        assert Path(entry["file_name"]) == images_dir / info["file_name"]
        assert (entry["width"], entry["height"]) == (info["width"], info["height"])
    assert not (out / "images").exists()  # draw=False
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_writer_draws_boxes_above_threshold(shapes_dir, tmp_path):
    images_dir, gt_file = _val(shapes_dir)
    out = tmp_path / "out"
    writer = CocoPredictionWriter(str(out), draw=True, draw_score_threshold=0.4)
    _predict(KnownDetections(), CocoDetection(images_dir, gt_file), writer)

    sources = sorted(images_dir.glob("*.jpg"))
    assert sorted(p.name for p in (out / "images").iterdir()) == [p.name for p in sources]
    for source in sources:
        original = np.asarray(Image.open(source).convert("RGB")).astype(int)
        drawn = np.asarray(Image.open(out / "images" / source.name).convert("RGB")).astype(int)
        assert drawn.shape == original.shape
        # the 0.9 "rectangle" box (label 1: red) is drawn: its left edge x=10, rows 40..70
        edge = drawn[40:70, 10]
        assert (edge[:, 0] > 180).all() and (edge[:, 1] < 90).all() and (edge[:, 2] < 90).all()
        # the 0.125 box (left edge x=100) is below the threshold: away from the caption, pixels unchanged
        # up to JPEG re-encoding noise
        assert np.abs(drawn[60:95, 100] - original[60:95, 100]).mean() < 12


def test_writer_glob_input_ids_and_paths(shapes_dir, tmp_path):
    files = sorted((shapes_dir / "images" / "train").glob("*.jpg"))[:4]
    pattern = tmp_path / "photos"
    pattern.mkdir()
    for i, f in enumerate(files):  # names in another order than the shapes ids, and a second folder
        target = pattern / ("sub" if i == 0 else "") / f"img_{9 - i}.jpg"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(f.read_bytes())
    dataset = ImageFileDataset(str(pattern / "**" / "*.jpg"))
    expected_paths = sorted(str(p) for p in pattern.rglob("*.jpg"))
    assert dataset.paths == expected_paths

    out = tmp_path / "out"
    _predict(KnownDetections(), dataset, CocoPredictionWriter(str(out), draw=True))

    images = json.loads((out / "images.json").read_text())
    assert images == [
        {"id": i, "file_name": p, "width": 160, "height": 160} for i, p in enumerate(expected_paths)
    ]
    results = json.loads((out / "predictions.json").read_text())
    assert sorted({r["image_id"] for r in results}) == [0, 1, 2, 3]
    assert sorted({r["category_id"] for r in results}) == [1, 2, 3]  # no COCO file: the label is the id
    assert json.loads((out / "categories.json").read_text()) == [
        {"id": 1, "name": "rectangle"},
        {"id": 2, "name": "ellipse"},
        {"id": 3, "name": "triangle"},
    ]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(p).name for p in expected_paths)

    # a COCO skeleton from images.json + categories.json takes the results
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": [],
        "categories": json.loads((out / "categories.json").read_text()),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    assert len(_load_res(gt, out / "predictions.json").anns) == len(results) == 12


def test_same_file_stems_get_distinct_drawings(shapes_dir, tmp_path):
    source = sorted((shapes_dir / "images" / "val").glob("*.jpg"))[0]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.jpg").write_bytes(source.read_bytes())
    out = tmp_path / "out"
    _predict(
        KnownDetections(),
        ImageFileDataset(str(tmp_path / "*" / "same.jpg")),
        CocoPredictionWriter(str(out), draw=True),
    )
    assert sorted(p.name for p in (out / "images").iterdir()) == ["same_0.jpg", "same_1.jpg"]


def test_model_classes_must_match_the_dataset(shapes_dir, tmp_path):
    images_dir, gt_file = _val(shapes_dir)
    with pytest.raises(ValueError, match="differ from the predict dataset"):
        _predict(
            KnownDetections(["a", "b", "c"]),
            CocoDetection(images_dir, gt_file),
            CocoPredictionWriter(str(tmp_path / "out")),
        )
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_rank_files_merge_keeps_one_copy_per_image(tmp_path):
    # DistributedSampler pads rank 1 with image 10 again; its duplicate detections must not be counted twice.
    def image(i):
        return {"id": i, "file_name": f"{i}.jpg", "width": 8, "height": 8}

    def det(i, score):
        return {"image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1], "score": score}

    rank0 = {"results": [det(10, 0.9), det(10, 0.8), det(11, 0.7)], "images": [image(10), image(11)]}
    rank1 = {"results": [det(12, 0.6), det(10, 0.9), det(10, 0.8)], "images": [image(12), image(10)]}
    paths = [tmp_path / "predictions.rank0.json", tmp_path / "predictions.rank1.json"]
    for path, part in zip(paths, (rank0, rank1), strict=True):
        path.write_text(json.dumps(part))
    results, images, failed = merge_rank_files([str(p) for p in paths])
    assert sorted(images) == [10, 11, 12] and failed == {}
    assert sorted((r["image_id"], r["score"]) for r in results) == [
        (10, 0.8),
        (10, 0.9),
        (11, 0.7),
        (12, 0.6),
    ]
    assert not any(p.exists() for p in paths)


# -- python train.py predict ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_checkpoint(shapes_dir, tmp_path_factory):
    """A tiny Faster R-CNN built by train.py's CLI from configs/faster_rcnn.yaml and saved untrained:
    the hyperparameters (with LightningCLI's ``_class_path``) are what ``fit`` checkpoints hold."""
    from train import LitvisionCLI
    from training.saving import save_model

    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cli = LitvisionCLI(
        args=[
            "--config",
            str(REPO_ROOT / "configs" / "faster_rcnn.yaml"),
            *_data_args(shapes_dir),
            "--model.init_args.min_size",
            "64",
            "--model.init_args.max_size",
            "64",
            "--model.init_args.score_thresh",
            "0.0",
            "--runs_dir",
            str(tmp / "runs"),
            "--trainer.logger",
            "false",
        ],
        run=False,
        save_config_kwargs={"overwrite": True},
    )
    path = tmp / "tiny.ckpt"
    save_model(cli.model, path)
    return path


def _data_args(shapes_dir):
    return [
        "--data.init_args.root",
        str(shapes_dir),
        "--data.init_args.generate",
        "false",
        "--data.init_args.num_workers",
        "0",
    ]


def _train_py(*args, cwd):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "predict",
            "--config",
            str(REPO_ROOT / "configs" / "faster_rcnn.yaml"),
            *args,
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_py_predict_writes_results_that_loadres_accepts(shapes_dir, cli_checkpoint, tmp_path):
    _train_py(
        *_data_args(shapes_dir),
        "--ckpt_path",
        str(cli_checkpoint),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--name",
        "tiny",
        "--draw",
        "true",
        "--draw_score_threshold",
        "0.0",
        cwd=tmp_path,
    )
    out = tmp_path / "runs" / "tiny" / "predictions"  # the default RUNS_DIR/NAME/predictions
    images_dir, gt_file = _val(shapes_dir)
    gt = _quiet_coco(gt_file)
    dt = _load_res(gt, out / "predictions.json")
    results = json.loads((out / "predictions.json").read_text())
    assert len(dt.anns) == len(results) > 0  # score_thresh 0: an untrained model still detects
    assert {r["category_id"] for r in results} <= {1, 3, 7}
    assert {r["image_id"] for r in results} <= set(gt.getImgIds())
    for r in results:
        x, y, w, h = r["bbox"]
        assert w >= 0 and h >= 0 and x >= 0 and y >= 0 and x + w <= 160 + 1e-3 and y + h <= 160 + 1e-3
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        p.name for p in images_dir.glob("*.jpg")
    )


@pytest.mark.slow
def test_train_py_predict_on_a_glob_of_images(shapes_dir, cli_checkpoint, tmp_path):
    pattern = str(shapes_dir / "images" / "train" / "00000[1-3].jpg")
    out = tmp_path / "out"
    _train_py(
        *_data_args(shapes_dir),
        "--data.init_args.predict_images",
        pattern,
        "--ckpt_path",
        str(cli_checkpoint),
        "--runs_dir",
        str(tmp_path / "runs"),
        "--predict_out",
        str(out),
        cwd=tmp_path,
    )
    images = json.loads((out / "images.json").read_text())
    assert [(i["id"], Path(i["file_name"]).name) for i in images] == [
        (0, "000001.jpg"),
        (1, "000002.jpg"),
        (2, "000003.jpg"),
    ]
    results = json.loads((out / "predictions.json").read_text())
    assert {r["image_id"] for r in results} <= {0, 1, 2} and results
    # the data root is a COCO dataset, so its category ids are kept for image files too
    assert {r["category_id"] for r in results} <= {1, 3, 7}
    assert json.loads((out / "categories.json").read_text()) == [
        {"id": SHAPES_IDS[n], "name": n} for n in CLASSES
    ]
    assert not (out / "images").exists()


# -- unreadable images among good ones: through train.py predict on configs/faster_rcnn.yaml, shrunk ------------


def _photos(shapes_dir, folder: Path, broken: bool, cut: bool) -> dict[str, bytes]:
    """Three good images (000001-000003.jpg), then, sorted after them, a text file named broken.jpg (its
    header is bad) and/or cut.jpg, the first half of a good JPEG (its header is fine, its pixels are not)."""
    folder.mkdir()
    good = sorted((shapes_dir / "images" / "val").glob("*.jpg"))[:3]
    for i, source in enumerate(good, 1):
        (folder / f"{i:06d}.jpg").write_bytes(source.read_bytes())
    if broken:
        (folder / "broken.jpg").write_text("not an image")
    if cut:
        data = good[0].read_bytes()
        (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _predict_args(shapes_dir, checkpoint, photos, out, *more):
    return ["predict", "--config", REPO_ROOT / "configs" / "faster_rcnn.yaml", *_data_args(shapes_dir),
            "--data.init_args.predict_images", photos, "--ckpt_path", checkpoint, "--predict_out", out,
            "--runs_dir", out.parent / "runs", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            *more]  # fmt: skip


def _usage_error(train_py, *args) -> str:
    """The "error:" line train.py ARGS fails with: one line, exit status 2, no traceback."""
    code, _, err = train_py(*args)
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "Traceback" not in err, err
    return line


def _written(out: Path) -> tuple[list[int], set[int], list[tuple[int, str, str]]]:
    """(image ids in images.json, image ids with detections, (id, file name, error) in failed.json)."""
    images = [i["id"] for i in json.loads((out / "images.json").read_text())]
    detected = {r["image_id"] for r in json.loads((out / "predictions.json").read_text())}
    failed = [(f["id"], Path(f["file_name"]).name, f["error"]) for f in json.loads((out / "failed.json").read_text())]
    return images, detected, failed


def test_predict_writes_the_readable_images_and_names_the_unreadable(shapes_dir, cli_checkpoint, tmp_path,
                                                                     train_py):  # fmt: skip
    photos, out = tmp_path / "photos", tmp_path / "out"
    before = _photos(shapes_dir, photos, broken=True, cut=True)
    with pytest.warns(UserWarning, match=r"2 of 5 images cannot be read: .*broken.jpg.*cut.jpg"):
        code, _, err = train_py(*_predict_args(shapes_dir, cli_checkpoint, photos, out,
                                               "--data.init_args.on_bad_sample", "skip"))  # fmt: skip
    assert code == 0, err[-3000:]
    images, detected, failed = _written(out)
    assert images == [0, 1, 2] and detected == {0, 1, 2}  # score_thresh 0: every image has detections
    assert [(i, name) for i, name, _ in failed] == [(3, "broken.jpg"), (4, "cut.jpg")]
    assert "not a readable image" in failed[0][2] and "truncated or corrupt" in failed[1][2]
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_predict_with_on_bad_sample_raise_fails_before_the_work(shapes_dir, cli_checkpoint, tmp_path, train_py):
    photos, out = tmp_path / "photos", tmp_path / "out"
    _photos(shapes_dir, photos, broken=True, cut=False)
    message = _usage_error(train_py, *_predict_args(shapes_dir, cli_checkpoint, photos, out))  # raise: the default
    assert f"1 of 4 images cannot be read: {photos}/broken.jpg: not a readable image" in message
    assert "nothing was predicted" in message and "on_bad_sample skip" in message
    assert not out.exists()


def test_predict_with_raise_still_writes_the_good_images_when_one_fails_to_decode(shapes_dir, cli_checkpoint,
                                                                                   tmp_path, train_py):  # fmt: skip
    photos, out = tmp_path / "photos", tmp_path / "out"
    _photos(shapes_dir, photos, broken=False, cut=True)  # the header check cannot see this one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dataset's "skipping bad image" as it goes
        message = _usage_error(train_py, *_predict_args(shapes_dir, cli_checkpoint, photos, out))
    assert f"1 of 4 images cannot be read: {photos}/cut.jpg: image is truncated or corrupt" in message
    assert f"the predictions of the other 3 images are written to {out}" in message
    images, detected, failed = _written(out)
    assert images == [0, 1, 2] and detected == {0, 1, 2}
    assert [(i, name) for i, name, _ in failed] == [(3, "cut.jpg")]


# -- YOLO data: predictions with the reader's ids, and the ground truth that `train.py evaluate` scores them on -----


def test_writer_on_yolo_data_writes_the_ground_truth_with_the_same_ids(shapes_dir, tmp_path):
    dataset = YoloDetection(shapes_dir, "val")
    out = tmp_path / "out"
    _predict(KnownDetections(), dataset, CocoPredictionWriter(str(out)))
    results = json.loads((out / "predictions.json").read_text())
    truth = json.loads((out / "ground_truth.json").read_text())
    # image ids: positions in the sorted image list; category ids: YOLO class + 1, the label
    assert [i["id"] for i in truth["images"]] == list(range(len(dataset))) == sorted({r["image_id"] for r in results})
    assert truth["categories"] == json.loads((out / "categories.json").read_text()) == [
        {"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"}]  # fmt: skip
    assert sorted({r["category_id"] for r in results}) == [1, 2, 3]
    # the ground truth is the data's: each image's YOLO rows, worked back to pixels here from the label file
    for image in truth["images"]:
        path = Path(image["file_name"])
        assert (image["width"], image["height"]) == Image.open(path).size
        rows = [line.split() for line in (shapes_dir / "labels" / "val" / f"{path.stem}.txt").read_text().splitlines()]
        expected = [(int(c) + 1, [(float(cx) - float(w) / 2) * 160, (float(cy) - float(h) / 2) * 160,
                                  float(w) * 160, float(h) * 160]) for c, cx, cy, w, h in rows]  # fmt: skip
        mine = [(a["category_id"], a["bbox"]) for a in truth["annotations"] if a["image_id"] == image["id"]]
        assert [c for c, _ in mine] == [c for c, _ in expected]
        for (_, got), (_, want) in zip(mine, expected, strict=True):
            assert got == pytest.approx(want, abs=1e-4)
    assert sum(len(dataset.records[i].labels) for i in range(len(dataset))) == len(truth["annotations"]) > 0


class NearTruth(L.LightningModule):
    """Stands in for a good detector: each true box shifted by 0..0.75 px (scores falling with the shift), plus a
    copy with the next class at a low score, so that mismatched image or category ids would score near 0."""

    class_names = CLASSES

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def predict_step(self, batch, batch_idx):
        out = []
        for t in batch[1]:
            boxes, labels = t["boxes"].as_subclass(torch.Tensor), t["labels"]
            shift = torch.arange(len(boxes), dtype=torch.float32).remainder(4)[:, None] / 4
            scores = 0.9 - 0.1 * shift[:, 0]
            out.append({"boxes": torch.cat([boxes + shift, boxes]), "labels": torch.cat([labels, labels % 3 + 1]),
                        "scores": torch.cat([scores, scores / 4]), "image_id": t["image_id"]})  # fmt: skip
        return out


@pytest.mark.parametrize(("layout", "split"), [("yolo", "train"), ("yolo", "val"), ("voc", "val")])
def test_evaluate_on_written_yolo_and_voc_files_equals_pycocotools(shapes_dir, tmp_path, train_py, layout, split):
    from .evaluation.helpers import COCO_KEYS, pycocotools_eval

    out = tmp_path / "out"
    data = YoloDetection(shapes_dir, split) if layout == "yolo" else VOCDetection(shapes_dir / "voc", split, CLASSES)
    _predict(NearTruth(), data, CocoPredictionWriter(str(out)))
    gt_file, dt_file = out / "ground_truth.json", out / "predictions.json"
    code, _, err = train_py("evaluate", "--gt", gt_file, "--predictions", dt_file, "--out", tmp_path / "m.json")
    assert code == 0, err[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    stats, per_class, _ = pycocotools_eval(json.loads(gt_file.read_text()), json.loads(dt_file.read_text()))
    assert stats[1] > 0.9  # AP50 of near-true boxes: the ids of both files agree
    np.testing.assert_allclose([metrics[k] for k in COCO_KEYS], stats, rtol=0, atol=1e-6)
    assert {k: metrics[f"ap/{k}"] for k in per_class} == pytest.approx(per_class, abs=1e-6)


@pytest.mark.slow  # the fast path: the writer test above, and fit on format yolo (tests/detectors/data/test_yolo.py)
def test_train_py_predict_then_evaluate_on_yolo_data_equals_pycocotools(shapes_dir, cli_checkpoint, tmp_path,
                                                                          train_py):  # fmt: skip
    from .evaluation.helpers import COCO_KEYS, pycocotools_eval

    out = tmp_path / "out"
    code, _, err = train_py("predict", "--config", REPO_ROOT / "configs" / "faster_rcnn.yaml", *_data_args(shapes_dir),
                            "--data.init_args.format", "yolo", "--ckpt_path", cli_checkpoint, "--predict_out", out,
                            "--runs_dir", tmp_path / "runs", "--trainer.logger", "false",
                            "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert code == 0, err[-3000:]
    gt_file, dt_file = out / "ground_truth.json", out / "predictions.json"
    assert json.loads(dt_file.read_text())  # score_thresh 0: the untrained model detects something
    code, _, err = train_py("evaluate", "--gt", gt_file, "--predictions", dt_file, "--out", tmp_path / "m.json")
    assert code == 0, err[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    stats, per_class, _ = pycocotools_eval(json.loads(gt_file.read_text()), json.loads(dt_file.read_text()))
    np.testing.assert_allclose([metrics[k] for k in COCO_KEYS], stats, rtol=0, atol=1e-6)
    assert {k: metrics[f"ap/{k}"] for k in per_class} == pytest.approx(per_class, abs=1e-6)
