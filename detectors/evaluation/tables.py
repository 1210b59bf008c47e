"""The metrics as rich tables, the way ``python train.py evaluate`` prints them: the overall numbers with
pycocotools' own descriptions, and one row per class; -1 (undefined) shows as 'n/a'.
"""

from __future__ import annotations

from rich.table import Table

_DESCRIPTIONS = {
    "map": "AP  @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "map_50": "AP  @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "map_75": "AP  @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "map_small": "AP  @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "map_medium": "AP  @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "map_large": "AP  @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "mar_1": "AR  @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "mar_10": "AR  @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "mar_100": "AR  @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "mar_small": "AR  @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "mar_medium": "AR  @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "mar_large": "AR  @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "voc07_ap50": "Pascal VOC2007 11-point AP @ IoU=0.50",
    "voc10_ap50": "Pascal VOC2010+ all-point AP @ IoU=0.50",
    "mean_iou": "mean IoU of detections matched @ IoU=0.50",
}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or v < 0 else f"{v:.4f}"  # -1: undefined (no ground truth)


def format_metrics_table(metrics: dict[str, float], title: str = "Detection metrics") -> Table:
    """Overall metrics (the 12 COCO stats, VOC AP50, mean IoU) as a rich Table; 'n/a' for -1."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("meaning")
    table.add_column("value", justify="right")
    for key, text in _DESCRIPTIONS.items():
        if key in metrics:
            table.add_row(key, text, _fmt(metrics[key]))
    return table


def format_class_table(metrics: dict[str, float], title: str = "Per class") -> Table:
    """Per-class COCO AP, VOC AP50 (2007, 2010+) and mean matched IoU as a rich Table; 'n/a' for -1."""
    table = Table(title=title)
    for col in ("class", "AP", "VOC07 AP50", "VOC10 AP50", "mean IoU"):
        table.add_column(col, justify="left" if col == "class" else "right")
    names = [k[3:] for k in metrics if k.startswith("ap/")]
    for name in names:
        table.add_row(
            name, *(_fmt(metrics.get(f"{p}/{name}")) for p in ("ap", "voc07_ap50", "voc10_ap50", "iou"))
        )
    return table
