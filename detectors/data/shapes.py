"""Synthetic "shapes" detection dataset: a small, deterministic stand-in for COCO that builds in seconds.

This module checks the parameters, publishes a finished dataset atomically (or keeps an identical one)
and holds the ``train.py shapes`` command; ``shapes_files`` writes the files and ``shapes_scene`` draws the
images. Layout written under ``out`` (every box below is integer-aligned, so all layouts round-trip exactly)::

    images/{train,val}/000001.jpg             image ids are unique across both splits
    annotations/instances_{train,val}.json    COCO: bbox [x, y, w, h] of the VISIBLE mask, RLE segmentation
    voc/JPEGImages/000001.jpg                 (voc=True) Pascal VOC copy of the same images
    voc/Annotations/000001.xml                VOC boxes xmin, ymin, xmax, ymax = x + 1, y + 1, x + w, y + h
    voc/ImageSets/Main/{train,val,trainval}.txt
    classification/{train,val}/<class>/*.png  (classification=True) crops of the visible boxes plus a margin
    shapes.json                               manifest: generation parameters and counts

Classes use non-contiguous COCO ids (rectangle=1, ellipse=3, triangle=7) so readers must map ids to
contiguous labels. Later objects occlude earlier ones, never hiding more than half of one. Each split with
>= 4 images is guaranteed to contain all three classes, objects in all three COCO area ranges
(small < 32**2 <= medium < 96**2 < large) and at least one image without objects: images 0..2 of a split
each hold one never-occluded "anchor" object of a forced size, and ~5% of the other images are empty.

VOC ``difficult`` rule: an object is difficult when less than 60% of its pixels are visible or its visible
box is narrower than 8 px on either side (exactly the objects too small to get a classification crop).

Determinism: the annotation files and the VOC XML are identical on every machine for a given seed and numpy
release line (``shapes_scene`` says why). The JPEG/PNG bytes also depend on the Pillow/libjpeg build, so
pixels may differ slightly between machines.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from training.errors import BadValueError, FileTakenError

from .shapes_files import FORMAT_VERSION, MANIFEST_NAME, SPLITS, write_dataset
from .shapes_scene import SHAPES_CATEGORIES

__all__ = ["SHAPES_CATEGORIES", "generate_shapes", "shapes_command"]

MIN_SPLIT_IMAGES = 4  # images 0..2 carry the forced anchors, the 4th leaves room for an empty image
MIN_SIDE = 160  # a never-occluded triangle with area > 96**2 needs a bounding box of about 140 x 140
# 1000 training images (~3,200 crops): with 300, pretraining on the crops plateaued at ~85% validation
# accuracy and the detectors with it (docs/benchmarks.md, "Pretraining on the crops"); generating them
# takes ~20 s.
DEFAULT_NUM_TRAIN = 1000
DEFAULT_NUM_VAL = 60


# ---------------------------------------------------------------------------------- the dataset on disk
def _check_params(num_train, num_val, image_size, seed, voc, classification) -> dict:
    def as_int(name, value, minimum):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise BadValueError(f"shapes: {name} must be an integer >= {minimum}, got {value!r}")
        return int(value)

    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise BadValueError(f"shapes: image_size must be (height, width), got {image_size!r}")
    return {
        "num_train": as_int("num_train", num_train, MIN_SPLIT_IMAGES),
        "num_val": as_int("num_val", num_val, MIN_SPLIT_IMAGES),
        # Large (> 96**2 px) never-occluded objects of every class must fit.
        "image_size": [
            as_int("image height", image_size[0], MIN_SIDE),
            as_int("image width", image_size[1], MIN_SIDE),
        ],
        "seed": as_int("seed", seed, 0),
        "voc": bool(voc),
        "classification": bool(classification),
    }


def _paths(out: Path, params: dict) -> dict[str, Path]:
    paths = {"root": out, "manifest": out / MANIFEST_NAME}
    for split in SPLITS:
        paths[f"{split}_images"] = out / "images" / split
        paths[f"{split}_annotations"] = out / "annotations" / f"instances_{split}.json"
        if params["classification"]:
            paths[f"{split}_classification"] = out / "classification" / split
    if params["voc"]:
        paths["voc"] = out / "voc"
    if params["classification"]:
        paths["classification"] = out / "classification"
    return paths


def _existing(out: Path, params: dict) -> str | None:
    """None if ``out`` can be (re)generated freely, "same" if it already holds this dataset, else why not."""
    if not out.exists() and not out.is_symlink():
        return None
    if not out.is_dir():
        return "exists and is not a directory"
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.is_file():
        return None if not any(out.iterdir()) else f"exists and is not a shapes dataset (no {MANIFEST_NAME})"
    try:
        manifest = json.loads(manifest_path.read_text())
        old = manifest["parameters"]
        version = manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"has an unreadable {MANIFEST_NAME} ({err})"
    if version != FORMAT_VERSION:
        return f"was written by shapes format version {version}, this is version {FORMAT_VERSION}"
    if old != params:
        diff = ", ".join(
            f"{k}={old.get(k)!r} (requested {v!r})" for k, v in params.items() if old.get(k) != v
        )
        return f"holds a shapes dataset generated with different parameters: {diff}"
    missing = [str(p) for p in _paths(out, params).values() if not p.exists()]
    return f"is incomplete, missing {', '.join(missing)}" if missing else "same"


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory to ``out``; an existing ``out`` is moved aside, then deleted."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, trash / "old")
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(trash / "old", out)  # put the old content back
        trash.rmdir()
        raise
    shutil.rmtree(trash)


def _generate(out, num_train, num_val, image_size, seed, voc, classification, overwrite) -> tuple[dict, bool]:
    """``generate_shapes``, plus whether it wrote anything (False: ``out`` already held this dataset)."""
    out = Path(out)
    params = _check_params(num_train, num_val, image_size, seed, voc, classification)
    state = _existing(out, params)
    if state == "same":
        return _paths(out, params), False
    if state is not None and not overwrite:
        raise FileTakenError(f"{out} {state}; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling so a crash never leaves a half-written dataset at ``out``; the rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_dataset(tmp, params)
        # Several processes (DDP ranks, each building its DataModule) may generate at once: whoever
        # publishes first wins, and the others keep that identical dataset instead of replacing it.
        if _existing(out, params) == "same":
            shutil.rmtree(tmp)
            return _paths(out, params), False
        try:
            _publish(tmp, out)
        except OSError:
            if _existing(out, params) != "same":
                raise
            shutil.rmtree(tmp)
            return _paths(out, params), False
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(out, params), True


# ------------------------------------------------------------------------------------------- public API
def generate_shapes(
    out: str | os.PathLike,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: tuple[int, int] = (192, 192),
    seed: int = 0,
    voc: bool = True,
    classification: bool = True,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the synthetic shapes dataset to ``out`` (layout in the module docstring) and return its paths.

    ``image_size`` is (height, width), each >= 160; each split needs >= 4 images. Returns a dict with keys
    root, manifest, {train,val}_images, {train,val}_annotations and, when enabled, voc, classification and
    {train,val}_classification. If ``out`` already holds a dataset generated with the same parameters nothing
    is written, even with ``overwrite`` (the parameters determine the content). Raises FileTakenError (a
    FileExistsError) if ``out`` holds anything else (other parameters, unknown files, an incomplete dataset)
    unless ``overwrite`` is True, in which case that content is deleted and replaced. Raises BadValueError (a
    ValueError) for invalid parameters.
    """
    return _generate(out, num_train, num_val, image_size, seed, voc, classification, overwrite)[0]


