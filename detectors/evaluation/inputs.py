"""The check every evaluator runs first on its per-image dicts (their contract: ``detectors.evaluation``'s
docstring), and the two box formats they may come in.

Checking once, here, lets each evaluator read the dicts without guarding every key itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from training.errors import BadValueError

BoxFormat = Literal["xyxy", "xywh"]


def as_cpu(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` detached on the CPU, converted to ``dtype`` when given."""
    x = x.detach().cpu()
    return x if dtype is None else x.to(dtype)


def concat_field(dicts: Sequence[dict], key: str, dtype: torch.dtype, default: float = 0) -> np.ndarray:
    """Every dict's ``key`` concatenated on the CPU as one [N] array of ``dtype``; ``default`` for each box of
    a dict without it (dicts checked by :func:`check_inputs`)."""
    parts = [
        as_cpu(d[key], dtype).reshape(-1) if key in d else torch.full((len(d["labels"]),), default, dtype=dtype)
        for d in dicts
    ]
    return torch.cat(parts).numpy() if parts else torch.zeros(0, dtype=dtype).numpy()


def check_inputs(preds: Sequence[dict], targets: Sequence[dict], num_classes: int) -> None:
    """One prediction and one target dict per image, each with the keys and labels the evaluators read."""
    if len(preds) != len(targets):
        raise BadValueError(f"got {len(preds)} prediction dicts but {len(targets)} target dicts")
    for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
        _check_image_dict(p, ("boxes", "scores", "labels"), f"prediction {i}")
        _check_image_dict(t, ("boxes", "labels"), f"target {i}")
    # The label range once for the batch: checked per image, a GPU run would read values back 4x per image.
    by_device: dict[torch.device, list[Tensor]] = {}
    for d in (*preds, *targets):
        if len(d["labels"]):
            by_device.setdefault(d["labels"].device, []).append(d["labels"].reshape(-1))
    if any(_outside(torch.cat(labels), num_classes) for labels in by_device.values()):
        for i, (p, t) in enumerate(zip(preds, targets, strict=True)):
            for where, d in ((f"prediction {i}", p), (f"target {i}", t)):
                if len(d["labels"]) and _outside(d["labels"], num_classes):
                    raise BadValueError(
                        f"{where}: labels must lie in 1..{num_classes} (class_names), got "
                        f"{d['labels'].tolist()}"
                    )


def _outside(labels: Tensor, num_classes: int) -> bool:
    return int(labels.min()) < 1 or int(labels.max()) > num_classes


def _check_image_dict(d: dict, required: tuple[str, ...], where: str) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise BadValueError(f"{where}: missing keys {missing}")
    n = len(d["labels"])
    if d["boxes"].shape not in ((n, 4), (0,)) or (d["boxes"].shape == (0,) and n):
        raise BadValueError(
            f"{where}: {n} labels but boxes of shape {tuple(d['boxes'].shape)}, expected [{n}, 4]"
        )
    for key in ("scores", "iscrowd", "area", "difficult"):
        if key in d and len(d[key]) != n:
            raise BadValueError(f"{where}: {n} labels but {len(d[key])} {key}")
