"""detectors.evaluation.files: malformed COCO ground-truth and results files are refused, naming the file."""

from __future__ import annotations

import json
import re

import pytest

from detectors.evaluation import evaluate


@pytest.mark.parametrize(
    ("gt_text", "dt_text", "bad", "message"),
    [
        ("{not json", "[]", "gt", "malformed JSON"),
        ('{"images": [], "categories": []}', "[]", "gt", "'annotations'"),
        ('{"images": [{"id": 1}], "categories": [{"id": 1}], "annotations": []}', "[]", "gt", "'name'"),
        ('{"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": '
         '[{"image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]}', "[]", "gt", "image_id 2"),
        (None, '{"annotations": []}', "dt", "JSON list"),
        (None, '[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}]', "dt", "'bbox'"),
        (None, '[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}]', "dt", "'score'"),
        (None, '[{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]', "dt", "[9]"),
        (None, '[{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1}]', "dt", "category_id 5"),
    ],
)  # fmt: skip
def test_bad_files_raise_value_error_naming_the_file(tmp_path, gt_text, dt_text, bad, message):
    gt_text = gt_text or '{"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": []}'
    (tmp_path / "gt.json").write_text(gt_text)
    (tmp_path / "dt.json").write_text(dt_text)
    with pytest.raises(ValueError, match=message) as info:
        evaluate(tmp_path / "gt.json", tmp_path / "dt.json")
    assert str(tmp_path / f"{bad}.json") in str(info.value)


GOOD_DET = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}
GOOD_ANN = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"image_id": True}, "'image_id' must be int, got True"),
        ({"score": float("nan")}, "'score' must be num, got nan"),
        ({"score": "0.5"}, "'score' must be num"),
        ({"bbox": [0, 0, 1, None]}, "'bbox' must be four numbers"),
        ({"bbox": [0, 0, 1]}, "'bbox' must be four numbers"),
        ({"category_id": 7}, "category_id 7 is not a category"),
        ({"image_id": 2**70}, "image id(s) not in the ground truth"),
        ("not an object", "expected an object"),
    ],
)  # fmt: skip
def test_results_file_columns_name_the_first_bad_entry(tmp_path, bad, says):
    """Entries 3 and 5 of 8 are bad: the column check finds them and the error names entry 3, as a check of
    entry after entry would (unknown image ids are all listed)."""
    dets = [dict(GOOD_DET) for _ in range(8)]
    for i in (3, 5):
        dets[i] = bad if isinstance(bad, str) else {**GOOD_DET, **bad}
    (tmp_path / "gt.json").write_text(
        json.dumps({"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": []})
    )
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    with pytest.raises(ValueError) as info:
        evaluate(tmp_path / "gt.json", tmp_path / "dt.json")
    message = str(info.value)
    assert says in message and str(tmp_path / "dt.json") in message
    assert "image id(s)" in says or "[3]" in message


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"iscrowd": 2}, "'iscrowd' must be 0 or 1, got 2"),
        ({"iscrowd": [1]}, "'iscrowd' must be 0 or 1"),
        ({"area": "big"}, "'area' must be num"),
        ({"image_id": 3}, "image_id 3 is not in 'images'"),
        ({"bbox": [0, 0, 1, float("inf")]}, "'bbox' must be four numbers"),
    ],
)  # fmt: skip
def test_ground_truth_columns_name_the_first_bad_annotation(tmp_path, bad, says):
    anns = [dict(GOOD_ANN, id=i + 1) for i in range(6)]
    anns[4] = {**anns[4], **bad}
    gt = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "a"}], "annotations": anns}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text("[]")
    with pytest.raises(ValueError, match=re.escape(says)) as info:
        evaluate(tmp_path / "gt.json", tmp_path / "dt.json")
    assert "annotations[4]" in str(info.value)
