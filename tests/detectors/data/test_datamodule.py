import functools
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler

from detectors.data import datamodule
from detectors.data.datamodule import DetectionDataModule, GroupedBatchSampler
from detectors.data.shapes import generate_shapes
from training.errors import BadValueError
from training.images import BadImageError

from .helpers import coco_dict, write_image, write_voc

REPO = Path(__file__).resolve().parents[3]


def write_split(root, split, n_images, sizes=((40, 30), (30, 40))):
    data = coco_dict()
    data["images"], data["annotations"] = [], []
    for i in range(n_images):
        w, h = sizes[i % len(sizes)]
        data["images"].append({"id": i + 1, "file_name": f"{i:03d}.jpg", "width": w, "height": h})
        write_image(root / "images" / split / f"{i:03d}.jpg", w, h, seed=i)
        if i % 3:  # every third image has no objects
            data["annotations"].append(
                {"id": i + 1, "image_id": i + 1, "category_id": 2 if i % 2 else 5, "bbox": [1, 2, 10, 8], "area": 80}
            )
    (root / "annotations").mkdir(exist_ok=True, parents=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


@pytest.fixture
def coco_root(tmp_path):
    write_split(tmp_path, "train", 10)
    write_split(tmp_path, "val", 5)
    return tmp_path


def test_batches_with_workers(coco_root):
    dm = DetectionDataModule(str(coco_root), batch_size=4, num_workers=2, pin_memory=False, persistent_workers=False)
    assert dm.class_names == ["dog", "cat"] and dm.num_classes == 3  # read before setup
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(images) for images, _ in batches] == [4, 4, 2]
    ids = sorted(t["image_id"] for _, targets in batches for t in targets)
    assert ids == list(range(1, 11))  # every image exactly once, in shuffled order
    for images, targets in batches:
        assert isinstance(images, tuple) and isinstance(targets, tuple)
        for img, t in zip(images, targets, strict=False):
            assert img.dtype == torch.float32 and img.shape[0] == 3
            assert t["boxes"].shape[1] == 4 and t["boxes"].shape[0] == t["labels"].shape[0]
    val = list(dm.val_dataloader())
    assert [t["image_id"] for _, ts in val for t in ts] == [1, 2, 3, 4, 5]  # validation keeps file order
    # Variable sizes survive collation: 40x30 and 30x40 images side by side.
    assert {tuple(img.shape[1:]) for img in val[0][0]} == {(30, 40), (40, 30)}


def test_aspect_ratio_grouping(coco_root):
    dm = DetectionDataModule(str(coco_root), batch_size=2, num_workers=0, aspect_ratio_grouping=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, GroupedBatchSampler)
    shapes = [{tuple(img.shape[1:]) for img in images} for images, _ in loader]
    # Full batches never mix a wide and a tall image; only the final batch of leftovers may.
    assert all(len(s) == 1 for s in shapes[:-1])
    assert sum(len(images) for images, _ in loader) == 10 and len(loader) == len(shapes) == 5


def test_grouped_sampler_counts():
    groups = [0, 1, 0, 0, 1, 0, 1]
    sampler = GroupedBatchSampler(RandomSampler(range(7)), groups, batch_size=2)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({groups[i] for i in b}) == 1 for b in batches[:-1]) and len(batches) == len(sampler) == 4


def test_grouped_sampler_gives_every_ddp_rank_the_same_number_of_batches():
    """A rank's batch count may not depend on its mix of wide and tall images, or DDP ranks deadlock."""
    from torch.utils.data.distributed import DistributedSampler

    groups = [int(i % 3 == 0) for i in range(1000)]
    counts = []
    for rank in range(8):
        dist = DistributedSampler(range(1000), num_replicas=8, rank=rank, shuffle=True, seed=0)
        sampler = GroupedBatchSampler(dist, groups, batch_size=2)
        counts.append((len(list(sampler)), len(sampler)))
    assert set(counts) == {(63, 63)}  # 125 samples per rank -> ceil(125 / 2) batches everywhere
    dropping = GroupedBatchSampler(DistributedSampler(range(1000), num_replicas=8, rank=3), groups, 2, drop_last=True)
    assert len(list(dropping)) == len(dropping) == 62


def test_skip_policy_drops_bad_images_from_batches(coco_root):
    (coco_root / "images" / "val" / "002.jpg").write_bytes(b"garbage")
    dm = DetectionDataModule(str(coco_root), batch_size=5, num_workers=0, on_bad_sample="skip")
    dm.setup("validate")
    with pytest.warns(UserWarning, match="002.jpg"):
        (images, targets), = list(dm.val_dataloader())
    assert [t["image_id"] for t in targets] == [1, 2, 4, 5]
    strict = DetectionDataModule(str(coco_root), batch_size=5, num_workers=0)
    strict.setup("validate")
    with pytest.raises(OSError, match="002.jpg"):
        list(strict.val_dataloader())


