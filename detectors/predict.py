"""Writing detections to disk: a COCO results file and, optionally, images with the boxes drawn.

``python train.py predict --config configs/faster_rcnn.yaml --ckpt_path best.ckpt --draw true`` adds a
:class:`CocoPredictionWriter`, which writes into its ``out_dir``:

    predictions.json   COCO results: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]
                       (what pycocotools ``COCO.loadRes`` and ``train.py evaluate`` read)
    categories.json    [{"id", "name"}, ...]: the category id written for each class
    images.json        [{"id", "file_name", "width", "height"}, ...]: which file each image id is
    failed.json        [{"id", "file_name", "error"}, ...]: the images that could not be read ([] if none)
    ground_truth.json  (VOC and YOLO data) the predicted images' annotations as a COCO instances file with the
                       same image and category ids, so ``train.py evaluate --gt ground_truth.json
                       --predictions predictions.json`` scores them; COCO data has its own instances file
    images/<stem>.jpg  (draw=True) the input images with the detections >= ``draw_score_threshold``

Category ids are the dataset's own: a COCO dataset's ``label_to_cat_id`` maps the model's contiguous labels
back (shapes: 1, 3, 7); VOC and YOLO data and plain image files have none, so the label itself is the id (YOLO
class c is label and category id c + 1). Image ids are the dataset's: COCO's own, positions in the VOC split
file, in the sorted YOLO image list, or in the sorted list of image files.

Inputs are any predict dataset that yields ``(image, target)`` with ``target["image_id"]``: the COCO/VOC/YOLO
splits of ``DetectionDataModule``, or ``detectors.data.images.ImageFileDataset`` over a glob of image files
(``--data.init_args.predict_images 'photos/*.jpg'``), whose image ids are the positions in the sorted list.

An unreadable image never throws the others' results away: the dataset skips it (``on_bad_sample: skip``, or
``defer_bad_samples``, which ``DetectionDataModule`` sets for ``predict`` after checking every file's header),
the files are written, and the images that got no prediction are named in ``failed.json`` and in a warning,
or, when the dataset's ``on_bad_sample`` is "raise", in a ``BadImageError`` raised after writing.

Multiple processes (DDP): each rank writes ``predictions.rank{N}.json`` into ``out_dir`` (which must be a
filesystem all ranks share), and after a barrier rank 0 merges them into the same files, keeping one
copy per image id (``DistributedSampler`` repeats images to even out the ranks) and removes the rank files.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from PIL import Image
from torch import Tensor
from torchvision.ops import box_convert
from torchvision.utils import draw_bounding_boxes

from training.checkpoint_io import atomic_write_bytes
from training.errors import BadValueError
from training.images import BadImageError

from .data.images import bad_images_message, image_paths_of

PREDICTIONS_FILE = "predictions.json"
CATEGORIES_FILE = "categories.json"
IMAGES_FILE = "images.json"
FAILED_FILE = "failed.json"
GROUND_TRUTH_FILE = "ground_truth.json"
IMAGES_DIR = "images"

# Box colours by label (label 1 -> first colour); names torchvision's draw_bounding_boxes (PIL) knows.
PALETTE = ("red", "lime", "blue", "yellow", "cyan", "magenta", "orange", "deepskyblue", "violet", "white")


# -- files ------------------------------------------------------------------------------------------------


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=None, separators=(",", ":")) + "\n").encode("utf-8"))


# -- conversion -------------------------------------------------------------------------------------------


def coco_results(
    image_id: int,
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    label_to_cat_id: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One image's detections as COCO result entries.

    Args:
        boxes: ``[D, 4]`` XYXY absolute pixels; written as ``[x, y, w, h]``.
        scores: ``[D]``; labels: ``[D]`` contiguous 1..K.
        label_to_cat_id: label -> category id of the dataset; None writes the label itself.
    """
    # float64: the difference of two float32 values is exact there, so x + w gives back x2.
    xywh = box_convert(boxes.detach().cpu().to(torch.float64).reshape(-1, 4), "xyxy", "xywh").tolist()
    out = []
    for box, score, label in zip(xywh, scores.tolist(), labels.tolist(), strict=True):
        label = int(label)
        if label_to_cat_id is not None and label not in label_to_cat_id:
            raise BadValueError(
                f"detection label {label} has no category id in the dataset "
                f"(labels {sorted(label_to_cat_id)}); "
                "the model's classes do not match the data's"
            )
        category = label_to_cat_id[label] if label_to_cat_id is not None else label
        out.append(
            {"image_id": int(image_id), "category_id": int(category), "bbox": box, "score": float(score)}
        )
    return out


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    score_threshold: float = 0.5,
    width: int = 2,
) -> Tensor:
    """``image`` (float ``[3, H, W]`` in 0..1 or uint8) with the detections scoring ``>= score_threshold``
    drawn as XYXY ``boxes`` captioned "name score"; returns uint8 ``[3, H, W]``."""
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    image = image.detach().cpu().as_subclass(Tensor)
    keep = scores.detach().cpu() >= score_threshold
    if not keep.any():
        return image
    boxes, scores, labels = (
        boxes.detach().cpu()[keep].float(),
        scores.detach().cpu()[keep],
        labels.cpu()[keep],
    )
    names = [class_names[i - 1] if 0 < i <= len(class_names) else str(i) for i in labels.tolist()]
    captions = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist(), strict=True)]
    colors = [PALETTE[(i - 1) % len(PALETTE)] for i in labels.tolist()]
    return draw_bounding_boxes(image, boxes, labels=captions, colors=colors, width=width)


