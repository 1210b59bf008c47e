"""`make demo`'s job, with tiny time budgets: every stage runs, and a re-run reuses what is done."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end_and_rerun(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "train.py"), "demo", "--out", str(out),
           "--pretrain_minutes", "0.2", "--detector_minutes", "0.2", "--classifier_minutes", "0.2"]  # fmt: skip
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "comparison" / "comparison.json").read_text())
    assert {m["detector"] for m in report["models"]} == {"two-stage", "one-stage"}
    for name in ("pretrain", "faster_rcnn", "retinanet", "classifier"):
        assert (out / "runs" / name / "checkpoints" / "last.ckpt").is_file()
    stamp = (out / "comparison" / "comparison.json").stat().st_mtime_ns
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Epoch" not in second.stdout  # nothing retrained
    assert (out / "comparison" / "comparison.json").stat().st_mtime_ns == stamp  # report reused
