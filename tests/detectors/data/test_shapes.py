"""Tests for the synthetic shapes generator, checked with pycocotools and a hand-written VOC parser."""

import contextlib
import io
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detectors.data import shapes as shapes_module
from detectors.data.shapes import SHAPES_CATEGORIES, generate_shapes, shapes_command
from training.errors import BadValueError, FileTakenError

NAMES = {1: "rectangle", 3: "ellipse", 7: "triangle"}
SMALL, LARGE = 32**2, 96**2  # pycocotools' areaRng boundaries
# The smallest splits whose objects still include overlapping boxes, VOC-difficult and too-small-to-crop ones.
PARAMS = dict(num_train=8, num_val=4, image_size=(192, 192), seed=0)
# pycocotools' mask.decode still passes copy=False to numpy 2; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "ds", **PARAMS)


@pytest.fixture(scope="module")
def cocos(dataset):
    return {split: _quiet(COCO, str(dataset[f"{split}_annotations"])) for split in ("train", "val")}


def _split_checks(out: Path, split: str, n_images: int) -> None:
    """Guarantees every split must meet, whatever its size."""
    coco = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
    assert len(coco["images"]) == n_images
    areas = [a["area"] for a in coco["annotations"]]
    assert (
        any(a < SMALL for a in areas)
        and any(SMALL < a < LARGE for a in areas)
        and any(a > LARGE for a in areas)
    )
    assert {a["category_id"] for a in coco["annotations"]} == {1, 3, 7}
    with_objects = {a["image_id"] for a in coco["annotations"]}
    assert any(im["id"] not in with_objects for im in coco["images"])


def test_module_constant():
    assert [(c["id"], c["name"]) for c in SHAPES_CATEGORIES] == sorted(NAMES.items())


def test_coco_files_load_and_match_images(dataset, cocos):
    ids = set()
    for split, coco in cocos.items():
        cats = coco.loadCats(coco.getCatIds())
        assert {c["id"]: c["name"] for c in cats} == NAMES
        assert all(c["supercategory"] for c in cats)
        assert set(coco.dataset) >= {"info", "licenses", "images", "annotations", "categories"}
        assert len(coco.getImgIds()) == PARAMS[f"num_{split}"]
        for img in coco.loadImgs(coco.getImgIds()):
            assert "/" not in img["file_name"] and img["file_name"].endswith(".jpg")
            with Image.open(dataset[f"{split}_images"] / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) == (192, 192) and im.mode == "RGB"
        ids |= set(coco.getImgIds())
    assert len(ids) == PARAMS["num_train"] + PARAMS["num_val"]  # image ids unique across splits


def test_boxes_inside_image_integer_and_positive(cocos):
    for coco in cocos.values():
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert all(isinstance(v, float) and v == int(v) for v in ann["bbox"])
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            assert ann["iscrowd"] == 0 and ann["category_id"] in NAMES


def test_every_split_has_all_sizes_classes_and_an_empty_image(dataset):
    for split in ("train", "val"):
        _split_checks(dataset["root"], split, PARAMS[f"num_{split}"])


def test_rle_masks_agree_with_area_and_bbox_and_do_not_overlap(cocos):
    overlapping_boxes = 0
    for coco in cocos.values():
        for img_id in coco.getImgIds():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            union = np.zeros((192, 192), dtype=np.int32)
            for ann in anns:
                rle = ann["segmentation"]
                assert isinstance(rle["counts"], str)
                assert int(mask_utils.area(rle)) == ann["area"]
                assert mask_utils.toBbox(rle).tolist() == ann["bbox"]
                m = coco.annToMask(ann)
                assert m.shape == (192, 192) and int(m.sum()) == ann["area"]
                union += m
            # Visible masks: every pixel belongs to at most one object, although boxes do overlap.
            assert union.max() <= 1
            boxes = [a["bbox"] for a in anns]
            for i, (x1, y1, w1, h1) in enumerate(boxes):
                for x2, y2, w2, h2 in boxes[i + 1 :]:
                    overlapping_boxes += min(x1 + w1, x2 + w2) > max(x1, x2) and min(y1 + h1, y2 + h2) > max(
                        y1, y2
                    )
    assert overlapping_boxes > 0


