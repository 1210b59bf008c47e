"""training.demo, `make demo`'s job: with tiny time budgets every stage runs and a re-run reuses what is done;
the detectors side by side (child processes: real), a failing one, a signal to the demo alone."""

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from training import demo

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_end_to_end_and_rerun(tmp_path, capsys, monkeypatch):
    import json
    import re

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    budgets = {"pretrain_minutes": 0.2, "detector_minutes": 0.2, "classifier_minutes": 0.2}
    demo.run_demo(str(out), **budgets)
    report = json.loads((out / "comparison" / "comparison.json").read_text())
    assert {m["detector"] for m in report["models"]} == {"two-stage", "one-stage"}
    for name in ("pretrain", "faster_rcnn", "retinanet", "classifier"):
        assert (out / "runs" / name / "checkpoints" / "last.ckpt").is_file()
    summary = capsys.readouterr().out
    for name, title in (("faster_rcnn", "Faster R-CNN"), ("retinanet", "RetinaNet")):  # exported, checked, timed
        onnx = out / "export" / f"{name}.onnx"
        assert onnx.is_file()
        assert re.search(rf"{title} ONNX +{re.escape(str(onnx))} \(batch 1: eager \d+ ms, onnxruntime \d+ ms\)", summary)
    assert summary.count("export check, onnxruntime (CPU) vs eager on 4 validation image(s)") == 2
    stamp = (out / "comparison" / "comparison.json").stat().st_mtime_ns
    exported = (out / "export" / "retinanet.onnx").stat().st_mtime_ns
    demo.run_demo(str(out), **budgets)
    again = capsys.readouterr().out
    assert "Epoch" not in again and "export check" not in again  # nothing retrained or exported again
    assert (out / "comparison" / "comparison.json").stat().st_mtime_ns == stamp  # report reused
    assert (out / "export" / "retinanet.onnx").stat().st_mtime_ns == exported


def test_a_demo_directory_of_another_dataset_is_refused_before_training(tmp_path, train_py):
    # A demo directory whose dataset has other parameters (an older default) is refused, saying what to do.
    code, _, _ = train_py("shapes", "--out", tmp_path / "demo" / "shapes", "--num_train", "4", "--num_val", "4",
                          "--height", "160", "--width", "160", "--voc", "false", "--classification", "false")  # fmt: skip
    assert code == 0
    with pytest.raises(SystemExit, match="delete .* or choose another --out"):
        demo.run_demo(str(tmp_path / "demo"))
    assert not (tmp_path / "demo" / "runs").exists()  # refused before any training


def tiny_detector_args(shapes_dir) -> list[str]:
    """Overrides of a demo detector config: the tests' tiny shapes set, 64 px, no pretrained backbone."""
    return ["--data.init_args.root", str(shapes_dir), "--data.init_args.generate", "false",
            "--data.init_args.num_workers", "0", "--model.init_args.backbone_checkpoint", "null",
            "--model.init_args.min_size", "64", "--model.init_args.max_size", "64"]  # fmt: skip


def test_last_lines_show_a_logged_tqdm_bar_as_a_terminal_would(tmp_path):
    log = tmp_path / "demo.log"
    log.write_bytes(b"Seed set to 0\nEpoch 0:  10%|#   | 25/250 [00:08<01:12]\rEpoch 0:  11%|#   | 26/250 [00:08<01:10]"
                    b"\n\x1b[AValidation DataLoader 0:  40%|####  | 6/15\r\x1b[A\r\n\n")  # fmt: skip
    assert demo.last_lines(str(log), 2) == ["Epoch 0:  11%|#   | 26/250 [00:08<01:10]",
                                            "Validation DataLoader 0:  40%|####  | 6/15"]  # fmt: skip
    log.write_bytes(b"")
    assert demo.last_lines(str(log), 1) == []


