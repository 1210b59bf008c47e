"""Synthetic "shapes" detection dataset: a small, deterministic stand-in for COCO that builds in seconds.

This module checks the parameters, decides where a dataset may be written (a missing or empty folder, or
over a shapes dataset, removing only the files the generator wrote: ``generate_shapes``; a dataset without the
YOLO copy gets it added, new files only: ``add_yolo_copy``), publishes a finished
dataset (atomically into a missing or empty folder) and holds the ``train.py shapes`` command;
``shapes_files`` writes the files and ``shapes_scene`` draws the images. Layout written under ``out``
(every box below is integer-aligned, so all layouts round-trip exactly)::

    images/{train,val}/000001.jpg             image ids are unique across both splits
    annotations/instances_{train,val}.json    COCO: bbox [x, y, w, h] of the VISIBLE mask, RLE segmentation
    voc/JPEGImages/000001.jpg                 (voc=True) Pascal VOC copy of the same images
    voc/Annotations/000001.xml                VOC boxes xmin, ymin, xmax, ymax = x + 1, y + 1, x + w, y + h
    voc/ImageSets/Main/{train,val,trainval}.txt
    data.yaml                                 (yolo=True) YOLO (Ultralytics) layout over the same images/<split>:
    labels/{train,val}/000001.txt             class cx cy w h per object, normalised, class = label - 1
    classification/{train,val}/<class>/*.png  (classification=True) crops of the visible boxes plus a margin
    shapes.json                               manifest: generation parameters and counts ("replacing": the
                                              older parameters while an overwrite is under way)

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

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from training.checkpoint_io import atomic_write_bytes
from training.errors import BadFileError, BadValueError, FileTakenError

from .shapes_files import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    SPLITS,
    YOLO_YAML,
    generated_files,
    layout_folders,
    write_dataset,
    yolo_copy,
)
from .shapes_scene import SHAPES_CATEGORIES

__all__ = ["SHAPES_CATEGORIES", "add_yolo_copy", "generate_shapes", "shapes_command"]

MIN_SPLIT_IMAGES = 4  # images 0..2 carry the forced anchors, the 4th leaves room for an empty image
MIN_SIDE = 160  # a never-occluded triangle with area > 96**2 needs a bounding box of about 140 x 140
# 1000 training images (~3,200 crops): with 300, pretraining on the crops plateaued at ~85% validation
# accuracy and the detectors with it (docs/benchmarks.md, "Pretraining on the crops"); generating them
# takes ~20 s.
DEFAULT_NUM_TRAIN = 1000
DEFAULT_NUM_VAL = 60


# ---------------------------------------------------------------------------------- the dataset on disk
def _check_params(num_train, num_val, image_size, seed, voc, classification, yolo) -> dict:
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
        "yolo": bool(yolo),
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
    if params["yolo"]:
        paths["yolo"] = out / YOLO_YAML
        paths.update({f"{split}_labels": out / "labels" / split for split in SPLITS})
    if params["classification"]:
        paths["classification"] = out / "classification"
    return paths


def _manifest_owned(manifest: dict) -> list[dict]:
    """The parameter sets whose generated files a manifest vouches for: its own and, while a replacement
    is under way, the replaced dataset's, each with every parameter (a dataset written before the YOLO copy
    existed has yolo=False). Raises (KeyError, TypeError, BadValueError) if malformed."""
    return [_check_params(p["num_train"], p["num_val"], p["image_size"], p["seed"], p["voc"], p["classification"],
                          p.get("yolo", False))
            for p in [manifest["parameters"], *manifest.get("replacing", [])]]  # fmt: skip


def _existing(out: Path, params: dict) -> tuple[str | None, list[dict] | None]:
    """(state, owned). state: None if ``out`` is missing or an empty folder, "same" if it holds this dataset,
    else why it cannot be used as it is. owned: the parameter sets whose generated files ``overwrite`` may
    remove; None where ``out`` is no shapes dataset this version reads, so nothing there is ever removed."""
    if not out.exists() and not out.is_symlink():
        return None, None
    if not out.is_dir():
        return "exists and is not a directory", None
    manifest_path = out / MANIFEST_NAME
    if not manifest_path.is_file():
        if not any(out.iterdir()):
            return None, None
        return f"is not empty and holds no shapes dataset (no {MANIFEST_NAME})", None
    try:
        manifest = json.loads(manifest_path.read_text())
        version = manifest["format_version"]
        if version != FORMAT_VERSION:
            return f"holds a shapes dataset of format version {version}, whose files this version (format "\
                   f"{FORMAT_VERSION}) does not know", None  # fmt: skip
        owned = _manifest_owned(manifest)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"has an unreadable {MANIFEST_NAME} ({err})", None
    old = owned[0]
    if len(owned) > 1:
        return "holds a shapes dataset whose replacement was interrupted", owned
    if old != params:
        diff = ", ".join(
            f"{k}={old.get(k)!r} (requested {v!r})" for k, v in params.items() if old.get(k) != v
        )
        return f"holds a shapes dataset generated with different parameters: {diff}", owned
    missing = [str(p) for p in _paths(out, params).values() if not p.exists()]
    return (f"is incomplete, missing {', '.join(missing)}", owned) if missing else ("same", owned)


def _refusal(out: Path, state: str, owned: list[dict] | None) -> str:
    if owned is None:
        return (f"{out} {state}: shapes writes only into a missing or empty folder or over a shapes dataset, "
                "and never removes files it did not write; choose another out folder (--out)")  # fmt: skip
    return (f"{out} {state}; pass overwrite=True (--overwrite true) to replace that dataset's files (files "
            "the generator did not write are kept)")  # fmt: skip


def _publish(tmp: Path, out: Path, params: dict) -> bool:
    """Rename the finished ``tmp`` to ``out``, a missing or empty folder; False (``tmp`` left) if another
    process published this dataset there first. Removes nothing but an empty folder."""
    try:
        os.replace(tmp, out)  # POSIX rename replaces an empty folder atomically and refuses any other
    except OSError:
        if _existing(out, params)[0] == "same":
            return False
        if not out.is_dir() or any(out.iterdir()):
            raise
        out.rmdir()  # systems whose rename refuses every existing folder
        os.replace(tmp, out)
    return True


def _new_files(tmp: Path, out: Path, old: set[Path]) -> list[Path]:
    """The files of the dataset in ``tmp`` (relative paths, manifest excluded); FileTakenError if one
    would replace a file in ``out`` that is not in ``old`` (the generator's), or needs a folder where
    ``out`` has a file."""
    new = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    for rel in new:
        target = out / rel
        blocked = [target] if target.exists() and target not in old else []
        blocked += [d for d in target.parents if d.is_relative_to(out) and d.exists() and not d.is_dir()]
        if blocked:
            raise FileTakenError(f"{blocked[0]} is not a file of the shapes dataset in {out}, and the new "
                                 "dataset would overwrite it: move it away or choose another out "
                                 "(--out)")  # fmt: skip
    return new


def _replace_in_place(tmp: Path, out: Path, params: dict, owned: list[dict]) -> None:
    """Swap the dataset in ``out`` for the finished one in ``tmp``, removing only the files the generator
    wrote for the ``owned`` parameter sets: every other file in ``out`` stays. Until the last step the
    manifest names both datasets, so an interrupted swap is finished by the next overwrite."""
    old = set().union(*(generated_files(out, p) for p in owned))
    new = _new_files(tmp, out, old)
    pending = {"generator": "detectors.data.shapes", "format_version": FORMAT_VERSION, "parameters": params,
               "replacing": owned}  # fmt: skip
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(pending, indent=2) + "\n").encode())
    for path in old - {out / MANIFEST_NAME}:
        path.unlink(missing_ok=True)
    for folder in layout_folders(out):
        with contextlib.suppress(OSError):  # kept where a user's file remains in it
            folder.rmdir()
    for rel in new:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, out / rel)
    os.replace(tmp / MANIFEST_NAME, out / MANIFEST_NAME)  # last: no "replacing" in it means complete


def _add_yolo_copy(out: Path, old: dict, params: dict) -> None:
    """Add the YOLO copy to the shapes dataset in ``out`` written with ``old`` (``params`` with yolo=False, from
    before the copy existed): new files only, derived from its COCO files, and the manifest last. A file at
    one of their paths stops it, unless it holds what would be written there (an interrupted addition)."""
    missing = [str(p) for p in _paths(out, old).values() if not p.exists()]
    if missing:
        raise FileTakenError(_refusal(out, f"is incomplete, missing {', '.join(missing)}", [old]))
    files = yolo_copy(out, params)
    for path, text in files.items():
        blocked = [d for d in path.parents if d.is_relative_to(out) and d.exists() and not d.is_dir()]
        if path.exists() and (not path.is_file() or path.read_text() != text):
            blocked.insert(0, path)
        if blocked:
            raise FileTakenError(f"{blocked[0]} is not a file of the shapes dataset in {out}, and its YOLO copy "
                                 "would overwrite it: move it away or choose another out (--out)")  # fmt: skip
    # Each file written beside the dataset, then renamed into place: an interruption leaves whole files only.
    target = Path(os.path.realpath(out))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.yolo-", dir=target.parent))
    try:
        for i, (path, text) in enumerate(files.items()):
            (tmp / str(i)).write_text(text)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / str(i), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["parameters"] = params
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())


def _generate(out, num_train, num_val, image_size, seed, voc, classification, yolo,
              overwrite) -> tuple[dict, bool]:  # fmt: skip
    """``generate_shapes``, plus whether it wrote anything (False: ``out`` already held this dataset)."""
    out = Path(out)
    params = _check_params(num_train, num_val, image_size, seed, voc, classification, yolo)
    state, owned = _existing(out, params)
    if state == "same":
        return _paths(out, params), False
    if params["yolo"] and owned == [{**params, "yolo": False}]:  # only the YOLO copy is missing: it is added
        _add_yolo_copy(out, owned[0], params)
        return _paths(out, params), True
    if state is not None and (owned is None or not overwrite):
        raise FileTakenError(_refusal(out, state, owned))
    target = Path(os.path.realpath(out))  # a symlinked folder is written through; the link stays
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:  # a file on the path, no write access
        raise BadFileError(f"{out}: cannot create its folder {target.parent} ({e.strerror})") from None
    # Built in a sibling, so a crash never leaves a half-written dataset at ``out``.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_dataset(tmp, params)
        if state is not None:
            _replace_in_place(tmp, target, params, owned)
            return _paths(out, params), True
        # Several processes (DDP ranks, each building its DataModule) may generate at once: whoever
        # publishes first wins, and the others keep that identical dataset.
        return _paths(out, params), _publish(tmp, target, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder: whatever is left of it


# ------------------------------------------------------------------------------------------- public API
def generate_shapes(
    out: str | os.PathLike,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: tuple[int, int] = (192, 192),
    seed: int = 0,
    voc: bool = True,
    classification: bool = True,
    yolo: bool = True,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the synthetic shapes dataset to ``out`` (layout in the module docstring) and return its paths.

    ``image_size`` is (height, width), each >= 160; each split needs >= 4 images. Returns a dict with keys
    root, manifest, {train,val}_images, {train,val}_annotations and, when enabled, voc, classification,
    {train,val}_classification, yolo (data.yaml) and {train,val}_labels. Writes only into a missing or empty
    folder, or over a shapes dataset: if ``out`` already holds one generated with the same parameters nothing
    is written, even with ``overwrite``
    (the parameters determine the content); one with other parameters, or incomplete, raises FileTakenError
    (a FileExistsError) unless ``overwrite`` is True, which removes the files the generator wrote there (its
    manifest says which) and keeps every other file. A folder holding anything else (no manifest) is
    refused with or without ``overwrite``: nothing in it is touched. Raises BadValueError (a ValueError) for
    invalid parameters.
    """
    return _generate(out, num_train, num_val, image_size, seed, voc, classification, yolo, overwrite)[0]


def add_yolo_copy(out: str | os.PathLike) -> dict[str, Path]:
    """Add the YOLO copy to the shapes dataset in ``out`` written without it (by an older version, or with
    yolo=False), with the parameters its manifest holds; its other files stay as they are. Returns the paths."""
    out = Path(out)
    try:
        (p,) = _manifest_owned(json.loads((out / MANIFEST_NAME).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadFileError(f"{out}: no complete shapes dataset to add a YOLO copy to ({err})") from None
    return generate_shapes(out, p["num_train"], p["num_val"], tuple(p["image_size"]), p["seed"], p["voc"],
                           p["classification"], yolo=True)  # fmt: skip


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
    if "yolo" in paths:
        print(f"  YOLO {paths['yolo']} (labels/<split>/*.txt beside the COCO images/<split>)")
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
    yolo: bool = True,
    overwrite: bool = False,
) -> None:
    """Generate the embedded shapes dataset: COCO and YOLO under OUT, VOC under OUT/voc, crops under
    OUT/classification.

    Args:
        out: dataset directory.
        num_train, num_val: images per split.
        height, width: image size in pixels (>= 160).
        seed: random seed; the same seed gives the same annotations on any machine.
        voc, classification, yolo: also write the Pascal VOC, the image-folder and the YOLO layouts.
        overwrite: replace a shapes dataset generated with other parameters (only the files it wrote).
    """
    start = time.perf_counter()
    paths, generated = _generate(
        out, num_train, num_val, (height, width), seed, voc, classification, yolo, overwrite
    )
    state = (
        f"generated in {time.perf_counter() - start:.1f} s"
        if generated
        else "already there with the same parameters, nothing written"
    )
    _print_summary(paths, state)
