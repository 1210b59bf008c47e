"""load_image against Keras load_img semantics, worked by hand on tiny images; find_images; open_image errors."""

import numpy as np
import pytest
from PIL import Image

from training.errors import UsageError
from training.images import BadImageError, find_images, load_image, open_image, to_rgb

# A 4 (high) x 6 (wide) RGB image whose column index is encoded in red and row in green.
H, W = 4, 6


def _grid() -> np.ndarray:
    arr = np.zeros((H, W, 3), np.uint8)
    arr[..., 0] = np.arange(W)[None, :] * 40
    arr[..., 1] = np.arange(H)[:, None] * 60
    arr[..., 2] = 7
    return arr


@pytest.fixture
def grid_png(tmp_path):
    path = tmp_path / "grid.png"
    Image.fromarray(_grid()).save(path)
    return path


def test_rgb_no_resize_is_exact(grid_png):
    img = load_image(grid_png)
    assert img.mode == "RGB" and img.size == (W, H)
    np.testing.assert_array_equal(np.asarray(img), _grid())


def test_target_size_is_height_width_and_nearest_picks_centres(grid_png):
    img = load_image(grid_png, target_size=(2, 3))
    assert img.size == (3, 2)  # PIL reports (width, height)
    arr = np.asarray(img)
    # Nearest neighbour halving: output pixel i samples input floor((i + 0.5) * 2) = 1, 3, 5.
    np.testing.assert_array_equal(arr[..., 0], np.array([[1, 3, 5]] * 2) * 40)
    np.testing.assert_array_equal(arr[:, 0, 1], np.array([1, 3]) * 60)


def test_keep_aspect_ratio_centre_crops_like_keras(grid_png):
    # Keras: crop_width = min(6, 4 * 4 // 4) = 4, start = (6 - 4) // 2 = 1 -> columns 1..4.
    img = load_image(grid_png, target_size=(4, 4), keep_aspect_ratio=True)
    np.testing.assert_array_equal(np.asarray(img), _grid()[:, 1:5])
    squashed = load_image(grid_png, target_size=(4, 4))  # without: the whole width is squeezed in
    assert not np.array_equal(np.asarray(squashed), _grid()[:, 1:5])


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "hamming", "box", "lanczos"])
def test_every_keras_interpolation_name(grid_png, interpolation):
    img = load_image(grid_png, target_size=(8, 12), interpolation=interpolation)
    assert img.size == (12, 8)


def test_grayscale_uses_itu_601_luma(tmp_path):
    path = tmp_path / "rgb.png"
    Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)).save(path)
    img = load_image(path, color_mode="grayscale")
    assert img.mode == "L"
    # L = R*299/1000 + G*587/1000 + B*114/1000, rounded: 76, 150, 29, 255.
    np.testing.assert_array_equal(np.asarray(img)[0], [76, 150, 29, 255])


def test_rgba_adds_opaque_alpha(grid_png):
    arr = np.asarray(load_image(grid_png, color_mode="rgba"))
    assert arr.shape == (H, W, 4) and (arr[..., 3] == 255).all()


def test_bad_arguments_are_named(grid_png):
    with pytest.raises(ValueError, match="color_mode") as info:
        load_image(grid_png, color_mode="hsv")
    assert isinstance(info.value, UsageError)  # the command line prints the message alone
    with pytest.raises(ValueError, match="interpolation"):
        load_image(grid_png, target_size=(2, 2), interpolation="cubic")


