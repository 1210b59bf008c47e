"""YOLO (Ultralytics) datasets: a hand-made dataset whose every number is known, the shapes dataset's three copies,
malformed rows and data.yaml files, and format yolo through the DataModule and `train.py fit`."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from detectors.data import CocoDetection, DetectionDataModule, VOCDetection
from detectors.data.yolo import TOLERANCE, YoloDetection, label_path
from training.errors import BadFileError, BadValueError, MissingFileError
from training.images import BadImageError

from .helpers import write_image

REPO = Path(__file__).resolve().parents[3]
YAML = """path: {path}
train: images/train
val: images/val
names:
  0: cat
  1: dog
"""


def write_yolo(root: Path, labels: dict[str, str], sizes: dict[str, tuple[int, int]], path: str = ".") -> Path:
    """``root/data.yaml`` and images/<split>/NAME of ``sizes`` (width, height), labels/<split>/STEM.txt of
    ``labels`` (keys: "split/NAME" of the image, values: the file's text)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(YAML.format(path=path))
    for i, (name, (w, h)) in enumerate(sizes.items()):
        write_image(root / "images" / name, w, h, seed=i)
    for name, text in labels.items():
        target = root / "labels" / Path(name).with_suffix(".txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root


def hand_made(root: Path) -> Path:
    sizes = {"train/b.jpg": (40, 20), "train/a.png": (100, 50), "train/sub/c.jpg": (16, 16), "train/d.jpg": (8, 8),
             "val/v.jpg": (10, 10)}  # fmt: skip
    labels = {
        # a.png 100 x 50: dog centred at (25, 10), 10 x 4 -> [20, 8, 30, 12]; cat covering the image
        "train/a.png": "1 0.25 0.2 0.1 0.08\n\n0 0.5 0.5 1.0 1.0\n",
        # b.jpg 40 x 20: cat [4, 2, 12, 18], written with a class "0.0" and extra spaces
        "train/b.jpg": "0.0   0.2 0.5  0.2 0.8\n",
        "train/sub/c.jpg": "",  # empty: no objects
        # d.jpg: no label file at all: no objects
        "val/v.jpg": "1 0.5 0.5 0.2 0.2\n",
    }
    return write_yolo(root, labels, sizes)


def test_hand_made_dataset_targets(tmp_path):
    root = hand_made(tmp_path / "ds")
    ds = YoloDetection(root, "train")
    assert ds.class_names == ["cat", "dog"]
    # image ids: positions in the sorted path list (sub/c.jpg sorts after d.jpg: "d" < "s")
    names = [Path(r.path).relative_to(root / "images" / "train").as_posix() for r in ds.records]
    assert names == ["a.png", "b.jpg", "d.jpg", "sub/c.jpg"] and [r.image_id for r in ds.records] == [0, 1, 2, 3]
    image, target = ds[0]
    assert image.shape == (3, 50, 100)
    assert target["boxes"].tolist() == [[20.0, 8.0, 30.0, 12.0], [0.0, 0.0, 100.0, 50.0]]
    assert target["labels"].tolist() == [2, 1]  # YOLO class c -> label c + 1
    assert target["area"].tolist() == [40.0, 5000.0] and target["iscrowd"].tolist() == [0, 0]
    assert target["image_id"] == 0
    _, target = ds[1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 2.0, 12.0, 18.0]]), atol=1e-5, rtol=0)
    assert target["labels"].tolist() == [1]
    for index in (2, 3):  # no label file, an empty one
        _, target = ds[index]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert len(YoloDetection(root, "val")) == 1


def test_ultralytics_label_path_rule():
    assert label_path("/d/images/train/x.jpg") == "/d/labels/train/x.txt"
    assert label_path("/images/d/images/a/images.b.png") == "/images/d/labels/a/images.b.txt"  # the last /images/
    assert label_path("/d/train/x.jpeg") == "/d/train/x.txt"  # no images folder: beside the image


