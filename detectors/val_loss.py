"""Validation loss *and* detections from one backbone pass, changing no state; and the training losses with
float32 anchors, box coding and losses under mixed precision (``training_losses``).

torchvision detectors return losses only in train mode and detections only in
eval mode. Calling the model twice would run the backbone twice, and the train-mode
call would update BatchNorm running statistics and draw from the global RNG (RPN
and ROI sampling). Here the input transform and backbone run once in eval mode,
then the heads run:

* for the loss, with the detector-level modules in training mode (so torchvision
  computes its losses, sampling proposals as in training) but every BatchNorm and
  Dropout still in eval mode -- the loss Keras reports as ``val_loss`` is computed
  with layers in inference mode -- inside ``torch.random.fork_rng``, so the sampling
  neither advances the RNG that training uses nor depends on it. The loss is the mean
  over the batch's images of each image's own loss, and Faster R-CNN samples each
  image's anchors and ROIs from ``VAL_LOSS_SEED`` afresh: an image's loss is a
  function of the weights and that image, whatever batch, process or position it
  comes in (torchvision's batched loss draws the images' samples one after another
  from one RNG stream and normalises over the batch's samples, so it changed with
  the batch size). What draws nothing is shared or batched: Faster R-CNN's RPN head output, anchors and
  decoded boxes serve the loss and the detections, and its box head runs once over every image's sampled ROIs.
  RetinaNet's loss samples nothing and is already a per-image mean;
* for the detections, in eval mode, exactly as ``model(images)`` would -- except that under bf16/fp16
  autocast the heads run in float32, so boxes and scores are not rounded to half precision.

Every module's ``training`` flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

from training.errors import BadValueError

_INFERENCE_ONLY = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
# Faster R-CNN's loss samples each image's anchors and proposals from this seed, in a forked RNG: val_loss is a
# function of the weights and the data only -- the same in `fit` and `validate`, with any batch size and number of
# processes, and no noise for the callbacks monitoring it.
VAL_LOSS_SEED = 0


@contextlib.contextmanager
def loss_mode(model: nn.Module):
    """Training-mode control flow with inference-mode layers, the RNG forked and seeded with ``VAL_LOSS_SEED``;
    restores every flag and the RNG. Yields ``reseed()``, which seeds it again: call it before each image's
    sampling."""
    modules = list(model.modules())  # walked once: a few hundred modules, every validation batch
    flags = [m.training for m in modules]
    devices = sorted({p.device.index for m in modules for p in m._parameters.values()
                      if p is not None and p.device.type == "cuda"})  # fmt: skip

    def reseed() -> None:
        torch.random.default_generator.manual_seed(VAL_LOSS_SEED)
        for index in devices:  # only the forked (restored) ones: torch.manual_seed would reseed every GPU
            torch.cuda.default_generators[index].manual_seed(VAL_LOSS_SEED)

    try:
        with torch.random.fork_rng(devices=devices):
            reseed()
            model.train()
            for m in modules:
                if isinstance(m, _INFERENCE_ONLY):
                    _set_training(m, False)
            yield reseed
    finally:
        for m, flag in zip(modules, flags, strict=True):
            _set_training(m, flag)


def _set_training(module: nn.Module, flag: bool) -> None:
    """``module.training = flag`` as ``nn.Module.train`` sets it on one module, without ``nn.Module.__setattr__``'s
    checks for parameters, buffers and submodules (most of the cost of switching a few hundred modules)."""
    object.__setattr__(module, "training", flag)


def _check_detector(model: nn.Module) -> None:
    if not isinstance(model, (RetinaNet, GeneralizedRCNN)):
        raise TypeError(f"expected a torchvision GeneralizedRCNN or RetinaNet, got {type(model).__name__}")


def _features(model: nn.Module, images: list[Tensor], targets: list[dict] | None, fixed_size: bool = True,
              to_float: bool = True):
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    was_training = model.transform.training
    if fixed_size:
        model.transform.eval()  # eval picks the fixed (last) min_size; training would draw one at random
    try:
        image_list, targets = model.transform(images, targets)
    finally:
        model.transform.training = was_training
    features = model.backbone(image_list.tensors)
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    if to_float:
        # The heads run in float32 even under bf16/fp16 autocast: boxes and scores in half precision would
        # be rounded to 2-8 px steps and create score ties, and mAP would score the rounding. Their own
        # dtype, that is: float64 under `64-true` (DetectionModule refuses `bf16-true`/`16-true`).
        head = model.head if isinstance(model, RetinaNet) else model.rpn
        dtype = next(head.parameters()).dtype
        features = OrderedDict((k, v.to(dtype)) for k, v in features.items())
    return image_list, targets, features, original_sizes


def _float32_like(t: Tensor) -> Tensor:
    """A float32 stand-in of ``t``'s shape and device, without memory: AnchorGenerator reads only those and the
    dtype, in which it builds the anchors."""
    return torch.empty((), dtype=torch.float32, device=t.device).expand(t.shape)


def _full_precision(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _rcnn_losses(model: GeneralizedRCNN, image_list, features, targets) -> dict[str, Tensor]:
    """GeneralizedRCNN.forward's loss part: the RPN's, then the box heads' on the RPN's proposals."""
    proposals, rpn_losses = model.rpn(image_list, features, targets)
    _, det_losses = model.roi_heads(features, proposals, image_list.image_sizes, targets)
    return {**det_losses, **rpn_losses}


def _rpn_outputs(
    rpn: RegionProposalNetwork, image_list: ImageList, features
) -> tuple[Tensor, Tensor, list[Tensor], Tensor, list[int]]:
    """RegionProposalNetwork.forward up to its proposals, which the loss and the detections share: the head once
    over the batch, the anchors, the decoded boxes. Returns (objectness [N * A, 1], deltas [N * A, 4], anchors
    per image [A, 4], decoded proposals [N, A, 4], anchors per level)."""
    levels = list(features.values())
    objectness, deltas = rpn.head(levels)
    anchors = rpn.anchor_generator(image_list, levels)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # rows image by image
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    return objectness, deltas, anchors, proposals, per_level


def _rcnn_losses_per_image(model: GeneralizedRCNN, image_list: ImageList, features, rpn_outputs,
                           targets) -> tuple[dict[str, Tensor], list[Tensor]]:  # fmt: skip
    """The mean over the images of each image's :func:`_rcnn_losses`, its sampling seeded afresh (module doc),
    and the training-mode proposals (per image ``[P, 4]``, best first).

    Each image's RPN and ROI sampling draw from ``VAL_LOSS_SEED`` in torchvision's order (the RPN's anchors, then
    its ROIs); what draws nothing runs once for the batch: the RPN head (shared with the detections), the
    training-mode proposals, the anchor matching, and the box head over every image's sampled ROIs."""
    rpn, roi_heads = model.rpn, model.roi_heads
    objectness, deltas, anchors, decoded, per_level = rpn_outputs
    n = len(targets)
    per_image: list[dict[str, Tensor]] = []
    with loss_mode(model) as reseed:  # training-mode proposal counts and sampling
        proposals, _ = rpn.filter_proposals(decoded, objectness, image_list.image_sizes, per_level)
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        regression = rpn.box_coder.encode(matched, anchors)
        objectness, deltas = objectness.view(n, -1), deltas.view(n, len(anchors[0]), 4)
        sampled = []
        for i, target in enumerate(targets):
            reseed()  # each image's sampling starts from the same seed, whatever came before it
            loss_objectness, loss_rpn_box_reg = rpn.compute_loss(objectness[i], deltas[i], [labels[i]], [regression[i]])
            per_image.append({"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg})
            sampled.append(roi_heads.select_training_samples([proposals[i]], [target]))
        rois = [s[0][0] for s in sampled]
        box_features = roi_heads.box_head(roi_heads.box_roi_pool(features, rois, image_list.image_sizes))
        class_logits, box_regression = roi_heads.box_predictor(box_features)
    rows = [len(r) for r in rois]
    for losses, (_, _, roi_labels, roi_regression), logits, boxes in zip(
        per_image, sampled, class_logits.split(rows), box_regression.split(rows), strict=True
    ):
        loss_classifier, loss_box_reg = fastrcnn_loss(logits, boxes, roi_labels, roi_regression)
        losses.update(loss_classifier=loss_classifier, loss_box_reg=loss_box_reg)
    names = ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")  # torchvision's order
    return {k: torch.stack([losses[k] for losses in per_image]).mean() for k in names}, proposals


def _eval_proposals_from_training(rpn: RegionProposalNetwork) -> int | None:
    """How many of the training-mode proposals are the eval-mode ones, or None. The two modes' proposal filtering
    differs only in its counts: with the same count before NMS, both keep the NMS survivors best first, so the
    eval proposals are the first ``post_nms_top_n`` (testing) of the training ones when that is no more (the demo
    configs: 300 before NMS, 150 / 100 after), and the NMS runs once."""
    pre, post = rpn._pre_nms_top_n, rpn._post_nms_top_n
    return post["testing"] if pre["training"] == pre["testing"] and post["training"] >= post["testing"] else None


def _fasterrcnn(model: GeneralizedRCNN, images, targets, with_loss: bool):
    image_list, targets, features, original_sizes = _features(model, images, targets if with_loss else None)
    losses: dict[str, Tensor] = {}
    with _full_precision(image_list.tensors.device):
        rpn_outputs = _rpn_outputs(model.rpn, image_list, features)
        shared = _eval_proposals_from_training(model.rpn) if with_loss else None
        if with_loss:
            losses, training_proposals = _rcnn_losses_per_image(model, image_list, features, rpn_outputs, targets)
        if shared is not None:
            proposals = [p[:shared] for p in training_proposals]
        else:
            objectness, _, _, decoded, per_level = rpn_outputs
            proposals, _ = model.rpn.filter_proposals(decoded, objectness, image_list.image_sizes, per_level)
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    return losses, model.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def _retinanet(model: RetinaNet, images, targets, with_loss: bool):
    image_list, targets, features, original_sizes = _features(model, images, targets if with_loss else None)
    features = list(features.values())
    with _full_precision(image_list.tensors.device):
        head_outputs = model.head(features)  # no train/eval difference that matters (GroupNorm or none)
        anchors = model.anchor_generator(image_list, features)
        losses: dict[str, Tensor] = {}
        if with_loss:
            with loss_mode(model):
                losses = model.compute_loss(targets, head_outputs, anchors)
        # The remainder mirrors RetinaNet.forward in eval mode: split outputs per pyramid level.
        per_level = [x.size(2) * x.size(3) for x in features]
        anchors_per_location = head_outputs["cls_logits"].size(1) // sum(per_level)
        per_level = [hw * anchors_per_location for hw in per_level]
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        detections = model.postprocess_detections(split_outputs, split_anchors, image_list.image_sizes)
    return losses, model.transform.postprocess(detections, image_list.image_sizes, original_sizes)


def training_losses(model: nn.Module, images: list[Tensor], targets: list[dict]) -> dict[str, Tensor]:
    """The loss dict of ``model(images, targets)`` in training mode, computed the same way (same modules, same
    order, same RNG draws) except that under bf16/fp16 autocast the anchors, box coding and losses are float32:
    torchvision builds anchors in the feature maps' dtype and decodes boxes in the heads' output dtype, which in
    bf16 rounds them to 4-8 px steps at COCO image sizes. RetinaNet's convolutional head (the larger part of its
    compute) still runs in half precision, its outputs are cast to float32; Faster R-CNN's RPN and box heads,
    small next to the backbone, run in float32 on float32 features, as for the detections here.

    Args:
        images: float ``[3, H, W]`` in 0..1, any sizes.
        targets: ``boxes`` FloatTensor[N, 4] XYXY absolute pixels (N may be 0), ``labels`` Int64Tensor[N].
    """
    _check_detector(model)
    retina = isinstance(model, RetinaNet)
    image_list, targets, features, _ = _features(model, images, targets, fixed_size=False, to_float=not retina)
    for i, t in enumerate(targets):  # torchvision's forward checks this too, after resizing
        bad = (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(dim=1)
        if bad.any():
            raise BadValueError(f"target {i} of the batch: box {t['boxes'][bad][0].tolist()} (after resizing) has no "
                             "positive width and height")
    if retina:
        levels = list(features.values())
        head_outputs = {k: v.float() for k, v in model.head(levels).items()}  # autocast's dtype inside
    with _full_precision(image_list.tensors.device):
        if retina:
            anchors = model.anchor_generator(image_list, [_float32_like(f) for f in levels])
            return model.compute_loss(targets, head_outputs, anchors)
        return _rcnn_losses(model, image_list, features, targets)


@torch.no_grad()
def losses_and_detections(
    model: nn.Module, images: list[Tensor], targets: list[dict] | None = None
) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """Loss components (empty without ``targets``) and eval-mode detections, from one backbone pass.

    Args:
        images: float ``[3, H, W]`` in 0..1, any sizes.
        targets: ``boxes`` FloatTensor[N, 4] XYXY absolute pixels, ``labels`` Int64Tensor[N].
    Returns:
        ``(losses, detections)``; detections per image: ``boxes [D, 4]`` XYXY in the input image's
        pixels, ``scores [D]``, ``labels [D]``.
    """
    _check_detector(model)
    with_loss = targets is not None
    if isinstance(model, RetinaNet):
        return _retinanet(model, images, targets, with_loss)
    return _fasterrcnn(model, images, targets, with_loss)