def test_predict_checks_every_header_before_any_image_is_predicted(coco_root):
    write_image(coco_root / "images" / "val" / "001.jpg", 50, 50)  # the annotations declare 30 x 40
    (coco_root / "images" / "val" / "003.jpg").write_text("not an image")
    dm = DetectionDataModule(str(coco_root), num_workers=0)  # on_bad_sample: raise
    with pytest.raises(BadImageError, match=r"^2 of 5 images cannot be read: \S*001.jpg: image is 50x50 but the "
                       r"annotations declare 30x40; \S*003.jpg: not a readable image .*nothing was predicted"):
        dm.setup("predict")
    skipping = DetectionDataModule(str(coco_root), num_workers=0, on_bad_sample="skip")
    skipping.setup("predict")  # goes on; the prediction writer names what was skipped
    assert len(skipping.datasets["predict"]) == 5


def test_splits_must_agree_on_categories(coco_root):
    path = coco_root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = "lion"
    path.write_text(json.dumps(data))
    dm = DetectionDataModule(str(coco_root), num_workers=0)
    with pytest.raises(BadValueError, match="instances_train.json: categories .* differ"):
        dm.setup("fit")


def test_voc_format(tmp_path):
    write_voc(tmp_path, {"a": (20, 20, [("ellipse", 0, 1, 1, 5, 5)]), "b": (20, 20, [])}, {"train": ["a", "b"], "val": ["b"]})
    dm = DetectionDataModule(str(tmp_path), format="voc", classes=["rectangle", "ellipse"], batch_size=2, num_workers=0)
    assert dm.num_classes == 3
    dm.setup("fit")
    (images, targets), = list(dm.train_dataloader())
    assert sorted(len(t["boxes"]) for t in targets) == [0, 1]
    assert all("difficult" in t for t in targets)


@pytest.mark.parametrize("size", ["smallest", pytest.param("default", marks=pytest.mark.slow)])
def test_generate_writes_shapes_once(tmp_path, caplog, monkeypatch, size):
    # The fast run generates the smallest dataset instead of the default 1000 + 60 images (~20 s): what is
    # checked is when and how prepare_data generates; the slow run checks it at the default size too.
    if size == "smallest":
        small = functools.partial(generate_shapes, num_train=4, num_val=4, image_size=(160, 160), voc=False,
                                  classification=False)  # fmt: skip
        monkeypatch.setattr(datamodule, "generate_shapes", small)
    root = tmp_path / "shapes"
    dm = DetectionDataModule(str(root), generate=True, num_workers=0)
    with warnings.catch_warnings(), caplog.at_level(logging.INFO):
        warnings.simplefilter("ignore")
        assert dm.class_names == ["rectangle", "ellipse", "triangle"]
    # said, with the path: a mistyped root of one's own data must not train on shapes silently
    assert f"generating the embedded shapes dataset in {root}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        dm.setup("fit")
    assert "generating" not in caplog.text  # once
    assert len(dm.datasets["train"]) > 0 and len(dm.datasets["val"]) > 0


# -- pointing the shipped config at one's own data (generate: true in configs/data/shapes.yaml) -----------------


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fit_args(root, runs) -> list:
    """configs/faster_rcnn.yaml shrunk in size only, on the data in ``root``; the config's generate: true kept."""
    return ["fit", "--config", REPO / "configs" / "faster_rcnn.yaml", "--runs_dir", runs,
            "--data.init_args.root", root, "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
            "--model.init_args.min_size", "64", "--model.init_args.max_size", "64", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip


def test_fit_reads_a_users_coco_folder_as_it_is(tmp_path, train_py, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # the config's backbone_checkpoint is missing here: a warning, not an error
    user = tmp_path / "my_coco"
    write_split(user, "train", 4)
    write_split(user, "val", 2)
    (user / "README.txt").write_text("my data")
    before = _files(user)
    with caplog.at_level(logging.INFO):
        code, out, err = train_py(*_fit_args(user, tmp_path / "runs"))
    assert code == 0, err[-3000:]
    assert "generating the embedded shapes dataset" not in caplog.text + out + err
    assert f"data root {user} holds files and no shapes dataset: reading it as your data" in caplog.text
    assert _files(user) == before  # nothing written, replaced or removed
    assert (tmp_path / "runs" / "faster_rcnn" / "checkpoints" / "best.ckpt").is_file()  # trained on it


def test_a_users_folder_in_another_layout_fails_saying_which_layout_was_read(tmp_path, train_py, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user = tmp_path / "coco2017"
    write_image(user / "val2017" / "000000000139.jpg", 40, 30)
    (user / "annotations").mkdir()
    (user / "annotations" / "instances_val2017.json").write_text(json.dumps(coco_dict()))
    before = _files(user)
    code, _, err = train_py(*_fit_args(user, tmp_path / "runs"))
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and f"{user}/annotations/instances_val.json: no such COCO annotation file" in line
    assert "val_split" in line and "overwrite" not in line.replace(str(user), "")
    assert _files(user) == before
