import csv

from lightning.pytorch.loggers import CSVLogger

from training.loggers import ResumableCSVLogger


def _rows(path):
    return list(csv.DictReader(path.open()))


def test_resumed_version_keeps_earlier_rows(tmp_path):
    first = ResumableCSVLogger(tmp_path, name="run", version=0)
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    second = ResumableCSVLogger(tmp_path, name="run", version=0)  # what a resumed run creates
    second.log_metrics({"a": 2.0, "b": 3.0}, step=1)
    second.save()
    rows = _rows(tmp_path / "run" / "version_0" / "metrics.csv")
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [("0", "1.0", ""), ("1", "2.0", "3.0")]


def test_lightning_csv_logger_would_lose_them(tmp_path):
    """Why the subclass exists: the same sequence with Lightning's logger drops the first row."""
    first = CSVLogger(tmp_path, name="run", version=0)
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    second = CSVLogger(tmp_path, name="run", version=0)
    second.log_metrics({"a": 2.0}, step=1)
    second.save()
    assert [r["step"] for r in _rows(tmp_path / "run" / "version_0" / "metrics.csv")] == ["1"]
