import torch
from torchvision import tv_tensors

from detectors.data.transforms import detection_transforms


def _sample():
    image = tv_tensors.Image(torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[2.0, 3.0, 10.0, 8.0], [5.0, 5.0, 5.0, 9.0], [0.0, 0.0, 30.0, 20.0]]),
            format="XYXY", canvas_size=(20, 30),
        ),  # fmt: skip
        "labels": torch.tensor([1, 2, 3]),
        "area": torch.tensor([40.0, 0.0, 600.0]),
        "iscrowd": torch.tensor([0, 0, 1]),
        "difficult": torch.tensor([False, True, False]),
        "image_id": 7,
    }
    return image, target


def test_val_pipeline_only_scales():
    image, target = _sample()
    out_image, out = detection_transforms(train=False)(image, target)
    assert out_image.dtype == torch.float32 and torch.allclose(out_image * 255, image.float())
    # Evaluation keeps every box the reader kept (pycocotools scores even a degenerate one).
    assert out["boxes"].tolist() == target["boxes"].tolist() and out["labels"].tolist() == [1, 2, 3]
    assert out["image_id"] == 7


def test_train_pipeline_sanitises_every_per_box_field():
    image, target = _sample()
    _, out = detection_transforms(train=True, hflip_prob=0.0, photometric=False)(image, target)
    # The zero-width box goes, and every per-box field goes with it.
    assert out["boxes"].tolist() == [[2, 3, 10, 8], [0, 0, 30, 20]]
    assert out["labels"].tolist() == [1, 3] and out["area"].tolist() == [40, 600]
    assert out["iscrowd"].tolist() == [0, 1] and out["difficult"].tolist() == [False, False]


def test_flip_mirrors_boxes_and_pixels():
    image, target = _sample()
    out_image, out = detection_transforms(train=True, hflip_prob=1.0, photometric=False)(image, target)
    # x' = W - x: [2, 10] -> [20, 28] on a 30-px-wide image.
    assert out["boxes"].tolist()[0] == [20, 3, 28, 8]
    assert torch.allclose(out_image * 255, image.flip(-1).float())


def test_scale_jitter_keeps_boxes_valid():
    torch.manual_seed(0)
    t = detection_transforms(train=True, scale_jitter=(0.5, 1.5))
    for _ in range(20):
        image, target = _sample()
        out_image, out = t(image, target)
        b = out["boxes"]
        assert out_image.shape == (3, 20, 30)
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all() and b.min() >= 0
        assert b[:, 2].max() <= 30 and b[:, 3].max() <= 20 and len(out["labels"]) == len(b)