def test_split_as_txt_list_and_relative_path_and_roboflow_fallback(tmp_path):
    root = hand_made(tmp_path / "ds")
    (root / "lists").mkdir()
    (root / "lists" / "some.txt").write_text("./../images/train/b.jpg\n\n../images/val/v.jpg\n")
    outer = tmp_path / "yaml_elsewhere"
    outer.mkdir()
    (outer / "data.yaml").write_text("path: ../ds\ntrain: lists/some.txt\nval: ../images/val\nnames: [cat, dog]\n")
    ds = YoloDetection(outer, "train")
    assert [Path(r.path).name for r in ds.records] == ["b.jpg", "v.jpg"]
    assert ds.records[1].labels.tolist() == [2]
    assert len(YoloDetection(outer, "val")) == 1  # "../images/val" does not exist under path: tried without ../


def test_a_list_line_outside_the_root_is_refused(tmp_path):
    root = hand_made(tmp_path / "ds")
    (root / "list.txt").write_text("images/train/b.jpg\n../../etc/passwd.jpg\n")
    (root / "data.yaml").write_text("train: list.txt\nnames: [cat, dog]\n")
    with pytest.raises(BadValueError, match=rf"{root}/list.txt:2: refusing .* resolves outside"):
        YoloDetection(root, "train")


ROWS = [  # a malformed row of a.png's label file -> what the error says
    ("1 0.5 0.5 0.2", "expected 5 fields 'class cx cy w h', got 4"),
    ("1 0.1 0.1 0.2 0.1 0.2 0.2", r"expected 5 fields .*, got 7 \(a segmentation polygon row"),
    ("1 0.5 abc 0.2 0.2", "not a number"),
    ("1 0.5 nan 0.2 0.2", "not a finite number"),
    ("2 0.5 0.5 0.2 0.2", "class 2 is not a class index 0..1"),
    ("-1 0.5 0.5 0.2 0.2", "class -1 is not a class index"),
    ("0.5 0.5 0.5 0.2 0.2", "class 0.5 is not a class index"),
    ("0 1.2 0.5 0.2 0.2", "cx cy w h must be normalised to 0..1, got 1.2 0.5 0.2 0.2"),
    ("0 0.5 0.5 -0.1 0.2", "cx cy w h must be normalised to 0..1, got 0.5 0.5 -0.1"),
]


@pytest.mark.parametrize(("row", "says"), ROWS)
def test_a_malformed_row_names_the_file_and_line(tmp_path, row, says):
    root = hand_made(tmp_path / "ds")
    path = root / "labels" / "train" / "a.txt"
    path.write_text(f"0 0.5 0.5 0.2 0.2\n{row}\n")
    with pytest.raises(BadValueError, match=rf"^{path}:2: {says}"):
        YoloDetection(root, "train")


def test_box_repairs_follow_the_coco_rules_with_file_and_line(tmp_path):
    root = hand_made(tmp_path / "ds")
    path = root / "labels" / "train" / "a.txt"
    near = 1 + TOLERANCE / 2  # a writer's rounding: snapped to the edge, no warning
    path.write_text(f"0 0.5 0.5 {near} {near}\n0 0.5 0.5 0.0 0.2\n0 0.95 0.5 0.2 0.2\n")
    with pytest.warns(UserWarning) as record:
        ds = YoloDetection(root, "train")
    (message,) = [str(w.message) for w in record]
    assert f"dropped 1 degenerate boxes (first: {path}:2)" in message
    assert f"clamped 1 boxes to the image (first: {path}:3)" in message
    assert ds.records[0].boxes.tolist() == [[0, 0, 100, 50], [85, 20, 100, 30]]
    with pytest.raises(BadValueError, match=rf"{path}:2 has non-positive width or height \(strict=True"):
        YoloDetection(root, "train", strict=True)


YAMLS = [  # data.yaml text -> what the error says (read for the train split)
    ("train: images/train\n", BadValueError, r"missing key 'names'"),
    ("names: [cat, dog]\nval: images/val\n", BadValueError, r"no split 'train' \(its splits: 'val'\)"),
    ("names: [cat, dog]\ntrain: images/nope\n", MissingFileError, r"'train' names .*images/nope, which does not"),
    ("path: nowhere\nnames: [cat, dog]\ntrain: images/train\n", MissingFileError, "'path' names .*nowhere"),
    ("names: {0: cat, 2: dog}\ntrain: images/train\n", BadValueError, r"'names' keys must be 0..1"),
    ("names: [cat, cat]\ntrain: images/train\n", BadValueError, "class names must be unique"),
    ("nc: 3\nnames: [cat, dog]\ntrain: images/train\n", BadValueError, "'nc' is 3 but 'names' lists 2"),
    ("names: [cat, dog\ntrain: images/train\n", BadValueError, "malformed YAML at line 2"),
    ("- names\n", BadValueError, "expected a mapping"),
]


