"""A CSV logger that survives resuming.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its version directory already exists, so a run
resumed with ``--ckpt_path last`` (which keeps its logger version) would lose the rows of the epochs
before the interruption. This one appends to the file instead, keeping its columns. The steps between
the checkpoint and the interruption run again after the resume; their old rows are dropped when the
resumed run first writes (every row at or after its first logged step), as TensorBoard's ``purge_step``
does, so each step appears once. (Lightning always logs with a step; a ``log_metrics`` call without one
right after a resume would count as step 0 and drop every earlier row.)
"""

from __future__ import annotations

import csv
import io

from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from training.checkpoint_io import atomic_write_bytes


class _AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing ``metrics.csv`` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        # Lightning's version warns and deletes metrics.csv. This one keeps it and reads its header: Lightning's
        # save() appends under those columns (rewriting the header when new metrics appear).
        self._resumed = self._fs.isfile(self.metrics_file_path)
        if self._resumed:
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])

    def save(self) -> None:
        # The first write after resuming starts at the first step run again: the rows the interrupted run
        # logged from that step on are dropped, so that each step appears once.
        if self._resumed and self.metrics:
            self._drop_rows_from(min(int(m["step"]) for m in self.metrics))
            self._resumed = False
        super().save()

    def _drop_rows_from(self, step: int) -> None:
        """Rewrite ``metrics.csv`` without its rows at or after ``step``."""
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(kept) == len(rows):
            return
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(kept)
        if isinstance(self._fs, LocalFileSystem):
            atomic_write_bytes(self.metrics_file_path, text.getvalue().encode())  # never a half-written log
        else:  # remote (fsspec) storage: objects are replaced whole on close
            with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                f.write(text.getvalue())


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` keeps the rows already written to the same version (those of
    steps the resumed run logs again excepted)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
