"""A detector's part of ``train.py export`` (``training.export``): the graph that is exported, its metadata and
the comparison with the eager module.

The exported graph is the torchvision detector itself, preprocessing included (``GeneralizedRCNNTransform``:
resize to ``min_size``/``max_size``, ImageNet normalisation, padding), with litvision's additions made plain:

* the ``channels_last`` forward pre-hook on the backbone (``detectors.backbones.use_channels_last``), which
  ``torch.jit.script`` cannot compile, becomes a module converting the backbone's input (ONNX has no memory
  layout, so it is a no-op there);
* the float32 heads of mixed-precision runs: the exported graph is float32 throughout;
* FrozenBatchNorm2d layers export as they are (a scale and a shift);
* label-0 detections are dropped as ``DetectionModule.forward`` drops them.

Outputs, TensorFlow Object Detection API style (a fixed number of rows per image, padded):
``boxes`` FloatTensor[B, D, 4] x1 y1 x2 y2 in the input image's pixels, ``scores`` FloatTensor[B, D],
``labels`` Int64Tensor[B, D] in 1..K, ``num_detections`` Int64Tensor[B]; rows past ``num_detections`` hold
zeros (label 0). D is the model's ``detections_per_img``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from training.export import CheckResult, ExportAdapter

from .backbones import _channels_last_input


class ChannelsLastInput(nn.Module):
    """The backbone fed in NHWC layout: ``use_channels_last``'s pre-hook as a module exporters can compile."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.body = backbone
        self.out_channels = backbone.out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.body(x.contiguous(memory_format=torch.channels_last))


def plain_detector(model: nn.Module, channels_last: bool) -> nn.Module:
    """A copy of the torchvision detector without litvision's forward pre-hooks (eval mode)."""
    model = copy.deepcopy(model).eval()
    hooks = model.backbone._forward_pre_hooks
    for key in [k for k, hook in hooks.items() if hook is _channels_last_input]:
        del hooks[key]
    if channels_last:
        model.backbone = ChannelsLastInput(model.backbone)
    return model


class DetectorGraph(nn.Module):
    """``images`` FloatTensor[B, 3, H, W] in 0..1 -> ``(boxes [B, D, 4], scores [B, D], labels [B, D],
    num_detections [B])`` (module docstring)."""

    def __init__(self, model: nn.Module, detections_per_img: int):
        super().__init__()
        self.model = model
        self.detections_per_img = detections_per_img

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        detections = self.model(list(images.unbind(0)))
        if torch.jit.is_scripting():  # a scripted torchvision detector returns (losses, detections)
            detections = detections[1]
        d = self.detections_per_img
        boxes, scores, labels = [], [], []
        for det in detections:
            keep = det["labels"] > 0  # torchvision's RetinaNet may return background (DetectionModule drops it)
            # Padded by concatenating D zero rows and cutting at D: sizes an exporter sees as constants.
            boxes.append(torch.cat([det["boxes"][keep], images.new_zeros((d, 4))])[:d])
            scores.append(torch.cat([det["scores"][keep], images.new_zeros((d,))])[:d])
            labels.append(torch.cat([det["labels"][keep], torch.zeros((d,), dtype=torch.int64)])[:d])
        labels_out = torch.stack(labels)
        return torch.stack(boxes), torch.stack(scores), labels_out, (labels_out > 0).sum(dim=1)