@pytest.mark.parametrize(("text", "error", "says"), YAMLS)
def test_a_bad_data_yaml_names_the_file(tmp_path, text, error, says):
    root = hand_made(tmp_path / "ds")
    (root / "data.yaml").write_text(text)
    with pytest.raises(error, match=rf"^{root}/data.yaml: {says}"):
        YoloDetection(root, "train")


def test_an_unreadable_image_fails_first_with_raise_and_is_skipped_with_skip(tmp_path):
    root = hand_made(tmp_path / "ds")
    broken = root / "images" / "train" / "b.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(BadImageError, match=rf"1 of 4 images cannot be read: {broken}: not a readable image"):
        YoloDetection(root, "train")
    ds = YoloDetection(root, "train", on_bad_sample="skip")
    assert len(ds) == 4 and ds.aspect_ratios()[1] == 1.0
    with pytest.warns(UserWarning, match=rf"skipping bad sample 1: {broken}"):
        assert ds[1] is None
    assert ds[0] is not None


def test_shapes_coco_voc_and_yolo_copies_give_identical_targets(tmp_path):
    """The generator writes every box integer-aligned; YOLO's normalised values (the shortest decimal that reads
    back as the same float64) give the pixels back within ~1e-13 px in float64, so the float32 targets may
    differ at most by float32 rounding: one ulp at 128..256 px is 1.5e-5, hence atol 2e-5 px. The image is
    176 x 192 px: not square, and k/176, k/192 have no short decimal form (k/160 has: 6 decimals are exact)."""
    from detectors.data.shapes import generate_shapes

    shapes_dir = tmp_path / "shapes"
    generate_shapes(shapes_dir, num_train=4, num_val=4, image_size=(176, 192), classification=False)
    for split in ("train", "val"):
        coco = CocoDetection(shapes_dir / "images" / split, shapes_dir / "annotations" / f"instances_{split}.json")
        yolo = YoloDetection(shapes_dir, split)
        voc = VOCDetection(shapes_dir / "voc", split, classes=yolo.class_names)
        assert coco.class_names == voc.class_names == yolo.class_names == ["rectangle", "ellipse", "triangle"]
        assert len(coco) == len(voc) == len(yolo) > 0
        for i in range(len(yolo)):
            (img_c, t_c), (img_v, t_v), (img_y, t_y) = coco.load(i), voc.load(i), yolo.load(i)
            assert torch.equal(img_c, img_y) and torch.equal(img_v, img_y)  # the same image, in the same order
            for other in (t_c, t_v):
                torch.testing.assert_close(t_y["boxes"].as_subclass(torch.Tensor),
                                           other["boxes"].as_subclass(torch.Tensor), atol=2e-5, rtol=0)  # fmt: skip
                assert torch.equal(t_y["labels"], other["labels"]) and torch.equal(t_y["iscrowd"], other["iscrowd"])
            # area: VOC and YOLO know the box only; COCO's is the visible mask's pixel count
            torch.testing.assert_close(t_y["area"], t_v["area"], atol=1e-3, rtol=0)


def test_datamodule_reads_names_without_a_split_and_checks_classes(tmp_path):
    root = hand_made(tmp_path / "ds")
    (root / "data.yaml").write_text("train: images/nope\nnames: {0: cat, 1: dog}\n")  # no split is read
    assert DetectionDataModule(str(root), format="yolo").class_names == ["cat", "dog"]
    root = hand_made(tmp_path / "ds2")
    dm = DetectionDataModule(str(root), format="yolo", classes=["dog", "cat"], num_workers=0)
    with pytest.raises(BadValueError, match=r"data.yaml: names \['cat', 'dog'\] differ from data.init_args.classes"):
        dm.setup("fit")
    dm = DetectionDataModule(str(root), format="yolo", num_workers=0, batch_size=2)
    dm.setup("fit")
    images, targets = next(iter(dm.val_dataloader()))
    assert targets[0]["labels"].tolist() == [2]
    with pytest.raises(BadValueError, match="images_dir does not apply to format yolo"):
        DetectionDataModule(str(root), format="yolo", images_dir="images/{split}")


