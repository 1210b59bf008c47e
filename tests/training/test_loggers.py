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


def test_rows_of_steps_logged_again_after_a_resume_appear_once(tmp_path):
    # The interrupted run logged steps 9, 19 (and an epoch row at 19), 29; its checkpoint was at step 20, so
    # the resumed run logs 29 again, then 39: rows from step 29 on are the old run's and go.
    first = ResumableCSVLogger(tmp_path, name="run", version=0)
    for step, metrics in ((9, {"loss": 9.0}), (19, {"loss": 19.0}), (19, {"val": 1.0}), (29, {"loss": 29.0})):
        first.log_metrics(metrics, step=step)
    first.save()
    second = ResumableCSVLogger(tmp_path, name="run", version=0)
    second.log_metrics({"loss": 290.0}, step=29)
    second.log_metrics({"loss": 390.0}, step=39)
    second.save()
    rows = _rows(tmp_path / "run" / "version_0" / "metrics.csv")
    assert [(r["step"], r["loss"], r["val"]) for r in rows] == [
        ("9", "9.0", ""), ("19", "19.0", ""), ("19", "", "1.0"), ("29", "290.0", ""), ("39", "390.0", "")]
    second.log_metrics({"loss": 20.0}, step=20)  # later saves of the same run only append
    second.save()
    assert [r["step"] for r in _rows(tmp_path / "run" / "version_0" / "metrics.csv")] == [
        "9", "19", "19", "29", "39", "20"]


def test_lightning_csv_logger_would_lose_them(tmp_path):
    """Why the subclass exists: the same sequence with Lightning's logger drops the first row."""
    first = CSVLogger(tmp_path, name="run", version=0)
    first.log_metrics({"a": 1.0}, step=0)
    first.save()
    second = CSVLogger(tmp_path, name="run", version=0)
    second.log_metrics({"a": 2.0}, step=1)
    second.save()
    assert [r["step"] for r in _rows(tmp_path / "run" / "version_0" / "metrics.csv")] == ["1"]