def jpeg_bytes(image: Tensor, quality: int = 90) -> bytes:
    """uint8 ``[3, H, W]`` as JPEG file bytes (PIL; torchvision.io's encoders are deprecated)."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# -- the writer -------------------------------------------------------------------------------------------


def drawing_names(paths: dict[int, str]) -> dict[int, str]:
    """image id -> ``<file stem>.jpg``; stems that occur more than once get ``_<image id>`` appended so
    no drawing overwrites another (decided from the whole dataset, hence the same on every rank)."""
    stems = {iid: Path(p).stem for iid, p in paths.items()}
    counts = Counter(stems.values())
    return {iid: f"{s}_{iid}.jpg" if counts[s] > 1 else f"{s}.jpg" for iid, s in stems.items()}


class CocoPredictionWriter(BasePredictionWriter):
    """Collects ``predict_step`` output batch by batch and writes the files listed in the module docstring
    at the end of the predict epoch (atomically).

    Args:
        out_dir: output folder (created).
        draw: also write ``images/<stem>.jpg`` with the boxes drawn.
        draw_score_threshold: only detections scoring at least this are drawn (all are written to JSON).

    ``predict_step`` must return one dict per image with ``boxes [D, 4]`` XYXY pixels, ``scores [D]``,
    ``labels [D]`` (1..K) and ``image_id``, as ``DetectionModule.predict_step`` does for ``(images, targets)``
    batches; drawings use the batch's images, the frame the boxes are in.
    """

    def __init__(self, out_dir: str, draw: bool = False, draw_score_threshold: float = 0.5):
        super().__init__(write_interval="batch")
        self.out_dir = os.fspath(out_dir)
        self.draw = draw
        self.draw_score_threshold = draw_score_threshold
        self._reset()

    def _reset(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.images: dict[int, dict[str, Any]] = {}
        self._sources: dict[int, dict[str, Any]] = {}  # per dataloader: category map, paths, drawing names
        self._attempted: dict[int, list[int]] = {}  # per dataloader: the dataset indices of the batches

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        # Read every dataset's category map now: a class mismatch fails before any image is predicted.
        for dataloader_idx in range(len(_loaders(trainer))):
            self._source(trainer, pl_module, dataloader_idx)

    def _source(
        self, trainer: L.Trainer, pl_module: L.LightningModule, dataloader_idx: int
    ) -> dict[str, Any]:
        if dataloader_idx not in self._sources:
            dataset = getattr(_loaders(trainer)[dataloader_idx], "dataset", None)
            names = list(getattr(pl_module, "class_names", None) or [])
            data_names = getattr(dataset, "class_names", None)
            if names and data_names is not None and list(data_names) != names:
                raise BadValueError(
                    f"the model's classes {names} differ from the predict dataset's {list(data_names)}; "
                    "its category ids would be wrong"
                )
            paths = image_paths_of(dataset)
            self._sources[dataloader_idx] = {
                "label_to_cat_id": getattr(dataset, "label_to_cat_id", None),
                "class_names": names or list(data_names or []),
                "paths": paths,
                "drawings": drawing_names(paths),
            }
        return self._sources[dataloader_idx]

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        # Every index the sampler gave, including images the dataset skipped as unreadable (not in ``batch``).
        self._attempted.setdefault(dataloader_idx, []).extend(batch_indices or [])
        if not prediction:
            return
        source = self._source(trainer, pl_module, dataloader_idx)
        images, targets = batch
        for det, image, target in zip(prediction, images, targets, strict=True):
            if "image_id" not in det:
                raise BadValueError(
                    "predict_step returned a detection without 'image_id'; the predict data must yield "
                    "(image, target) with target['image_id']"
                )
            image_id = int(det["image_id"])
            self.results += coco_results(
                image_id, det["boxes"], det["scores"], det["labels"], source["label_to_cat_id"]
            )
            path = target.get("path") if isinstance(target, dict) else None
            path = path or source["paths"].get(image_id, "")
            height, width = image.shape[-2:]
            self.images[image_id] = {
                "id": image_id,
                "file_name": path,
                "width": int(width),
                "height": int(height),
            }
            if self.draw:
                name = source["drawings"].get(image_id) or f"{Path(path).stem or image_id}.jpg"
                drawn = draw_detections(
                    image,
                    det["boxes"],
                    det["scores"],
                    det["labels"],
                    source["class_names"],
                    self.draw_score_threshold,
                )
                atomic_write_bytes(os.path.join(self.out_dir, IMAGES_DIR, name), jpeg_bytes(drawn))

    def _categories(self) -> list[dict[str, Any]]:
        cats: dict[int, str] = {}
        for source in self._sources.values():
            mapping = source["label_to_cat_id"]
            for label, name in enumerate(source["class_names"], start=1):
                cats[mapping[label] if mapping else label] = name
        return [{"id": cid, "name": cats[cid]} for cid in sorted(cats)]

    def _failed(self, trainer: L.Trainer) -> dict[int, dict[str, Any]]:
        """image id -> {id, file_name, error} of every image this process was given and got no prediction
        for (the dataset skipped it as unreadable); the error is read again from the file here."""
        failed: dict[int, dict[str, Any]] = {}
        for dataloader_idx, indices in self._attempted.items():
            dataset = getattr(_loaders(trainer)[dataloader_idx], "dataset", None)
            if not hasattr(dataset, "read_error"):
                continue
            for index in dict.fromkeys(indices):
                image_id = dataset.image_id(index)
                if image_id not in self.images and image_id not in failed:
                    path = self._sources[dataloader_idx]["paths"].get(image_id, "")
                    error = dataset.read_error(index) or f"{path}: could not be read"
                    failed[image_id] = {"id": image_id, "file_name": path, "error": error}
        return failed

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        results, images, failed = self.results, self.images, self._failed(trainer)
        if trainer.world_size > 1:
            rank_file = os.path.join(self.out_dir, f"predictions.rank{trainer.global_rank}.json")
            atomic_write_json(rank_file, {"results": results, "images": list(images.values()),
                                          "failed": list(failed.values())})  # fmt: skip
            trainer.strategy.barrier("litvision_predictions")
            if not trainer.is_global_zero:
                return
            results, images, failed = merge_rank_files(
                [os.path.join(self.out_dir, f"predictions.rank{r}.json") for r in range(trainer.world_size)]
            )
        write_prediction_files(self.out_dir, results, list(images.values()), self._categories(),
                               list(failed.values()), ground_truth(_loaders(trainer), images))  # fmt: skip
        if failed:
            self._report_failed(trainer, failed, len(images))

    def _report_failed(self, trainer: L.Trainer, failed: dict[int, dict[str, Any]], written: int) -> None:
        """Name the unreadable images: a warning, or a BadImageError where a dataset's policy is "raise"
        (the files are written by then, so the other images' predictions are kept either way)."""
        reasons = [failed[i]["error"] for i in sorted(failed)]
        message = (f"{bad_images_message(reasons, written + len(reasons))} (listed in "
                   f"{os.path.join(self.out_dir, FAILED_FILE)}); the predictions of the other {written} "
                   f"images are written to {self.out_dir}")  # fmt: skip
        datasets = [getattr(loader, "dataset", None) for loader in _loaders(trainer)]
        if any(getattr(dataset, "on_bad_sample", None) == "raise" for dataset in datasets):
            raise BadImageError(message)
        rank_zero_warn(message)

    @property
    def predictions_path(self) -> str:
        return os.path.join(self.out_dir, PREDICTIONS_FILE)


def _loaders(trainer: L.Trainer) -> list:
    loaders = trainer.predict_dataloaders
    if loaders is None:
        return []
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def merge_rank_files(
    paths: list[str],
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """Merge per-rank files (then removes them) into (results, images, failed), taking each image id's
    detections from the first rank that saw it; an image is failed only if no rank predicted it."""
    results: list[dict[str, Any]] = []
    images: dict[int, dict[str, Any]] = {}
    failed: dict[int, dict[str, Any]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            part = json.load(f)
        new = {img["id"] for img in part["images"]} - images.keys()
        images.update({img["id"]: img for img in part["images"] if img["id"] in new})
        results += [r for r in part["results"] if r["image_id"] in new]
        failed.update({bad["id"]: bad for bad in part.get("failed", [])})
    for path in paths:
        os.remove(path)
    return results, images, {i: bad for i, bad in failed.items() if i not in images}


def ground_truth(loaders: list, image_ids) -> dict | None:
    """The COCO ground truth of the predicted ``image_ids`` of the first predict dataset that has annotations
    and no COCO file of its own (VOC, YOLO: ``DetectionDataset.to_coco``), or None."""
    for loader in loaders:
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "to_coco") and getattr(dataset, "annotation_file", None) is None:
            return dataset.to_coco(sorted(image_ids))
    return None


def write_prediction_files(
    out_dir: str, results: list[dict], images: list[dict], categories: list[dict], failed: Sequence[dict] = (),
    truth: dict | None = None,
) -> None:
    """Write ``categories.json``, ``images.json``, ``failed.json``, ``ground_truth.json`` (``truth``, when given)
    and, last, ``predictions.json`` (sorted by image id, then descending score)."""
    if truth is not None:
        atomic_write_json(os.path.join(out_dir, GROUND_TRUTH_FILE), truth)
    results = sorted(results, key=lambda r: (r["image_id"], -r["score"]))
    atomic_write_json(os.path.join(out_dir, CATEGORIES_FILE), categories)
    atomic_write_json(os.path.join(out_dir, IMAGES_FILE), sorted(images, key=lambda i: i["id"]))
    atomic_write_json(os.path.join(out_dir, FAILED_FILE), sorted(failed, key=lambda i: i["id"]))
    atomic_write_json(os.path.join(out_dir, PREDICTIONS_FILE), results)  # last: its presence means done