class DetectorExport(ExportAdapter):
    """``DetectionModule.export_adapter()``: see the module docstring. ONNX and ExportedProgram graphs have a
    fixed batch size (``batch_size``: torchvision runs the images of a batch one by one, and the exporters
    unroll that loop) and free height and width; a TorchScript graph leaves all three free."""

    output_names = ("boxes", "scores", "labels", "num_detections")

    def __init__(self, module: nn.Module, batch_size: int = 1):
        super().__init__(module)
        self.batch_size = batch_size

    def graph(self, format: str) -> nn.Module:
        model = plain_detector(self.module.model, bool(self.module.hparams.get("channels_last")))
        return DetectorGraph(model, self.detections_per_img).eval()

    @property
    def detections_per_img(self) -> int:
        model = self.module.model
        return int(model.roi_heads.detections_per_img if hasattr(model, "roi_heads") else model.detections_per_img)

    def dynamic(self, format: str) -> dict[int, str]:
        return {2: "height", 3: "width"} if format != "torchscript" else {0: "batch", 2: "height", 3: "width"}

    def eager(self, images: Tensor) -> list[Tensor]:
        """The module's own detections, padded as the graph pads them (``DetectionModule.forward``)."""
        detections = self.module(list(images))
        b, d = len(images), self.detections_per_img
        out = [images.new_zeros((b, d, 4)), images.new_zeros((b, d)), torch.zeros((b, d), dtype=torch.int64),
               torch.zeros(b, dtype=torch.int64)]  # fmt: skip
        for i, det in enumerate(detections):
            n = len(det["boxes"])
            out[0][i, :n], out[1][i, :n], out[2][i, :n], out[3][i] = det["boxes"], det["scores"], det["labels"], n
        return out

    def compare(self, exported: list[list[Tensor]], eager: list[list[Tensor]], tolerances: dict) -> CheckResult:
        """Per image, the same detections in any order (``match_detections``)."""
        total, ties, worst_box, worst_score = 0, 0, 0.0, 0.0
        for batch, (got, want) in enumerate(zip(exported, eager, strict=True)):
            for i in range(len(want[3])):
                n, m = int(want[3][i]), int(got[3][i])
                found = match_detections([t[i, :m] for t in got[:3]], [t[i, :n] for t in want[:3]], tolerances)
                if isinstance(found, str):
                    return CheckResult(False, f"batch {batch} image {i}: {found}")
                total, ties = total + n, ties + found[2]
                worst_box, worst_score = max(worst_box, found[0]), max(worst_score, found[1])
        boxes = f"{worst_box:.1e} px (<= {tolerances['boxes']:g})"
        scores = f"{worst_score:.1e} (<= {tolerances['scores']:g})"
        tied = f" ({ties} tied at the cut-off score)" if ties else ""
        return CheckResult(True, f"{total} detections{tied}, labels equal, boxes max |diff| {boxes}, scores {scores}")

    def metadata(self, data: Any, format: str) -> dict[str, Any]:
        names = list(self.module.class_names)
        ids = category_ids(data, len(names))
        transform = self.module.model.transform
        size = "dynamic" if 0 in self.dynamic(format) else self.batch_size
        return {"task": "detection", "model_class": type(self.module).__name__, "class_names": names,
                "category_ids": ids or list(range(1, len(names) + 1)),
                "category_ids_from": "data" if ids else "labels (no COCO data config given)",
                "input": "images: float32[B, 3, H, W], RGB in 0..1; resized and normalised inside",
                "outputs": "boxes float32[B, D, 4] x1 y1 x2 y2 input pixels; scores float32[B, D]; labels int64[B, D] "
                           "in 1..K (0: padding); num_detections int64[B]",
                "batch_size": size, "detections_per_img": self.detections_per_img,
                "min_size": int(transform.min_size[-1]), "max_size": int(transform.max_size),
                "image_mean": list(transform.image_mean), "image_std": list(transform.image_std)}  # fmt: skip

    def generated_images(self, count: int) -> list[Tensor]:
        """Shapes scenes (``detectors.data.shapes_scene``) at the model's input size: images with objects."""
        from detectors.data.shapes_scene import draw_scene

        size = int(self.module.model.transform.min_size[-1])
        return [torch.from_numpy(draw_scene(0, 9, i, (size, size), False, None)[1]).permute(2, 0, 1).float() / 255
                for i in range(count)]  # fmt: skip


def category_ids(data: Any, num_classes: int) -> list[int] | None:
    """The dataset's category id of each label 1..K (a COCO dataset's own ids), or None when it has none."""
    dataset = getattr(data, "datasets", {}).get("val") if data is not None else None
    mapping = getattr(dataset, "label_to_cat_id", None)
    if not mapping:
        return None
    return [int(mapping[label]) for label in range(1, num_classes + 1)]


def match_detections(got: list[Tensor], want: list[Tensor], tolerances: dict) -> tuple[float, float, int] | str:
    """Pair each wanted detection (``boxes [N, 4]``, ``scores [N]``, ``labels [N]``) with an unused one of
    ``got`` of the same label within the tolerances, in descending score order (NMS may order equal scores
    either way). A detection left without a partner, on either side, is accepted only when it scores within the
    score tolerance of the image's lowest score: where a detection limit or a threshold cuts between equal scores,
    differences of 1e-7 decide which of them is kept. Returns the largest box and score differences of the pairs
    and the number of such ties, or what did not match."""
    boxes, scores, labels = got
    used = torch.zeros(len(boxes), dtype=torch.bool)
    worst_box = worst_score = 0.0
    lowest = min([float(s.min()) for s in (scores, want[1]) if len(s)], default=0.0)
    cut = lowest + tolerances["scores"]
    unmatched = []
    for j in torch.argsort(want[1], descending=True, stable=True).tolist():
        box_diff = (boxes - want[0][j]).abs().amax(dim=1) if len(boxes) else boxes.new_zeros(0)
        score_diff = (scores - want[1][j]).abs()
        fits = ~used & (labels == want[2][j]) & (box_diff <= tolerances["boxes"]) & (score_diff <= tolerances["scores"])
        if not fits.any():
            if float(want[1][j]) > cut:
                return _unmatched(want, j, boxes, labels, box_diff, score_diff)
            unmatched.append(j)
            continue
        k = int(torch.nonzero(fits)[(box_diff[fits]).argmin()])
        used[k] = True
        worst_box, worst_score = max(worst_box, float(box_diff[k])), max(worst_score, float(score_diff[k]))
    extra = scores[~used]
    if (extra > cut).any():
        k = int(torch.nonzero(~used)[extra.argmax()])
        return (f"the exported model has a detection the eager one has not: label {int(labels[k])} score "
                f"{float(scores[k]):.4f} box {[round(v, 2) for v in boxes[k].tolist()]}")
    return worst_box, worst_score, len(unmatched) + len(extra)


def _unmatched(want: list[Tensor], j: int, boxes: Tensor, labels: Tensor, box_diff: Tensor, score_diff: Tensor) -> str:
    closest = (box_diff + (labels != want[2][j]) * 1e9).argmin().item() if len(boxes) else None
    near = "" if closest is None else (f"; closest: label {int(labels[closest])}, box |diff| "
                                       f"{box_diff[closest]:.2e} px, score |diff| {score_diff[closest]:.2e}")
    return (f"no exported detection matches label {int(want[2][j])} score {float(want[1][j]):.4f} box "
            f"{[round(v, 2) for v in want[0][j].tolist()]}{near}")
