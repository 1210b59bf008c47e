"""detectors.evaluation.tables: values and 'n/a' in the rich tables."""

from __future__ import annotations

import math

from rich.console import Console

from detectors.evaluation import COCO_KEYS, format_class_table, format_metrics_table


def test_tables_show_values_and_na():
    metrics = {k: 0.5 for k in COCO_KEYS} | {
        "map_small": -1.0,
        "voc07_ap50": 0.25,
        "voc10_ap50": 0.3,
        "mean_iou": 0.7,
    }
    metrics |= {"ap/cat": 0.125, "ap/dog": -1.0, "voc07_ap50/cat": 0.2, "voc10_ap50/cat": 0.3, "iou/cat": 0.9}
    console = Console(record=True, width=150)
    console.print(format_metrics_table(metrics))
    console.print(format_class_table(metrics))
    text = console.export_text()
    assert "IoU=0.50:0.95 | area= small" in text and "n/a" in text and "0.2500" in text
    cat_row = next(line for line in text.splitlines() if " cat " in line)
    assert all(v in cat_row for v in ("0.1250", "0.2000", "0.3000", "0.9000"))
    dog_row = next(line for line in text.splitlines() if " dog " in line)
    assert dog_row.count("n/a") == 4 and not math.isnan(metrics["ap/dog"])