def test_exif_orientation_is_opt_in(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    Image.fromarray(_grid()).save(path, exif=exif.tobytes())
    assert load_image(path).size == (W, H)  # Keras ignores EXIF
    assert load_image(path, exif_transpose=True).size == (H, W)


# --- any mode to RGB -------------------------------------------------------------------------------


# Deeper-than-8-bit files: (value in the file, its 8-bit value worked by hand). 16-bit: round(v / 257);
# 32-bit integers: clipped to 0..65535 first; floats: x 255 when the maximum is at most 1, rounded half up.
SIXTEEN = [(0, 0), (257, 1), (257 * 100, 100), (65535, 255), (128, 0), (129, 1), (1000, 4), (32768, 128)]
INT32 = [(0, 0), (257, 1), (25700, 100), (65535, 255), (-5, 0), (70000, 255), (129, 1)]
FLOAT_UNIT = [(0.0, 0), (0.5, 128), (1.0, 255), (0.2, 51), (float("nan"), 0)]
FLOAT_WIDE = [(0.0, 0), (2.0, 2), (127.4, 127), (127.5, 128), (300.0, 255), (-3.0, 0)]


def _write_deep(path, dtype: str, values) -> None:
    if dtype == ">u2":  # big-endian 16-bit, as TIFFs from some cameras and scanners
        Image.frombytes("I;16B", (len(values), 1), np.array(values, ">u2").tobytes()).save(path)
    else:
        Image.fromarray(np.array([values], dtype)).save(path)


DEEP_FILES = {  # name: (file suffix, dtype written, pairs, the mode "grayscale" keeps, None: 8-bit "L")
    "png-16bit": (".png", "uint16", SIXTEEN, "I;16"),
    "tiff-16bit": (".tif", "uint16", SIXTEEN, "I;16"),
    "tiff-16bit-big-endian": (".tiff", ">u2", SIXTEEN, "I;16B"),
    "tiff-32bit-int": (".tif", "int32", INT32, "I"),
    "tiff-32bit-float-0-1": (".tif", "float32", FLOAT_UNIT, None),
    "tiff-32bit-float-0-255": (".tif", "float32", FLOAT_WIDE, None),
}


@pytest.mark.parametrize("color_mode", ["grayscale", "rgb", "rgba"])
@pytest.mark.parametrize("name", DEEP_FILES)
def test_16_and_32_bit_files_in_every_color_mode(tmp_path, name, color_mode):
    suffix, dtype, pairs, kept_mode = DEEP_FILES[name]
    path = tmp_path / f"deep{suffix}"
    _write_deep(path, dtype, [v for v, _ in pairs])
    eight = [e for _, e in pairs]
    img = load_image(path, color_mode=color_mode)
    values = np.asarray(img).reshape(len(pairs), -1).tolist()
    if color_mode == "grayscale" and kept_mode:  # as Keras: the file's values, unscaled
        assert img.mode == kept_mode and values == [[v] for v, _ in pairs]
    elif color_mode == "grayscale":
        assert img.mode == "L" and values == [[e] for e in eight]
    elif color_mode == "rgb":
        assert img.mode == "RGB" and values == [[e, e, e] for e in eight]
    else:  # never clipped to white (65535 -> 255, 257 -> 1), opaque
        assert img.mode == "RGBA" and values == [[e, e, e, 255] for e in eight]
    # the datasets' loader makes the same 8-bit RGB
    assert np.asarray(open_image(path)).reshape(len(pairs), 3).tolist() == [[e, e, e] for e in eight]


def test_palette_with_transparency_cmyk_gray_rgba(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "p.png"))[0], [[10, 20, 30], [200, 100, 50]])

    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    red = np.asarray(open_image(tmp_path / "c.jpg")).astype(int)
    assert red.shape == (2, 3, 3) and (red[..., 0] > 200).all() and (red[..., 1:] < 60).all()

    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert (np.asarray(open_image(tmp_path / "l.png")) == 77).all()

    Image.new("RGBA", (2, 2), (1, 2, 3, 0)).save(tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(open_image(tmp_path / "a.png"))[0, 0], [1, 2, 3])
    assert to_rgb(Image.new("F", (1, 1), 0.5)).getpixel((0, 0)) == (128, 128, 128)  # 127.5, rounded half up


# --- bad files ---------------------------------------------------------------------------------------


def test_truncated_missing_garbage_and_bomb_name_the_file(tmp_path, grid_png):
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="cut.jpg.*truncated"):
        open_image(cut)
    with pytest.raises(BadImageError, match="nope.png.*not found") as info:
        open_image(tmp_path / "nope.png")
    assert isinstance(info.value, OSError) and isinstance(info.value, UsageError)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png")
    with pytest.raises(BadImageError, match="junk.png.*not a readable image"):
        open_image(junk)
    with pytest.raises(BadImageError, match="grid.png.*24 pixels exceeds the limit of 10"):
        open_image(grid_png, max_pixels=10)


# --- find_images --------------------------------------------------------------------------------------


def test_find_images_sorted_recursive_case_insensitive(tmp_path):
    for rel in ["b/2.PNG", "a/1.jpg", "a/deep/3.JpEg", "c/4.webp", "c/5.tif", "c/6.bmp", "a/notes.txt", "x.gif"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    found = find_images(tmp_path)
    rel = [p[len(str(tmp_path)) + 1 :] for p in found]
    assert rel == ["a/1.jpg", "a/deep/3.JpEg", "b/2.PNG", "c/4.webp", "c/5.tif", "c/6.bmp"]
    # A pattern filters by its own glob, then by image extension (x.gif is not an image type here).
    assert [p[len(str(tmp_path)) + 1 :] for p in find_images(str(tmp_path / "*"), allow_empty=True)] == []
    assert [p[len(str(tmp_path)) + 1 :] for p in find_images(str(tmp_path / "a" / "**" / "*"))] == [
        "a/1.jpg",
        "a/deep/3.JpEg",
    ]


def test_find_images_errors_name_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir") as info:
        find_images(tmp_path / "missing_dir")
    assert isinstance(info.value, UsageError)
    with pytest.raises(FileNotFoundError, match=r"\*\.jpg.*matches no image files"):
        find_images(str(tmp_path / "*.jpg"))
    assert find_images(str(tmp_path / "*.jpg"), allow_empty=True) == []
