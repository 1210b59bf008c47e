"""detectors.evaluation.files: malformed COCO ground-truth and results files are refused, naming the file."""

from __future__ import annotations

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
