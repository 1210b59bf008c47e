"""Tests for the drawing of one shapes image (detectors.data.shapes_scene), without writing files."""

import numpy as np
import pytest

from detectors.data.shapes_scene import KINDS, LARGE_MIN, SMALL_MAX, draw_scene, visible_masks

HW = (160, 160)


IN_RANGE = {
    "small": lambda area: area < SMALL_MAX,
    "medium": lambda area: SMALL_MAX < area < LARGE_MIN,
    "large": lambda area: area > LARGE_MIN,
}


@pytest.mark.parametrize("size", list(IN_RANGE))
def test_the_anchor_has_its_class_and_size_and_is_never_occluded(size):
    for index in range(4):
        shapes, _ = draw_scene(0, 0, index, HW, empty=False, anchor=("triangle", size))
        anchor, visible = shapes[0], visible_masks(shapes)[0]
        assert anchor.kind == "triangle" and IN_RANGE[size](int(visible.sum()))
        assert np.array_equal(visible, anchor.mask)


def test_visible_masks_partition_the_covered_pixels_and_keep_half_of_each_shape():
    for index in range(6):
        shapes, pixels = draw_scene(1, 0, index, HW, empty=False, anchor=None)
        assert shapes and pixels.shape == (*HW, 3) and pixels.dtype == np.uint8
        visible = visible_masks(shapes)
        assert np.array_equal(np.sum(visible, axis=0), np.any([s.mask for s in shapes], axis=0))  # disjoint
        for shape, mask in zip(shapes, visible, strict=True):
            assert shape.kind in KINDS and shape.full_area == int(shape.mask.sum())
            assert int(mask.sum()) >= max(shape.min_visible, shape.full_area / 2)


def test_same_arguments_same_image_and_empty_means_no_shapes():
    first, again = (draw_scene(2, 1, 5, HW, empty=False, anchor=None) for _ in range(2))
    assert [s.kind for s in first[0]] == [s.kind for s in again[0]]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(first[0], again[0], strict=True))
    assert np.array_equal(first[1], again[1])
    shapes, pixels = draw_scene(2, 1, 5, HW, empty=True, anchor=None)
    assert shapes == [] and visible_masks(shapes) == [] and pixels.shape == (*HW, 3)
