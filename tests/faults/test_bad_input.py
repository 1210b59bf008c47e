"""Bad input through the real commands: broken data files in COCO, VOC and YOLO layouts, and broken images, each made
from a copy of the small shapes set and run through ``fit`` (a broken train split and a broken val split),
``validate``, ``predict``, ``compare`` and ``evaluate`` with configs/faster_rcnn.yaml shrunk in size only.

Each case must end as a usage error: exit status 2 and one ``error:`` line that names the broken file and says
what is wrong, no traceback, and no run folder (or compare report folder) left behind. With ``on_bad_sample:
skip`` a broken image is skipped, the run finishes, and the warning names the file.

One case of each group runs in ``make test``; the whole corpus is ``slow`` (``make test-faults``).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["rectangle", "ellipse", "triangle"]  # the shapes categories in id order (1, 3, 7)
DATA_COMMANDS = ("fit:train", "fit:val", "validate", "predict", "compare")


# -- how each kind breaks a copy of the data: (data root, split) -> the file it broke -----------------------


Locate = Callable[[Path, str], Path]  # (data root, split) -> one file of that split


def rewritten(locate: Locate, content: Callable[[bytes], bytes]) -> Callable[[Path, str], Path]:
    """Breaks the located file by replacing its bytes with ``content(its bytes)``."""
    def breaks(root: Path, split: str) -> Path:
        path = locate(root, split)
        path.write_bytes(content(path.read_bytes()))
        return path

    return breaks


def deleted(locate: Locate) -> Callable[[Path, str], Path]:
    """Breaks the split by deleting the located file."""
    def breaks(root: Path, split: str) -> Path:
        path = locate(root, split)
        path.unlink()
        return path

    return breaks


def coco_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}.json"


def coco_edit(change: Callable[[dict], object]) -> Callable[[Path, str], Path]:
    def breaks(root: Path, split: str) -> Path:
        path = coco_file(root, split)
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))  # NaN is written as the bare NaN Python's json reads back
        return path

    return breaks


DELETE = object()  # a value of first_entry: remove the key


def first_entry(section: str, key: str, value) -> Callable[[dict], None]:
    """A change of the first entry of ``section`` ("images", "annotations"): ``key`` set to ``value``."""

    def change(data: dict) -> None:
        entry = data[section][0]
        if value is DELETE:
            del entry[key]
        else:
            entry[key] = value

    return change


def first_annotation(key: str, value) -> Callable[[dict], None]:
    return first_entry("annotations", key, value)


def first_image(key: str, value) -> Callable[[dict], None]:
    return first_entry("images", key, value)


def duplicate_image_id(data: dict) -> None:
    data["images"][1]["id"] = data["images"][0]["id"]


def duplicate_category_id(data: dict) -> None:
    data["categories"][1]["id"] = data["categories"][0]["id"]


def negative_width(data: dict) -> None:
    data["annotations"][0]["bbox"][2] = -5


def rename_categories(data: dict) -> None:
    data["categories"][0]["name"] = "square"


def voc_dir(root: Path) -> Path:
    return root / "voc"


def voc_split_file(root: Path, split: str) -> Path:
    return voc_dir(root) / "ImageSets" / "Main" / f"{split}.txt"


def voc_xml(root: Path, split: str) -> Path:
    name = voc_split_file(root, split).read_text().split()[0]
    return voc_dir(root) / "Annotations" / f"{name}.xml"


def voc_edit(change: Callable[[ET.Element], object]) -> Callable[[Path, str], Path]:
    def breaks(root: Path, split: str) -> Path:
        path = voc_xml(root, split)
        tree = ET.parse(path)
        change(tree.getroot())
        tree.write(path)
        return path

    return breaks


def voc_split_traversal(root: Path, split: str) -> Path:
    path = voc_split_file(root, split)
    path.write_text("../../../../etc/passwd\n" + path.read_text())
    return path


def voc_filename_traversal(root: Path, split: str) -> Path:
    """<filename> names the image when JPEGImages/<id>.jpg does not exist: here it points outside the root."""
    path = voc_xml(root, split)
    (voc_dir(root) / "JPEGImages" / f"{path.stem}.jpg").unlink()
    tree = ET.parse(path)
    tree.getroot().find("filename").text = "../../../../etc/passwd"
    tree.write(path)
    return path


def set_text(tag: str, value: str) -> Callable[[ET.Element], None]:
    """The first ``tag`` anywhere in the annotation gets ``value``."""

    def change(ann: ET.Element) -> None:
        ann.find(f".//{tag}").text = value

    return change


def remove(parent: str, tag: str) -> Callable[[ET.Element], None]:
    def change(ann: ET.Element) -> None:
        holder = ann.find(f".//{parent}") if parent else ann
        holder.remove(holder.find(tag))

    return change


def flip_box(ann: ET.Element) -> None:
    box = ann.find(".//bndbox")
    xmin, xmax = box.find("xmin"), box.find("xmax")
    xmin.text, xmax.text = xmax.text, xmin.text


def yolo_yaml(root: Path, split: str) -> Path:
    return root / "data.yaml"


def yolo_label(root: Path, split: str) -> Path:
    """The split's first label file (images 0..2 of a shapes split each hold an object)."""
    return sorted((root / "labels" / split).glob("*.txt"))[0]


