"""Tiny hand-made COCO and VOC datasets whose every number is known."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = [{"id": 5, "name": "cat", "supercategory": "animal"}, {"id": 2, "name": "dog", "supercategory": "animal"}]


def write_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def coco_dict() -> dict:
    return {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 11, "file_name": "sub/b.png", "width": 20, "height": 50},
            {"id": 12, "file_name": "empty.jpg", "width": 16, "height": 16},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 2, "bbox": [1.5, 2.0, 10.0, 5.0], "area": 40.0, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 5, "bbox": [20.0, 10.0, 15.0, 15.0], "area": 200.0, "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 5, "bbox": [0.0, 0.0, 20.0, 50.0], "area": 1000.0, "iscrowd": 0},
        ],
        "categories": [dict(c) for c in CATEGORIES],
    }


def write_coco(root: Path, data: dict | None = None) -> tuple[Path, Path]:
    """Writes images/ and ann.json under root; returns (image_root, annotation_file)."""
    data = coco_dict() if data is None else data
    image_root = root / "images"
    for img in data.get("images", []):
        if ".." in img["file_name"] or img["file_name"].startswith("/"):
            continue
        write_image(image_root / img["file_name"], img.get("width", 8), img.get("height", 8), seed=img["id"])
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return image_root, ann


VOC_XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  {objects}
</annotation>"""
VOC_OBJECT = """<object><name>{cls}</name><pose>Unspecified</pose><truncated>0</truncated>
  <difficult>{difficult}</difficult>
  <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def write_voc(root: Path, images: dict[str, tuple[int, int, list[tuple]]], splits: dict[str, list[str]]) -> Path:
    """images: name -> (width, height, [(cls, difficult, xmin, ymin, xmax, ymax), ...])."""
    for name, (w, h, objs) in images.items():
        write_image(root / "JPEGImages" / f"{name}.jpg", w, h)
        objects = "\n".join(
            VOC_OBJECT.format(cls=c, difficult=d, x1=x1, y1=y1, x2=x2, y2=y2) for c, d, x1, y1, x2, y2 in objs
        )
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{name}.xml").write_text(VOC_XML.format(name=name, w=w, h=h, objects=objects))
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for split, names in splits.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root
