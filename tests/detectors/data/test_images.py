"""detectors.data.images: image files without annotations as prediction data, and image id -> path.
(tests/detectors/test_predict.py writes predictions of an ImageFileDataset.)"""

import pytest
import torch
from PIL import Image

from detectors.data.coco import CocoDetection
from detectors.data.images import ImageFileDataset, image_paths_of
from training.errors import UsageError


def _write_images(folder, names, size=(12, 8)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, (255, 0, 0)).save(folder / name)
    return [str(folder / n) for n in names]


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        ImageFileDataset(str(tmp_path / "nothing-here" / "*.jpg"))


def test_items_are_float_images_with_their_position_as_id(tmp_path):
    paths = _write_images(tmp_path, ["b.png", "a.png"])
    dataset = ImageFileDataset(tmp_path)  # a directory: every image file under it, sorted
    assert dataset.paths == sorted(paths) and len(dataset) == 2
    image, target = dataset[1]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 12)
    assert image[0].min() == 1.0 and image[1:].max() == 0.0  # red, scaled to 0..1
    assert target == {"image_id": 1, "path": str(tmp_path / "b.png")}
    assert image_paths_of(dataset) == {0: str(tmp_path / "a.png"), 1: str(tmp_path / "b.png")}


def test_unreadable_file_raises_or_is_skipped(tmp_path):
    paths = _write_images(tmp_path, ["good.png"])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    files = [str(tmp_path / "bad.jpg"), *paths]
    with pytest.raises(OSError, match="bad.jpg"):
        ImageFileDataset(files)[0]
    with pytest.warns(UserWarning, match="skipping bad image 0"):
        assert ImageFileDataset(files, on_bad_sample="skip")[0] is None


def test_refused_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="on_bad_sample must be 'raise' or 'skip', got 'ignore'"):
        ImageFileDataset(str(tmp_path), on_bad_sample="ignore")
    with pytest.raises(UsageError, match="the list of image paths is empty"):
        ImageFileDataset([])


def test_image_paths_of_annotated_and_other_datasets(shapes_dir):
    dataset = CocoDetection(shapes_dir / "images" / "val", shapes_dir / "annotations" / "instances_val.json")
    paths = image_paths_of(dataset)
    assert paths == {r.image_id: r.path for r in dataset.records} and len(paths) == 4
    assert image_paths_of(object()) == {}
