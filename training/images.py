"""Finding and loading images: the Keras recipe's ``glob.glob`` + ``load_img``.

``load_image`` mirrors ``keras.utils.load_img`` (same arguments, same resize and
crop arithmetic, returns a PIL image). ``open_image`` is the strict loader the
datasets use: it refuses decompression bombs, forces a full decode so a truncated
file fails here (naming the path) rather than inside a training step, and turns
any PIL mode -- grayscale, palette, RGBA, CMYK, 16-bit -- into 8-bit RGB.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from training.errors import BadValueError, MissingFileError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# Keras' PIL_INTERPOLATION_METHODS, name for name.
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}

# PIL's single-channel modes of more than 8 bits: 16-bit integer (byte orders), 32-bit integer, 32-bit float.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
HIGH_DEPTH_MODES = (*SIXTEEN_BIT_MODES, "I", "F")

# PIL's own warning threshold; images above it are treated as decompression bombs.
DEFAULT_MAX_PIXELS = 89_478_485


class BadImageError(UsageError, OSError):
    """An image file that is missing, unreadable, truncated or too large. The message names the path."""


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of the ``IMAGE_EXTENSIONS`` (any case); the file itself is not opened."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def find_images(root_or_pattern: str | os.PathLike, allow_empty: bool = False) -> list[str]:
    """Sorted image paths under a directory (recursive) or matching a glob pattern.

    Extensions jpg/jpeg/png/bmp/webp/tif(f) match case-insensitively; ``**`` in a
    pattern recurses as in ``glob.glob(..., recursive=True)``. Raises
    ``MissingFileError`` (a ``FileNotFoundError``) naming the argument when
    nothing matches, unless ``allow_empty``.
    """
    spec = os.fspath(root_or_pattern)
    if os.path.isdir(spec):
        pattern = os.path.join(glob.escape(spec), "**", "*")
    elif glob.has_magic(spec):
        pattern = spec
    elif os.path.isfile(spec):
        pattern = glob.escape(spec)
    else:
        raise MissingFileError(f"{spec}: no such directory or file, and it is not a glob pattern")
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p) and is_image_file(p))
    if not paths and not allow_empty:
        raise MissingFileError(f"{spec}: matches no image files (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _read(path) -> Image.Image:
    # Read whole and closed at once, as Keras' load_img does: PIL's lazy open would keep the file open until
    # the image is decoded.
    if isinstance(path, io.BytesIO):
        return Image.open(path)
    with open(path, "rb") as f:
        return Image.open(io.BytesIO(f.read()))


def load_image(
    path: str | os.PathLike | io.BytesIO,
    target_size: Sequence[int] | None = None,
    color_mode: str = "rgb",
    interpolation: str = "nearest",
    keep_aspect_ratio: bool = False,
    exif_transpose: bool = False,
) -> Image.Image:
    """Keras ``load_img``: load an image file into a PIL image.

    Args:
        target_size: ``(height, width)`` or None to keep the file's size.
        color_mode: "grayscale", "rgb" or "rgba". 8-bit files convert as PIL (and Keras) converts them.
            Deeper single-channel files (:data:`HIGH_DEPTH_MODES`) are the same in every mode:
            "grayscale" keeps 16-bit and 32-bit integer files as they are (values unscaled, as Keras); "rgb" /
            "rgba" scale them to 8 bits as :func:`to_8bit` does (16-bit: ``round(v / 257)``, so 65535 is 255
            and 257 * k is k; a 32-bit integer file is read as 16-bit values, clipped to 0..65535); a
            32-bit float file becomes :func:`to_8bit`'s 8-bit gray in every mode, repeated in R, G, B
            ("rgba": alpha 255). This deliberately differs from Keras, which lets PIL convert: every value
            above 255 clips to white in "rgb"/"rgba" (and in "grayscale" for a big-endian 16-bit TIFF),
            and floats are truncated, so a 16-bit photo loads as a white image; scaling keeps the picture.
        interpolation: nearest, bilinear, bicubic, hamming, box or lanczos.
        keep_aspect_ratio: centre-crop to the target aspect ratio before resizing.
        exif_transpose: apply the EXIF orientation tag. Keras does not, so it is off.
    """
    if color_mode not in ("grayscale", "rgb", "rgba"):
        raise BadValueError(f'color_mode must be "grayscale", "rgb", or "rgba", got {color_mode!r}')
    if interpolation not in INTERPOLATIONS:
        raise BadValueError(
            f"Invalid interpolation method {interpolation!r}; supported: {', '.join(INTERPOLATIONS)}"
        )
    if isinstance(path, Path):
        path = str(path.resolve())
    img = _read(path)
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if color_mode == "grayscale":
        if img.mode not in ("L", "I", *SIXTEEN_BIT_MODES):
            img = to_8bit(img).convert("L")
    elif color_mode == "rgba":
        if img.mode != "RGBA":
            img = to_8bit(img).convert("RGBA")
    elif img.mode != "RGB":
        img = to_rgb(img)
    if target_size is not None:
        img = _resize(img, (int(target_size[1]), int(target_size[0])), INTERPOLATIONS[interpolation],
                      keep_aspect_ratio)
    return img


def _resize(img: Image.Image, width_height: tuple[int, int], resample: Image.Resampling,
            keep_aspect_ratio: bool) -> Image.Image:
    """Keras' resize: ``keep_aspect_ratio`` first takes the largest centred crop with the target aspect
    ratio (Keras' integer arithmetic, so the same pixels are kept)."""
    if img.size == width_height:
        return img
    if not keep_aspect_ratio:
        return img.resize(width_height, resample)
    width, height = img.size
    target_width, target_height = width_height
    crop_height = min(height, (width * target_height) // target_width)
    crop_width = min(width, (height * target_width) // target_height)
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    return img.resize(width_height, resample, box=(left, top, left + crop_width, top + crop_height))


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit single-channel image (:data:`HIGH_DEPTH_MODES`) as 8-bit grayscale ("L"); any
    other image unchanged.

    16-bit values are scaled by 1/257 and rounded, the linear map of 0..65535 onto 0..255 (65535 -> 255,
    257 * k -> k). 32-bit integers ("I") are taken as 16-bit values, clipped to 0..65535: older PIL versions
    open 16-bit PNGs as "I". 32-bit floats ("F") whose maximum is at most 1 are scaled by 255, others taken
    as 0..255; both rounded half up and clipped to 0..255, NaN as 0. PIL's own ``convert`` clips every value
    above 255 to white (and truncates floats), which is why it is not used.
    """
    if img.mode not in HIGH_DEPTH_MODES:
        return img
    arr = np.asarray(img)
    if arr.ndim == 3:  # some PIL versions expose I;16 as HxWx1
        arr = arr[..., 0]
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0)
        scaled = np.floor(arr * (255.0 if arr.max(initial=0.0) <= 1.0 else 1.0) + 0.5)
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))
    # (v + 128) // 257 is round(v / 257): no 16-bit value lies halfway between two multiples of 257
    return Image.fromarray(((np.clip(arr.astype(np.int64), 0, 65535) + 128) // 257).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    16-bit and 32-bit single-channel images are scaled to 8 bits first (:func:`to_8bit`; PIL's ``convert``
    would clip everything above 255 to white); palette images with transparency go through RGBA so the
    palette is honoured; alpha is dropped.
    """
    if img.mode == "RGB":
        return img
    if img.mode in HIGH_DEPTH_MODES:
        return to_8bit(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


@contextlib.contextmanager
def _pil_limit_off():
    """PIL's pixel limit switched off for a ``with`` block (``open_image`` applies its own ``max_pixels``)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_header(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image reading its header only (PIL decodes on ``load``), or raise ``BadImageError`` naming the
    path: a missing or non-image file, or more than ``max_pixels`` pixels (a decompression bomb is refused
    without allocating it). The caller closes the image. A file may pass and still fail to decode."""
    path = os.fspath(path)
    try:
        with _pil_limit_off():  # our own limit decides; PIL's warning (and its 2x error) would second-guess it
            img = Image.open(path)
    except FileNotFoundError as e:
        raise BadImageError(f"{path}: image file not found") from e
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{path}: refused as a decompression bomb ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{path}: not a readable image ({e})") from e
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise BadImageError(
            f"{path}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(possible decompression bomb; raise max_image_pixels if the image is genuine)"
        )
    return img


def open_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, fully decode and convert an image to RGB, or raise ``BadImageError`` naming the path
    (``open_header``'s checks first, then the decoding)."""
    path = os.fspath(path)
    with open_header(path, max_pixels) as img:
        try:
            with _pil_limit_off():
                img.load()
            return to_rgb(img).copy()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BadImageError(f"{path}: image is truncated or corrupt ({e})") from e
