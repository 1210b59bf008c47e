"""detectors.evaluation.resample: one matching re-accumulated per resample equals pycocotools from scratch."""

from __future__ import annotations

import numpy as np
import pytest

from detectors import evaluation as ev

from .helpers import load_dicts, pycocotools_eval, resample_coco, synthetic


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_resampled_map_equals_pycocotools_run_on_the_resample(tmp_path, seed):
    """One matching re-accumulated per resample == pycocotools from scratch on the materialised resample
    (repeats, images without ground truth, crowd, > 100 detections, a class only in predictions, ties)."""
    gt, dets = synthetic(seed, n_images=10)
    gt_data, preds = load_dicts(tmp_path, gt, dets, box_format="xywh")
    resampler = ev.ResampledCocoMap(preds, gt_data.targets, gt_data.class_names, box_format="xywh")
    first_empty = [i for i, t in enumerate(gt_data.targets) if len(t["labels"]) == 0][:1] * 2
    resamples = [[4, 4, 1, 7, 7, 7, 0, 9, 3, 2], list(range(10)), first_empty,
                 *np.random.default_rng(seed).integers(0, 10, size=(3, 10))]  # fmt: skip
    for idx in resamples:
        stats, _, _ = pycocotools_eval(*resample_coco(gt, dets, gt_data.image_ids, idx))
        assert resampler.map(idx) == pytest.approx(stats[0], rel=0, abs=1e-12), list(idx)
    assert resampler.map(first_empty) == -1  # no ground truth at all in that resample
    with pytest.raises(IndexError, match=r"\[0, 10\)"):
        resampler.map([0, 10])
