import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from detectors.data.coco import CocoDetection
from training.errors import BadValueError, MissingFileError
from training.images import BadImageError

from .helpers import coco_dict, write_coco, write_image


def xyxy_to_xywh(b):
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def test_samples_match_the_json(coco_files):
    image_root, ann = coco_files
    ds = CocoDetection(image_root, ann)
    data = json.loads(ann.read_text())
    assert len(ds) == 3
    # Categories sorted by id: dog (2) -> label 1, cat (5) -> label 2.
    assert ds.class_names == ["dog", "cat"] and ds.cat_ids == [2, 5]
    assert ds.cat_id_to_label == {2: 1, 5: 2} and ds.label_to_cat_id == {1: 2, 2: 5}
    assert ds.num_classes == 3
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for i in range(len(ds)):
        image, target = ds[i]
        rec = ds.records[i]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32
        assert image.shape == (3, rec.height, rec.width) and 0 <= image.min() and image.max() <= 1
        assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].format.name == "XYXY"
        anns = by_image.get(target["image_id"], [])
        # XYXY -> XYWH gives back exactly the JSON boxes, label -> category id gives back the ids.
        assert [xyxy_to_xywh(b) for b in target["boxes"].tolist()] == [a["bbox"] for a in anns]
        assert [ds.label_to_cat_id[int(label)] for label in target["labels"]] == [a["category_id"] for a in anns]
        assert target["area"].tolist() == [a["area"] for a in anns]
        assert target["iscrowd"].tolist() == [a["iscrowd"] for a in anns]
        # pycocotools sees the same annotations.
        assert [a["id"] for a in ds.coco.imgToAnns[target["image_id"]]] == [a["id"] for a in anns]
    empty = ds[2][1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_pixels_are_the_file_pixels(coco_files):
    image_root, ann = coco_files
    image, _ = CocoDetection(image_root, ann)[1]
    expected = np.asarray(Image.open(image_root / "sub" / "b.png").convert("RGB"))
    np.testing.assert_array_equal((image * 255).round().byte().permute(1, 2, 0).numpy(), expected)


def test_box_anomalies_are_repaired_once_and_reported(tmp_path):
    data = coco_dict()
    data["annotations"] += [
        {"id": 7, "image_id": 10, "category_id": 2, "bbox": [30.0, 25.0, 20.0, 20.0], "area": 1.0},  # overflows
        {"id": 8, "image_id": 10, "category_id": 2, "bbox": [5.0, 5.0, 0.0, 3.0], "area": 0.0},  # zero width
        {"id": 9, "image_id": 11, "category_id": 5, "bbox": [25.0, 5.0, 3.0, 3.0], "area": 9.0},  # outside
    ]
    image_root, ann = write_coco(tmp_path, data)
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(image_root, ann)
    msgs = [str(w.message) for w in record if "degenerate" in str(w.message)]
    assert len(msgs) == 1
    assert "ann.json" in msgs[0] and "dropped 2 degenerate boxes" in msgs[0]
    assert "annotation id 8" in msgs[0] and "annotation id 9" in msgs[0]
    assert "clamped 1 boxes" in msgs[0] and "annotation id 7" in msgs[0]
    boxes = ds[0][1]["boxes"].tolist()
    assert [30.0, 25.0, 40.0, 30.0] in boxes and len(boxes) == 3
    assert len(ds[1][1]["boxes"]) == 1
    with pytest.raises(BadValueError, match=r"ann.json: annotation id 7 extends outside the image|annotation id 8"):
        CocoDetection(image_root, ann, strict=True)


def test_clean_file_warns_nothing(coco_files):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection(*coco_files)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["annotations"][1].update(category_id=9), r"annotation id 2: category_id 9 is not declared"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotation id 1: missing key 'bbox'"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation id 1: bbox must be 4 finite numbers"),
        (lambda d: d["annotations"][2].update(image_id=99), r"annotation id 3: image_id 99 is not declared"),
        (lambda d: d["images"][0].pop("width"), r"images\[0\]: missing key 'width'"),
        (lambda d: d["images"][1].update(id=10), r"image id 10: duplicate image id"),
        (lambda d: d.pop("annotations"), r"expected a list under 'annotations'"),
        (lambda d: d["categories"].append({"id": 2, "name": "x"}), r"duplicate category ids"),
        (lambda d: d["images"][0].update(file_name="../../etc/passwd"), r"image id 10: refusing .*outside"),
        (lambda d: d["images"][0].update(file_name="/etc/passwd"), r"image id 10: refusing absolute image path"),
    ],
)
def test_structural_errors_name_file_and_id(tmp_path, mutate, message):
    data = coco_dict()
    mutate(data)
    image_root, ann = write_coco(tmp_path, data)
    with pytest.raises(BadValueError, match=message) as err:
        CocoDetection(image_root, ann)
    assert str(ann) in str(err.value)