def test_pycocotools_evaluates_ground_truth_as_perfect_in_every_area_range(cocos):
    coco = cocos["train"]
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.loadAnns(coco.getAnnIds())
    ]
    evaluator = COCOeval(coco, _quiet(coco.loadRes, dets), "bbox")
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    # AP, AP50, AP75, AP small, medium, large: -1 would mean "no ground truth in this range".
    assert evaluator.stats[:6].tolist() == pytest.approx([1.0] * 6)


def _read_voc(path: Path) -> tuple[str, tuple[int, int], list[tuple[str, list[float], int]]]:
    root = ET.parse(path).getroot()
    size = root.find("size")
    objects = []
    for obj in root.findall("object"):
        b = {k: int(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")}
        # VOC 1-based inclusive corners -> COCO 0-based [x, y, w, h].
        box = [b["xmin"] - 1.0, b["ymin"] - 1.0, b["xmax"] - b["xmin"] + 1.0, b["ymax"] - b["ymin"] + 1.0]
        assert obj.find("pose").text and obj.find("truncated").text in ("0", "1")
        objects.append((obj.find("name").text, box, int(obj.find("difficult").text)))
    hw = (int(size.find("height").text), int(size.find("width").text))
    assert size.find("depth").text == "3"
    return root.find("filename").text, hw, objects


def test_voc_round_trips_to_coco_boxes(dataset, cocos):
    voc = dataset["voc"]
    difficult = 0
    for split, coco in cocos.items():
        listed = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert listed == [Path(img["file_name"]).stem for img in coco.loadImgs(coco.getImgIds())]
        for img in coco.loadImgs(coco.getImgIds()):
            stem = Path(img["file_name"]).stem
            assert (voc / "JPEGImages" / f"{stem}.jpg").is_file()
            filename, hw, objects = _read_voc(voc / "Annotations" / f"{stem}.xml")
            assert filename == f"{stem}.jpg" and hw == (img["height"], img["width"])
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            expected = sorted((NAMES[a["category_id"]], a["bbox"]) for a in anns)
            assert sorted((name, box) for name, box, _ in objects) == expected
            for _, (_, _, w, h), diff in objects:
                if min(w, h) < 8:  # the documented "tiny" half of the difficult rule
                    assert diff == 1
                difficult += diff
    assert difficult > 0
    trainval = (voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    assert len(trainval) == len(set(trainval)) == PARAMS["num_train"] + PARAMS["num_val"]


def test_classification_tree_has_every_class_and_one_crop_per_large_enough_object(dataset, cocos):
    for split, coco in cocos.items():
        root = dataset[f"{split}_classification"]
        assert sorted(p.name for p in root.iterdir()) == sorted(NAMES.values())
        crops = Counter()
        for class_dir in root.iterdir():
            files = list(class_dir.glob("*.png"))
            assert files, f"no {class_dir.name} crops in {split}"
            crops[class_dir.name] = len(files)
            for f in files:
                with Image.open(f) as im:
                    assert min(im.size) >= 8 and im.mode == "RGB"
        expected = Counter(
            NAMES[a["category_id"]] for a in coco.loadAnns(coco.getAnnIds()) if min(a["bbox"][2:]) >= 8
        )
        assert crops == expected


def test_same_seed_same_annotations_other_seed_differs(dataset, tmp_path):
    again = generate_shapes(tmp_path / "again", **PARAMS, voc=False, classification=False)
    other = generate_shapes(tmp_path / "other", **{**PARAMS, "seed": 1}, voc=False, classification=False)
    for split in ("train", "val"):
        key = f"{split}_annotations"
        assert again[key].read_bytes() == dataset[key].read_bytes()
        assert other[key].read_bytes() != dataset[key].read_bytes()
        # Same machine, same libjpeg: the images are byte-identical too.
        first = sorted(dataset[f"{split}_images"].iterdir())[0]
        assert (again[f"{split}_images"] / first.name).read_bytes() == first.read_bytes()
    assert "voc" not in again and not (tmp_path / "again" / "voc").exists()
    assert not (tmp_path / "again" / "classification").exists()


def test_rerun_is_a_no_op_and_other_parameters_raise(dataset):
    watched = [dataset["manifest"], dataset["train_annotations"], next(dataset["train_images"].iterdir())]
    before = [p.stat().st_mtime_ns for p in watched]
    assert generate_shapes(dataset["root"], **PARAMS) == dataset
    assert [p.stat().st_mtime_ns for p in watched] == before
    with pytest.raises(FileTakenError, match="different parameters.*seed"):
        generate_shapes(dataset["root"], **{**PARAMS, "seed": 5})
    with pytest.raises(FileExistsError, match="num_val"):
        generate_shapes(dataset["root"], **{**PARAMS, "num_val": 9})
    assert [p.stat().st_mtime_ns for p in watched] == before


SMALL_SET = ["--height", "160", "--width", "160"]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _error_line(err: str) -> str:
    (line,) = [line for line in err.splitlines() if "error:" in line]  # the usage line lists --overwrite
    return line


def test_overwrite_never_touches_a_folder_that_is_not_a_shapes_dataset(tmp_path, train_py):
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "images" / "000001.jpg").write_bytes(b"a user's photo, named as the generator names its own")
    before = _files(out)
    code, _, err = train_py("shapes", "--out", out, "--num_train", "4", "--num_val", "4", *SMALL_SET,
                            "--overwrite", "true")  # fmt: skip
    line = _error_line(err)
    assert code == 2 and str(out) in line and "holds no shapes dataset" in line
    assert "overwrite" not in line.replace(str(out), "")  # no advice to force it: nothing there may be removed
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left either


def test_overwrite_removes_only_the_files_the_generator_wrote(tmp_path, train_py):
    out, fresh = tmp_path / "ds", tmp_path / "fresh"
    generate_shapes(out, num_train=6, num_val=4, image_size=(160, 160))
    mine = {"notes.txt": b"precious", "images/train/holiday.jpg": b"jpeg bytes",
            "classification/train/rectangle/my_crop.png": b"png bytes", "voc/Annotations/extra.xml": b"<a/>",
            "voc/ImageSets/Main/my_split.txt": b"000001\n", "labels/train/holiday.txt": b"0 0.5 0.5 0.1 0.1\n"}  # fmt: skip
    for name, content in mine.items():
        (out / name).write_bytes(content)
    # Fewer images: 000005-000010 of the old layout have no counterpart in the new one and must go.
    code, stdout, err = train_py("shapes", "--out", out, "--num_train", "4", "--num_val", "4", *SMALL_SET,
                                 "--overwrite", "true")  # fmt: skip
    assert code == 0, err
    assert "generated in" in stdout
    generate_shapes(fresh, num_train=4, num_val=4, image_size=(160, 160))
    assert _files(out) == {**_files(fresh), **mine}  # exactly the new dataset plus every user file, unchanged


def test_an_interrupted_overwrite_is_finished_by_the_next(tmp_path, monkeypatch):
    out, fresh = tmp_path / "ds", tmp_path / "fresh"
    small = dict(image_size=(160, 160), voc=False)
    generate_shapes(out, num_train=6, num_val=4, **small)
    (out / "notes.txt").write_text("precious")
    real_replace, calls = shapes_module.os.replace, []

    def crash_midway(src, dst):
        calls.append(dst)
        if len(calls) == 10:  # the first move publishes the pending manifest, the next ones the new files
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(shapes_module.os, "replace", crash_midway)
    with pytest.raises(OSError, match="No space"):
        generate_shapes(out, num_train=4, num_val=4, overwrite=True, **small)
    monkeypatch.undo()
    with pytest.raises(FileTakenError, match="replacement was interrupted.*--overwrite"):
        generate_shapes(out, num_train=4, num_val=4, **small)
    generate_shapes(out, num_train=4, num_val=4, overwrite=True, **small)
    generate_shapes(fresh, num_train=4, num_val=4, **small)
    assert _files(out) == {**_files(fresh), "notes.txt": b"precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "fresh"]


def test_the_yolo_copy_leaves_coco_and_voc_byte_identical_and_an_older_dataset_gets_it_added(tmp_path):
    small = dict(num_train=4, num_val=4, image_size=(160, 160), classification=False)
    without, with_yolo = tmp_path / "without", tmp_path / "with"
    generate_shapes(without, yolo=False, **small)
    generate_shapes(with_yolo, **small)
    files, yolo_files = _files(without), _files(with_yolo)
    added = sorted(set(yolo_files) - set(files))
    assert added == ["data.yaml", *[f"labels/train/{i:06d}.txt" for i in range(1, 5)],
                     *[f"labels/val/{i:06d}.txt" for i in range(5, 9)]]  # fmt: skip
    assert {k: v for k, v in yolo_files.items() if k in files and k != "shapes.json"} == {
        k: v for k, v in files.items() if k != "shapes.json"}  # COCO, VOC and the images: the same bytes
    # A manifest from before the YOLO copy (no "yolo" parameter) reads as yolo=False; asking for the copy adds it
    # from the COCO files, no overwrite needed, and gives the files a fresh generation writes, byte for byte.
    manifest = json.loads((without / "shapes.json").read_text())
    del manifest["parameters"]["yolo"]
    (without / "shapes.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (without / "labels" / "val").mkdir(parents=True)
    (without / "labels" / "val" / "000005.txt").write_text("mine")  # where the copy would write: refused
    before = _files(without)
    with pytest.raises(FileTakenError, match=r"labels/val/000005.txt is not a file of the shapes dataset"):
        generate_shapes(without, **small)
    assert _files(without) == before
    (without / "labels" / "val" / "000005.txt").unlink()
    generate_shapes(without, **small)
    assert _files(without) == yolo_files


def test_overwrite_refuses_to_replace_a_user_file_the_new_layout_needs(tmp_path):
    out = tmp_path / "ds"
    generate_shapes(out, num_train=4, num_val=4, image_size=(160, 160), voc=False, classification=False)
    (out / "images" / "train" / "000005.jpg").write_text("mine")  # 000005 is a val image of this dataset
    before = _files(out)
    with pytest.raises(FileTakenError, match=r"images/train/000005.jpg is not a file of the shapes dataset"):
        generate_shapes(out, num_train=6, num_val=4, image_size=(160, 160), voc=False, classification=False,
                        overwrite=True)  # fmt: skip
    assert _files(out) == before


def test_empty_existing_directory_is_used(tmp_path):
    (tmp_path / "ds").mkdir()
    paths = generate_shapes(tmp_path / "ds", num_train=4, num_val=4, voc=False, classification=False)
    assert paths["train_annotations"].is_file()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_train": 3}, "num_train"),
        ({"num_val": 0}, "num_val"),
        ({"image_size": (128, 192)}, "height"),
        ({"image_size": (192,)}, "image_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_parameters_raise_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(BadValueError, match=message):
        generate_shapes(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_shapes_command_reports_counts_and_no_op(tmp_path, train_py):
    args = ["shapes", "--out", tmp_path / "ds", "--num_train", 4, "--num_val", 4, "--voc", "false", "--width", 160]
    code, first, _ = train_py(*args)
    assert code == 0 and str(tmp_path / "ds") in first and "generated" in first and "train: 4 images" in first
    assert not (tmp_path / "ds" / "voc").exists() and (tmp_path / "ds" / "classification").is_dir()
    code, again, _ = train_py(*args)
    assert code == 0 and "nothing written" in again
    code, _, err = train_py(*args[:-1], 170)  # other parameters: a usage error, one line, no traceback
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "--overwrite" in line and "Traceback" not in err


def test_shapes_command_with_minimum_split_size(tmp_path, capsys):
    out = tmp_path / "cli"
    shapes_command(str(out), num_train=4, num_val=4, seed=3)
    assert str(out) in capsys.readouterr().out
    for split in ("train", "val"):  # the guarantees hold even for the smallest allowed split
        _split_checks(out, split, 4)
    assert (out / "voc" / "ImageSets" / "Main" / "val.txt").is_file()


def test_a_concurrent_generation_keeps_the_dataset_published_first(tmp_path, monkeypatch):
    """Two DDP ranks generating at once: the second finds the first's dataset and leaves it alone."""
    out = tmp_path / "race"
    kwargs = dict(num_train=4, num_val=4, image_size=(160, 160), voc=False, classification=False)
    real_write = shapes_module.write_dataset
    raced = []

    def write_while_another_rank_finishes(tmp, params):
        real_write(tmp, params)
        if not raced:
            raced.append(None)
            shapes_module.generate_shapes(out, **kwargs)  # the other rank publishes first
            raced[0] = (out / "shapes.json").stat().st_ino

    monkeypatch.setattr(shapes_module, "write_dataset", write_while_another_rank_finishes)
    paths = shapes_module.generate_shapes(out, **kwargs)
    assert raced and (out / "shapes.json").stat().st_ino == raced[0]  # the first dataset was not replaced
    assert paths["val_annotations"].is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".race")]  # no temp dirs left behind
