import numpy as np
import pytest
import torch
from PIL import Image

from classifiers.data import ImageFolderDataset
from training.images import BadImageError


def _tree(root, spec):
    for rel, colour in spec.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), colour).save(p)
    return root


def test_classes_from_sorted_folders(tmp_path):
    _tree(tmp_path, {"zebra/1.png": (255, 0, 0), "apple/2.JPG": (0, 255, 0), "apple/x/3.png": (0, 0, 255)})
    ds = ImageFolderDataset(tmp_path, image_size=(2, 3))
    assert ds.class_names == ["apple", "zebra"]
    assert [p[len(str(tmp_path)) + 1 :] for p in ds.paths] == ["apple/2.JPG", "apple/x/3.png", "zebra/1.png"]
    assert ds.labels == [0, 0, 1]
    image, label = ds[2]
    assert label == 1 and image.shape == (3, 2, 3) and image.dtype == torch.float32
    assert torch.allclose(image[0], torch.ones(2, 3)) and image[1:].abs().max() == 0


def test_glob_pattern_uses_parent_folder(tmp_path):
    _tree(tmp_path, {"train/cat/a.png": (1, 1, 1), "train/dog/b.png": (2, 2, 2), "val/cat/c.png": (3, 3, 3)})
    ds = ImageFolderDataset(str(tmp_path / "train" / "*" / "*.png"))
    assert ds.class_names == ["cat", "dog"] and len(ds) == 2
    val = ImageFolderDataset(str(tmp_path / "val" / "*" / "*.png"), classes=["cat", "dog"])
    assert val.labels == [0]
    with pytest.raises(ValueError, match=r"folders \['dog'\] are not in classes \['cat'\]"):
        ImageFolderDataset(str(tmp_path / "train" / "*" / "*.png"), classes=["cat"])


def test_grayscale_mode_gives_one_channel(tmp_path):
    _tree(tmp_path, {"a/1.png": (255, 0, 0)})
    image, _ = ImageFolderDataset(tmp_path, color_mode="grayscale")[0]
    assert image.shape == (1, 4, 6) and torch.allclose(image, torch.full_like(image, 76 / 255))


def test_errors_name_the_path(tmp_path):
    _tree(tmp_path, {"a/1.png": (1, 2, 3)})
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_class: class folder contains no images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothing/\*.png"):
        ImageFolderDataset(str(tmp_path / "nothing" / "*.png"))
    (tmp_path / "empty_class").rmdir()
    (tmp_path / "a" / "2.png").write_bytes(b"not an image")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(BadImageError, match="2.png"):
        ds[1]
    with pytest.warns(UserWarning, match="2.png"):
        assert ImageFolderDataset(tmp_path, on_bad_sample="skip")[1] is None
    np.testing.assert_equal(ds[0][1], 0)


def test_hidden_folders_are_not_classes(tmp_path):
    _tree(tmp_path, {"a/1.png": (1, 2, 3), "b/2.png": (3, 2, 1), ".ipynb_checkpoints/c/3.png": (0, 0, 0)})
    (tmp_path / ".cache").mkdir()
    assert ImageFolderDataset(tmp_path).class_names == ["a", "b"]