def _print_summary(paths: dict[str, Path], state: str) -> None:
    """What the manifest at ``paths["manifest"]`` counts, split by split, and where each layout lies."""
    manifest = json.loads(paths["manifest"].read_text())
    p, counts = manifest["parameters"], manifest["counts"]
    height, width = p["image_size"]
    print(f"shapes dataset {paths['root']} ({height}x{width} px, seed {p['seed']}): {state}")
    for split in SPLITS:
        c = counts[split]
        classes = ", ".join(f"{k} {v}" for k, v in c["per_class"].items())
        sizes = ", ".join(f"{k} {v}" for k, v in c["per_size"].items())
        print(
            f"  {split}: {c['images']} images ({c['empty_images']} empty), {c['annotations']} objects "
            f"({classes}; {sizes})"
        )
        print(f"    COCO {paths[f'{split}_images']}  {paths[f'{split}_annotations']}")
    if "voc" in paths:
        print(
            f"  VOC {paths['voc']} ({sum(counts[s]['difficult'] for s in SPLITS)} objects marked difficult)"
        )
    if "classification" in paths:
        print(f"  classification {paths['classification']} ({sum(counts[s]['crops'] for s in SPLITS)} crops)")


def shapes_command(
    out: str,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    height: int = 192,
    width: int = 192,
    seed: int = 0,
    voc: bool = True,
    classification: bool = True,
    overwrite: bool = False,
) -> None:
    """Generate the embedded shapes dataset: COCO under OUT, VOC under OUT/voc, crops under OUT/classification.

    Args:
        out: dataset directory.
        num_train, num_val: images per split.
        height, width: image size in pixels (>= 160).
        seed: random seed; the same seed gives the same annotations on any machine.
        voc, classification: also write the Pascal VOC and the image-folder layouts.
        overwrite: replace a dataset generated with other parameters.
    """
    start = time.perf_counter()
    paths, generated = _generate(
        out, num_train, num_val, (height, width), seed, voc, classification, overwrite
    )
    state = (
        f"generated in {time.perf_counter() - start:.1f} s"
        if generated
        else "already there with the same parameters, nothing written"
    )
    _print_summary(paths, state)