def test_malformed_json_names_file_and_position(tmp_path):
    ann = tmp_path / "broken.json"
    ann.write_text('{"images": [}')
    with pytest.raises(BadValueError, match=r"broken.json: malformed JSON at line 1 column 13"):
        CocoDetection(tmp_path, ann)
    with pytest.raises(MissingFileError, match="missing.json"):
        CocoDetection(tmp_path, tmp_path / "missing.json")


def test_bad_images_raise_or_skip_naming_the_file(tmp_path):
    image_root, ann = write_coco(tmp_path)
    data = (image_root / "a.jpg").read_bytes()
    (image_root / "a.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (image_root / "sub" / "b.png").unlink()  # missing
    ds = CocoDetection(image_root, ann)
    with pytest.raises(BadImageError, match=r"a.jpg: image is truncated"):
        ds[0]
    with pytest.raises(BadImageError, match=r"b.png: image file not found"):
        ds[1]
    skipping = CocoDetection(image_root, ann, on_bad_sample="skip")
    with pytest.warns(UserWarning, match=r"skipping bad sample 0: .*a.jpg"):
        assert skipping[0] is None
    assert skipping[2] is not None


def test_pixel_limit_and_size_mismatch(tmp_path):
    image_root, ann = write_coco(tmp_path)
    ds = CocoDetection(image_root, ann, max_image_pixels=999)
    with pytest.raises(BadImageError, match=r"a.jpg: 40x30 = 1200 pixels exceeds the limit of 999"):
        ds[0]
    write_image(image_root / "empty.jpg", 17, 16)
    with pytest.raises(BadImageError, match=r"empty.jpg: image is 17x16 but the annotations declare 16x16"):
        CocoDetection(image_root, ann)[2]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_any_image_mode_loads_as_rgb(tmp_path, mode):
    data = coco_dict()
    data["images"] = [{"id": 1, "file_name": "x.tif" if mode in ("CMYK", "I;16") else "x.png", "width": 8, "height": 6}]
    data["annotations"] = []
    image_root, ann = write_coco(tmp_path, data)
    path = image_root / data["images"][0]["file_name"]
    if mode == "I;16":
        Image.fromarray(np.full((6, 8), 40000, np.uint16)).save(path)
    else:
        Image.new("RGB", (8, 6), (200, 30, 90)).convert(mode).save(path)
    image, _ = CocoDetection(image_root, ann)[0]
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32
    if mode == "I;16":
        assert torch.allclose(image, torch.full_like(image, (40000 >> 8) / 255))


def test_root_given_as_dot_is_a_valid_root(tmp_path, monkeypatch):
    from detectors.data.samples import check_inside_root

    monkeypatch.chdir(tmp_path)
    assert check_inside_root(".", "sub/x.png", "test") == "sub/x.png"
    with pytest.raises(BadValueError, match="outside"):
        check_inside_root(".", "../x.png", "test")