def test_a_shapes_dataset_without_the_yolo_copy_gets_it_with_generate(tmp_path):
    from detectors.data.shapes import generate_shapes

    root, fresh = tmp_path / "shapes", tmp_path / "fresh"
    small = dict(num_train=4, num_val=4, image_size=(160, 160), voc=False, classification=False)
    generate_shapes(root, yolo=False, **small)
    with pytest.raises(MissingFileError, match=r"no YOLO copy: data.init_args.generate true adds it"):
        _ = DetectionDataModule(str(root), format="yolo").class_names
    assert DetectionDataModule(str(root), format="yolo", generate=True).class_names == ["rectangle", "ellipse",
                                                                                         "triangle"]  # fmt: skip
    generate_shapes(fresh, **small)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == sorted(p.relative_to(fresh) for p in fresh.rglob("*"))


def test_fit_trains_on_the_yolo_copy(shapes_dir, tmp_path, train_py, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # the config's backbone_checkpoint is missing here: a warning, not an error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, _, err = train_py(
            "fit", "--config", REPO / "configs" / "faster_rcnn.yaml", "--runs_dir", tmp_path / "runs",
            "--data.init_args.format", "yolo", "--data.init_args.root", shapes_dir, "--data.init_args.generate",
            "false", "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
            "--model.init_args.min_size", "64", "--model.init_args.max_size", "64", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert code == 0, err[-3000:]
    ckpt = torch.load(tmp_path / "runs" / "faster_rcnn" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # two training steps on the YOLO copy
    assert ckpt["hyper_parameters"]["class_names"] == ["rectangle", "ellipse", "triangle"]  # from data.yaml


def test_a_label_path_that_is_a_folder_is_named(tmp_path):
    root = hand_made(tmp_path / "ds")
    (root / "labels" / "train" / "d.txt").mkdir()  # where d.jpg's label file would be
    with pytest.raises(BadFileError, match=rf"^{root}/labels/train/d.txt: cannot be read as a label file"):
        YoloDetection(root, "train")


@pytest.mark.parametrize("orientation", [6, 3])
def test_exif_orientation_is_applied_as_annotation_tools_show_the_image(tmp_path, orientation):
    from PIL import Image, ImageOps

    root = hand_made(tmp_path / "ds")
    path = root / "images" / "train" / "b.jpg"  # stored 40 x 20; tag 6: shown 20 x 40 (turned 90 degrees)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.open(path).save(path, exif=exif)
    (root / "labels" / "train" / "b.txt").write_text("0 0.5 0.25 0.5 0.25\n")  # drawn on the upright image
    ds = YoloDetection(root, "train")
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")  # PIL's own reading of the tag
    width, height = upright.size
    assert (width, height) == ((20, 40) if orientation == 6 else (40, 20))
    image, target = ds[1]
    assert torch.equal((image * 255).round().to(torch.uint8), torch.from_numpy(np.array(upright)).permute(2, 0, 1))
    assert target["boxes"].tolist() == [[width / 4, height / 8, width * 3 / 4, height * 3 / 8]]
    assert ds.header_errors() == {}


def test_a_roboflow_export_reads_as_ultralytics_reads_it(tmp_path):
    """Roboflow's layout: <split>/images and <split>/labels, and data.yaml entries starting with ../"""
    root = tmp_path / "export"
    write_image(root / "train" / "images" / "x_jpg.rf.1.jpg", 32, 16)
    write_image(root / "valid" / "images" / "y_jpg.rf.2.jpg", 16, 16)
    (root / "train" / "labels").mkdir()
    (root / "train" / "labels" / "x_jpg.rf.1.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\n\nnc: 2\nnames: ['cat', 'dog']\n"
                                    "roboflow:\n  workspace: w\n  version: 1\n")  # fmt: skip
    dm = DetectionDataModule(str(root), format="yolo", num_workers=0)
    assert dm.class_names == ["cat", "dog"]
    dm.setup("fit")
    _, target = dm.datasets["train"].load(0)
    assert target["boxes"].tolist() == [[8.0, 4.0, 24.0, 12.0]] and target["labels"].tolist() == [2]
    assert len(dm.datasets["val"]) == 1 and len(dm.datasets["val"].load(0)[1]["boxes"]) == 0