def yolo_row(change: Callable[[list[str]], list[str]]) -> Callable[[Path, str], Path]:
    """The first row of the split's first label file, its fields changed."""
    def content(data: bytes) -> bytes:
        first, *rest = data.decode().splitlines(keepends=True)
        return (" ".join(change(first.split())) + "\n" + "".join(rest)).encode()

    return rewritten(yolo_label, content)


def yolo_field(index: int, value: str) -> Callable[[Path, str], Path]:
    return yolo_row(lambda fields: [value if i == index else f for i, f in enumerate(fields)])


def yolo_split_folder(root: Path, split: str) -> Path:
    """data.yaml's entry of the split names a folder that does not exist."""
    path = yolo_yaml(root, split)
    path.write_text(path.read_text().replace(f"{split}: images/{split}", f"{split}: images/{split}-missing"))
    return path


def yolo_image(root: Path, split: str) -> Path:
    return sorted((root / "images" / split).glob("*.jpg"))[0]


def image_file(root: Path, split: str) -> Path:
    """The first image of the split's COCO file (images/<split>/...)."""
    data = json.loads(coco_file(root, split).read_text())
    return root / "images" / split / data["images"][0]["file_name"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's), with a few bytes of
    pixel data: what a reader sees before it decodes."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def other_size_jpeg(_: bytes) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (128, 64, 32)).save(buffer, format="JPEG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Kind:
    """A kind of broken input: ``breaks`` damages a copy of the data and returns the damaged file, which the
    error must name, with a match of ``says``; ``args`` are the data settings the case runs with."""

    name: str
    layout: str  # "coco", "voc", "yolo" or "image" (an image file, COCO layout)
    breaks: Callable[[Path, str], Path]
    says: str
    commands: tuple[str, ...] = (*DATA_COMMANDS, "evaluate")
    args: tuple[str, ...] = ()
    xfail: str | None = None  # a reader that lacks the check: the case documents it


STRICT = ("--data.init_args.strict", "true")

KINDS = [
    # COCO instances files
    Kind("coco-malformed", "coco", rewritten(coco_file, lambda b: b.replace(b'"images":', b'"images"', 1)), "malformed JSON"),
    Kind("coco-truncated", "coco", rewritten(coco_file, lambda b: b[: len(b) // 2]), "malformed JSON"),
    Kind("coco-empty", "coco", rewritten(coco_file, lambda b: b""), "malformed JSON"),
    Kind("coco-not-utf8", "coco", rewritten(coco_file, lambda b: b"\xff\xfe" + b), "not UTF-8"),
    Kind("coco-missing-file", "coco", deleted(coco_file), "no such COCO annotation file|file not found"),  # data | evaluate
    Kind("coco-not-an-object", "coco", rewritten(coco_file, lambda b: b"[]"), "expected a (JSON|COCO ground-truth) object"),
    Kind("coco-no-images", "coco", coco_edit(lambda d: d.pop("images")), "'images'"),
    Kind("coco-no-categories", "coco", coco_edit(lambda d: d.pop("categories")), "'categories'"),
    Kind("coco-no-bbox", "coco", coco_edit(first_annotation("bbox", DELETE)), "missing key 'bbox'"),
    Kind("coco-nan-bbox", "coco", coco_edit(first_annotation("bbox", [1.0, 2.0, float("nan"), 4.0])),
         "(bbox|'bbox') must be"),
    Kind("coco-short-bbox", "coco", coco_edit(first_annotation("bbox", [1, 2, 3])), "(bbox|'bbox') must be"),
    Kind("coco-undeclared-category", "coco", coco_edit(first_annotation("category_id", 99)),
         "category_id 99 is not"),
    Kind("coco-undeclared-image", "coco", coco_edit(first_annotation("image_id", 12345)), "image_id 12345 is not"),
    Kind("coco-duplicate-image-id", "coco", coco_edit(duplicate_image_id), "duplicate image id"),
    Kind("coco-duplicate-category-id", "coco", coco_edit(duplicate_category_id), "(duplicate category ids|unique)"),
    Kind("coco-string-id", "coco", coco_edit(first_image("id", "1")), "'id' must be int"),
    # what only a reader of the images needs (evaluate does not open them)
    Kind("coco-no-file-name", "coco", coco_edit(first_image("file_name", DELETE)), "missing key 'file_name'",
         DATA_COMMANDS),
    Kind("coco-zero-width", "coco", coco_edit(first_image("width", 0)), "must be positive", DATA_COMMANDS),
    Kind("coco-path-traversal", "coco", coco_edit(first_image("file_name", "../../../../etc/passwd")),
         "resolves outside", DATA_COMMANDS),
    Kind("coco-absolute-path", "coco", coco_edit(first_image("file_name", "/etc/passwd")), "absolute image path",
         DATA_COMMANDS),
    Kind("coco-negative-box-strict", "coco", coco_edit(negative_width), "non-positive width or height",
         DATA_COMMANDS, STRICT),
    Kind("coco-categories-differ", "coco", coco_edit(rename_categories), "differ from", ("fit:train",)),
    # Pascal VOC files
    Kind("voc-malformed", "voc", rewritten(voc_xml, lambda b: b.replace(b"</size>", b"", 1)), "malformed XML", DATA_COMMANDS),
    Kind("voc-truncated", "voc", rewritten(voc_xml, lambda b: b[: len(b) // 2]), "malformed XML", DATA_COMMANDS),
    Kind("voc-empty", "voc", rewritten(voc_xml, lambda b: b""), "malformed XML", DATA_COMMANDS),
    Kind("voc-missing-xml", "voc", deleted(voc_xml), "annotation file not found", DATA_COMMANDS),
    Kind("voc-missing-split-file", "voc", deleted(voc_split_file), "split file not found", DATA_COMMANDS),
    Kind("voc-no-size", "voc", voc_edit(remove("", "size")), "missing <size>", DATA_COMMANDS),
    Kind("voc-no-bndbox", "voc", voc_edit(remove("object", "bndbox")), "missing <bndbox>", DATA_COMMANDS),
    Kind("voc-not-a-number", "voc", voc_edit(set_text("xmin", "abc")), "is not a number", DATA_COMMANDS),
    Kind("voc-nan-coordinate", "voc", voc_edit(set_text("xmin", "nan")), "(not a (finite )?number|finite)",
         DATA_COMMANDS),
    Kind("voc-undeclared-class", "voc", voc_edit(set_text("name", "dog")), "class 'dog' is not in classes",
         DATA_COMMANDS),
    Kind("voc-zero-width", "voc", voc_edit(set_text("width", "0")), "must be positive", DATA_COMMANDS),
    Kind("voc-negative-box-strict", "voc", voc_edit(flip_box), "non-positive width or height", DATA_COMMANDS,
         STRICT),
    Kind("voc-filename-traversal", "voc", voc_filename_traversal, "resolves outside", DATA_COMMANDS),
    Kind("voc-split-traversal", "voc", voc_split_traversal, "resolves outside", DATA_COMMANDS),
    # YOLO label files and data.yaml
    Kind("yolo-short-row", "yolo", yolo_row(lambda fields: fields[:4]), "expected 5 fields 'class cx cy w h', got 4",
         DATA_COMMANDS),
    Kind("yolo-not-a-number", "yolo", yolo_field(2, "abc"), "not a number", DATA_COMMANDS),
    Kind("yolo-nan", "yolo", yolo_field(3, "nan"), "not a finite number", DATA_COMMANDS),
    Kind("yolo-class-out-of-range", "yolo", yolo_field(0, "3"), "class 3 is not a class index 0..2", DATA_COMMANDS),
    Kind("yolo-outside-0-1", "yolo", yolo_field(1, "1.5"), "must be normalised to 0..1", DATA_COMMANDS),
    Kind("yolo-zero-size-strict", "yolo", yolo_field(3, "0"), "non-positive width or height", DATA_COMMANDS,
         STRICT),
    Kind("yolo-not-utf8", "yolo", rewritten(yolo_label, lambda b: b"\xff\xfe" + b), "not UTF-8", DATA_COMMANDS),
    Kind("yolo-yaml-malformed", "yolo", rewritten(yolo_yaml, lambda b: b"names: [a, b\n" + b), "malformed YAML",
         DATA_COMMANDS),
    Kind("yolo-yaml-no-names", "yolo", rewritten(yolo_yaml, lambda b: b.split(b"names:")[0]), "missing key 'names'",
         DATA_COMMANDS),
    Kind("yolo-yaml-missing", "yolo", deleted(yolo_yaml), "file not found", DATA_COMMANDS),
    Kind("yolo-split-folder-missing", "yolo", yolo_split_folder, "which does not exist", DATA_COMMANDS),
    Kind("yolo-image-not-an-image", "yolo", rewritten(yolo_image, lambda b: b"just text\n" * 20),
         "not a readable image", DATA_COMMANDS),
    # image files (the COCO layout; VOC reads its images through the same DetectionDataset.load)
    Kind("image-zero-byte", "image", rewritten(image_file, lambda b: b""), "not a readable image", DATA_COMMANDS),
    Kind("image-truncated", "image", rewritten(image_file, lambda b: b[: len(b) // 2]), "truncated or corrupt", DATA_COMMANDS),
    Kind("image-not-an-image", "image", rewritten(image_file, lambda b: b"GIF? no: just text\n" * 20), "not a readable image",
         DATA_COMMANDS),
    Kind("image-decompression-bomb", "image", rewritten(image_file, lambda b: png_bomb(100_000, 100_000)),
         "(decompression bomb|exceeds the limit)", DATA_COMMANDS),
    Kind("image-missing", "image", deleted(image_file), "image file not found", DATA_COMMANDS),
    Kind("image-other-size", "image", rewritten(image_file, other_size_jpeg), "image is 80x60 but the annotations declare",
         DATA_COMMANDS),
]
BY_NAME = {k.name: k for k in KINDS}

# One of each group in `make test`: the train split's annotation files (the case that was a traceback) and an
# image, read by a DataLoader worker process.
FAST = {("coco-malformed", "fit:train"), ("voc-malformed", "fit:train"), ("yolo-short-row", "fit:train"),
        ("image-truncated", "fit:train")}  # fmt: skip


def cases():
    for kind in KINDS:
        for command in kind.commands:
            marks = [] if (kind.name, command) in FAST else [pytest.mark.slow]
            if kind.xfail:
                marks.append(pytest.mark.xfail(reason=kind.xfail, strict=True))
            yield pytest.param(kind.name, command, marks=marks, id=f"{kind.name}-{command}")


# -- running the commands ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A Faster R-CNN of the shapes classes as configs/faster_rcnn.yaml builds it, at 64 px, for ``compare``."""
    import torch

    from detectors.module import FasterRCNNModule
    from training.saving import save_model

    torch.manual_seed(0)
    model = FasterRCNNModule(class_names=CLASSES, backbone="mobilenet_v3_large_fpn", returned_layers=[2, 3, 5],
                             anchor_sizes=[[16], [32], [64], [128]], fpn_channels=64, min_size=64, max_size=64,
                             rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30)  # fmt: skip
    path = tmp_path_factory.mktemp("model") / "faster_rcnn.ckpt"
    save_model(model, path)
    return path


@pytest.fixture
def data(shapes_dir, tmp_path) -> Path:
    """A copy of the shapes set (COCO and VOC layouts) to break."""
    root = tmp_path / "data"
    shutil.copytree(shapes_dir, root, ignore=shutil.ignore_patterns("classification"))
    return root


def data_args(root: Path, layout: str, num_workers: int = 0) -> list:
    where = (["--data.init_args.root", voc_dir(root), "--data.init_args.format", "voc", "--data.init_args.classes",
              json.dumps(CLASSES)] if layout == "voc" else ["--data.init_args.root", root])  # fmt: skip
    if layout == "yolo":
        where += ["--data.init_args.format", "yolo"]
    # One batch holds a whole split (8 train, 4 val images): a bad image fails the first step.
    return [*where, "--data.init_args.generate", "false", "--data.init_args.num_workers", num_workers,
            "--data.init_args.batch_size", "8"]  # fmt: skip


def command_args(command: str, root: Path, layout: str, tmp_path: Path, checkpoint: Path, extra=()) -> list:
    """``train.py`` arguments of ``command`` on the data at ``root``; every output goes under tmp_path."""
    name = command.partition(":")[0]
    if name == "compare":
        return ["compare", "--checkpoints", checkpoint, "--data", REPO / "configs" / "data" / "shapes.yaml",
                *data_args(root, layout), *extra, "--out", tmp_path / "comparison", "--device", "cpu",
                "--resamples", "0", "--warmup", "0", "--repeats", "1"]  # fmt: skip
    return [name, "--config", REPO / "configs" / "faster_rcnn.yaml", "--runs_dir", tmp_path / "runs",
            *data_args(root, layout), *extra, "--model.init_args.min_size", "64", "--model.init_args.max_size", "64",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.limit_predict_batches", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip


def evaluate_args(root: Path, tmp_path: Path, gt: Path | None = None, predictions: Path | None = None) -> list:
    """``evaluate`` of a one-detection results file against the val split's ground truth."""
    if predictions is None:
        predictions = tmp_path / "predictions.json"
        first = json.loads(coco_file(root, "val").read_text())["images"][0]["id"]
        predictions.write_text(json.dumps([{"image_id": first, "category_id": 1, "bbox": [1, 2, 30, 40],
                                            "score": 0.9}]))  # fmt: skip
    return ["evaluate", "--gt", gt or coco_file(root, "val"), "--predictions", predictions,
            "--out", tmp_path / "metrics.json"]  # fmt: skip


def assert_refused(code: int, out: str, err: str, path: Path, says: str) -> None:
    """A usage error: exit 2, one ``error:`` line naming ``path`` (whole, or as its folder and its name: VOC's
    box checks report "Annotations: 000001.xml object #1") and matching ``says``, no traceback."""
    assert code == 2, f"exit {code}\n{out[-2000:]}\n{err[-3000:]}"
    assert "Traceback" not in out + err, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err[-3000:]
    named = str(path) in errors[0] or f"{path.parent}: {path.name}" in errors[0]
    assert named and re.search(says, errors[0]), errors[0]


def nothing_left(tmp_path: Path) -> list[str]:
    """What a refused command left among its outputs (a run folder, a comparison folder, a metrics file)."""
    return [str(p) for p in (tmp_path / "runs", tmp_path / "comparison", tmp_path / "metrics.json") if p.exists()]


# -- the corpus ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind_name", "command"), list(cases()))
def test_bad_input_is_a_one_line_usage_error(kind_name, command, data, checkpoint, tmp_path, train_py, monkeypatch,
                                              one_thread):  # fmt: skip
    kind = BY_NAME[kind_name]
    monkeypatch.chdir(tmp_path)  # the config's relative paths (its backbone checkpoint: absent, a warning)
    split = "train" if command == "fit:train" else "val"
    if command == "evaluate":
        args = evaluate_args(data, tmp_path)  # a results file for the clean file's first image
    broken = kind.breaks(data, split)
    if command != "evaluate":
        # Image cases on the fast path go through a worker process, which hands the error over wrapped.
        workers = 1 if (kind.name, command) in FAST and kind.layout == "image" else 0
        layout = kind.layout if kind.layout in ("voc", "yolo") else "coco"
        args = command_args(command, data, layout, tmp_path, checkpoint, kind.args)
        args[args.index("--data.init_args.num_workers") + 1] = workers
    code, out, err = train_py(*args)
    assert_refused(code, out, err, broken, kind.says)
    if command == "predict" and kind.name == "image-truncated":
        # Found only when decoded, after the header check: the other images' predictions are kept (the work
        # done is not thrown away), and failed.json names this one.
        files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
        assert files and all("predictions" in p.parts for p in files), files
        assert broken.name in next(p for p in files if p.name == "failed.json").read_text()
    else:
        assert nothing_left(tmp_path) == []


RESULTS = [  # a results file given to evaluate: (name, content, what the error says)
    ("malformed", "[{", "malformed JSON"),
    ("empty", "", "malformed JSON"),
    ("not-a-list", "{}", "expected a JSON list"),
    ("missing-score", [{"image_id": "FIRST", "category_id": 1, "bbox": [1, 2, 3, 4]}], "missing key 'score'"),
    ("nan-score", [{"image_id": "FIRST", "category_id": 1, "bbox": [1, 2, 3, 4], "score": float("nan")}],
     "'score' must be"),
    ("unknown-image", [{"image_id": 999, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}], "not in the ground"),
    ("unknown-category", [{"image_id": "FIRST", "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}],
     "category_id 2 is not"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "says"), [
    pytest.param(*r, marks=[] if r[0] == "malformed" else [pytest.mark.slow], id=r[0]) for r in RESULTS
])  # fmt: skip
def test_a_bad_results_file_is_a_one_line_usage_error(name, content, says, shapes_dir, tmp_path, train_py):
    path = tmp_path / f"{name}.json"
    if isinstance(content, str):
        path.write_text(content)
    else:
        first = json.loads(coco_file(shapes_dir, "val").read_text())["images"][0]["id"]
        path.write_text(json.dumps([{k: first if v == "FIRST" else v for k, v in d.items()} for d in content]))
    code, out, err = train_py(*evaluate_args(shapes_dir, tmp_path, predictions=path))
    assert_refused(code, out, err, path, says)
    assert nothing_left(tmp_path) == []


SKIPPED = ["image-truncated", "image-not-an-image", "image-decompression-bomb", "image-missing", "image-other-size",
           "image-zero-byte", "yolo-image-not-an-image"]  # fmt: skip


@pytest.mark.parametrize("command", [
    pytest.param(c, marks=[] if c == "fit:train" else [pytest.mark.slow]) for c in DATA_COMMANDS
])  # fmt: skip
@pytest.mark.parametrize("kind_name", [
    pytest.param(k, marks=[] if k == "image-truncated" else [pytest.mark.slow]) for k in SKIPPED
])  # fmt: skip
def test_with_skip_a_bad_image_is_skipped_and_named(kind_name, command, data, checkpoint, tmp_path, train_py,
                                                     monkeypatch, recwarn, one_thread):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    kind = BY_NAME[kind_name]
    broken = kind.breaks(data, "train" if command == "fit:train" else "val")
    skip = ("--data.init_args.on_bad_sample", "skip")
    layout = "yolo" if kind.layout == "yolo" else "coco"
    code, out, err = train_py(*command_args(command, data, layout, tmp_path, checkpoint, skip))
    assert code == 0, f"exit {code}\n{out[-2000:]}\n{err[-3000:]}"
    skipped = [str(w.message) for w in recwarn if "skipping bad sample" in str(w.message)]
    assert skipped and all(str(broken) in s for s in skipped), [str(w.message) for w in recwarn]
    if command == "fit:train":
        assert (tmp_path / "runs" / "faster_rcnn" / "checkpoints" / "last.ckpt").is_file()
    elif command == "compare":
        assert json.loads((tmp_path / "comparison" / "comparison.json").read_text())["settings"]["images"] == 3