def test_detectors_side_by_side_a_failing_one_names_itself_and_the_other_is_kept(shapes_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    data = tiny_detector_args(shapes_dir)
    steps = {"faster_rcnn": [*data, "--model.init_args.backbone", "no_such_backbone"],
             "retinanet": [*data, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                           "--trainer.limit_val_batches", "1"]}  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        demo.fit_together(steps, str(runs), minutes=2, seed=0)
    log = runs / "faster_rcnn" / "demo.log"
    assert str(stop.value) == f"train.py demo: the 'faster_rcnn' step stopped (configs/faster_rcnn.yaml; its log: {log})"
    assert "no_such_backbone" in log.read_text() and "no_such_backbone" in capsys.readouterr().err  # log's end shown
    # The step that finished is kept for the re-run (its checkpoint, the finished mark); the failed one is not.
    assert (runs / "retinanet" / "demo-finished").is_file() and (runs / "retinanet" / "checkpoints" / "best.ckpt").is_file()
    assert not (runs / "faster_rcnn" / "demo-finished").exists()
    bar = (runs / "retinanet" / "demo.log").read_text()
    assert "Epoch 0: 100%" in bar and "| 1/2 [" in bar  # its tqdm bar went to the log, redrawn every step
    # A re-run starts only the unfinished step (the other's arguments are never built, so a bad one is not seen).
    steps["retinanet"] = ["--model.init_args.backbone", "also_not_a_backbone"]
    with pytest.raises(SystemExit) as again:
        demo.fit_together(steps, str(runs), minutes=2, seed=0)
    assert "'faster_rcnn' step" in str(again.value) and "retinanet" not in str(again.value)


def test_a_signal_to_the_demo_alone_stops_the_children_and_keeps_a_finished_one(shapes_dir, tmp_path):
    """`kill PID` reaches only the demo process: its children must not train on unsupervised, and a detector
    that had already finished keeps its mark (the re-run does not train it again)."""
    import signal
    import threading
    import time

    runs = tmp_path / "runs"
    data = [*tiny_detector_args(shapes_dir), "--trainer.limit_val_batches", "1"]
    steps = {"faster_rcnn": [*data, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"],
             "retinanet": [*data, "--trainer.max_epochs", "1000"]}  # runs until stopped  # fmt: skip

    handler = signal.getsignal(signal.SIGTERM)

    def child_states() -> dict[int, str]:
        """pid -> state of this process's children; "Z": exited, its status not yet collected by the demo.
        (A process that is exiting has no command line any more but is not yet "Z": ps cannot tell.)"""
        states = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == os.getpid():
                    states[int(stat.parent.name)] = fields[0]
        return states

    def is_retinanet(pid: int) -> bool:
        with contextlib.suppress(OSError):
            return b"retinanet.yaml" in Path(f"/proc/{pid}/cmdline").read_bytes()
        return False

    others = set(child_states())  # children of earlier tests (e.g. multiprocessing's helpers) are not the demo's

    def signal_when_the_short_one_is_done():
        log = runs / "faster_rcnn" / "demo.log"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "max_epochs=1` reached" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.2)
        while time.monotonic() < deadline:  # its process exits after the message: wait until it has
            states = {pid: state for pid, state in child_states().items() if pid not in others}
            if all(state == "Z" for pid, state in states.items() if not is_retinanet(pid)):
                break
            time.sleep(0.2)
        if signal.getsignal(signal.SIGTERM) is not handler:  # never SIGTERM pytest itself once the demo returned
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_the_short_one_is_done, daemon=True).start()
    with pytest.raises(SystemExit) as stop:  # retinanet's 5-minute cap ends the test if the signal never comes
        demo.fit_together(steps, str(runs), minutes=5, seed=0)
    assert stop.value.code == 128 + signal.SIGTERM
    assert (runs / "faster_rcnn" / "demo-finished").is_file() and not (runs / "retinanet" / "demo-finished").exists()
    ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(runs) not in ps  # no child left training
    assert signal.getsignal(signal.SIGTERM) is handler  # the demo's own handler is gone again


def test_side_by_side_only_where_it_was_measured_to_help(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for threads, expected in ((1, False), (2, True), (16, True)):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        assert demo.side_by_side_helps(2) is expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for gpus, expected in ((1, False), (2, True)):  # one GPU shared by two runs: not measured, one at a time
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        assert demo.side_by_side_helps(2) is expected
