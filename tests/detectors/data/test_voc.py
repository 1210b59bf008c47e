import pytest
import torch
from PIL import Image

from detectors.data.voc import VOC_CLASSES, VOCDetection
from training.errors import BadValueError, MissingFileError

from .helpers import write_voc

CLASSES = ["rectangle", "ellipse", "triangle"]


@pytest.fixture
def voc_root(tmp_path):
    return write_voc(
        tmp_path / "voc",
        {
            "0001": (40, 30, [("ellipse", 0, 1, 1, 10, 5), ("triangle", 1, 20, 11, 40, 30)]),
            "0002": (20, 20, []),
            "0003": (20, 20, [("rectangle", 0, 3, 4, 8, 9)]),
        },
        {"train": ["0001", "0002"], "val": ["0003"]},
    )


def test_boxes_convert_from_one_based_inclusive(voc_root):
    ds = VOCDetection(voc_root, "train", classes=CLASSES)
    assert ds.image_names == ["0001", "0002"] and ds.class_names == CLASSES and ds.num_classes == 4
    image, target = ds[0]
    assert image.shape == (3, 30, 40)
    # xmin-1, ymin-1, xmax, ymax: 0-based pixel edges, width = xmax - xmin + 1.
    assert target["boxes"].tolist() == [[0, 0, 10, 5], [19, 10, 40, 30]]
    assert target["labels"].tolist() == [2, 3]
    assert target["difficult"].tolist() == [False, True]
    assert target["area"].tolist() == [50.0, 420.0]
    empty = ds[1][1]
    assert empty["boxes"].shape == (0, 4) and empty["difficult"].dtype == torch.bool
    assert VOCDetection(voc_root, "train", classes=CLASSES, keep_difficult=False)[0][1]["labels"].tolist() == [2]


def test_default_classes_are_pascal_voc(voc_root):
    assert len(VOC_CLASSES) == 20
    with pytest.raises(BadValueError, match=r"0001.xml: <object> #1: class 'ellipse' is not in classes"):
        VOCDetection(voc_root, "train")


def test_malformed_and_missing_files_are_named(voc_root):
    (voc_root / "Annotations" / "0003.xml").write_text("<annotation><size><width>20</width>")
    with pytest.raises(BadValueError, match=r"0003.xml: malformed XML"):
        VOCDetection(voc_root, "val", classes=CLASSES)
    (voc_root / "Annotations" / "0003.xml").write_text(
        "<annotation><size><width>20</width><height>20</height></size>"
        "<object><name>rectangle</name><bndbox><xmin>1</xmin><ymin>x</ymin><xmax>3</xmax><ymax>4</ymax></bndbox>"
        "</object></annotation>"
    )
    with pytest.raises(BadValueError, match=r"0003.xml: <object> #1 <bndbox>: <ymin> is not a number: 'x'"):
        VOCDetection(voc_root, "val", classes=CLASSES)
    (voc_root / "Annotations" / "0003.xml").write_text("<annotation><object><name>rectangle</name></object></annotation>")
    with pytest.raises(BadValueError, match=r"0003.xml: missing <size>"):
        VOCDetection(voc_root, "val", classes=CLASSES)
    (voc_root / "Annotations" / "0003.xml").unlink()
    with pytest.raises(MissingFileError, match=r"0003.xml: annotation file not found"):
        VOCDetection(voc_root, "val", classes=CLASSES)
    with pytest.raises(MissingFileError, match=r"ImageSets/Main/test.txt: split file not found"):
        VOCDetection(voc_root, "test", classes=CLASSES)


def test_image_named_by_the_xml_filename_when_not_id_jpg(voc_root):
    # VOC-style data from annotation tools: PNG images named in <filename>; <id>.jpg still wins when present.
    Image.new("RGB", (20, 20), (255, 0, 0)).save(voc_root / "JPEGImages" / "scan_3.png")
    xml = voc_root / "Annotations" / "0003.xml"
    xml.write_text(xml.read_text().replace("<filename>0003.jpg</filename>", "<filename>scan_3.png</filename>"))
    assert VOCDetection(voc_root, "val", classes=CLASSES)[0][0][1].mean() > 0.2  # 0003.jpg: the helper's noise
    (voc_root / "JPEGImages" / "0003.jpg").unlink()
    red = VOCDetection(voc_root, "val", classes=CLASSES)[0][0]
    assert red.shape == (3, 20, 20) and red[0].min() == 1.0 and red[1:].max() == 0.0  # the PNG
    xml.write_text(xml.read_text().replace("scan_3.png", "../../escape.png"))
    with pytest.raises(BadValueError, match="outside"):
        VOCDetection(voc_root, "val", classes=CLASSES)


def test_split_entries_cannot_escape_the_root(voc_root):
    (voc_root / "ImageSets" / "Main" / "evil.txt").write_text("../../../etc/passwd\n")
    with pytest.raises(BadValueError, match="outside"):
        VOCDetection(voc_root, "evil", classes=CLASSES)


def test_out_of_image_boxes_are_clamped_with_a_warning(tmp_path):
    root = write_voc(tmp_path, {"a": (20, 20, [("rectangle", 0, 5, 5, 30, 12), ("rectangle", 0, 25, 1, 29, 9)])},
                     {"train": ["a"]})  # fmt: skip
    with pytest.warns(UserWarning, match=r"dropped 1 degenerate boxes \(first: a.xml object #2\); clamped 1"):
        ds = VOCDetection(root, "train", classes=CLASSES)
    assert ds[0][1]["boxes"].tolist() == [[4, 4, 20, 12]]
    with pytest.raises(BadValueError, match="strict=True"):
        VOCDetection(root, "train", classes=CLASSES, strict=True)
