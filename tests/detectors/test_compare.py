"""detectors.compare: loading and checking the checkpoints, and the ``train.py compare`` command end to end on
tiny detectors."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from detectors.compare import _model_names, autocast, load_detectors
from detectors.module import FasterRCNNModule, RetinaNetModule
from training.errors import BadValueError
from training.saving import save_model

CLASSES = ["rectangle", "ellipse", "triangle"]


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def tiny_setup(shapes_dir, tmp_path_factory):
    """Two tiny detectors of the shapes classes, one of other classes, a data config for shapes_dir."""
    root = tmp_path_factory.mktemp("compare")
    small = dict(backbone="resnet18_fpn", min_size=64, max_size=64)
    torch.manual_seed(0)
    models = {
        "frcnn": FasterRCNNModule(class_names=CLASSES, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30,
                                  **small),  # fmt: skip
        "retina": RetinaNetModule(class_names=CLASSES, **small),
        "other": RetinaNetModule(class_names=["cat", "dog"], **small),
    }
    paths = {}
    for name, model in models.items():
        paths[name] = str(root / f"{name}.ckpt")
        save_model(model, paths[name])
    data = root / "data.yaml"
    data.write_text(
        "class_path: detectors.data.DetectionDataModule\n"
        f"init_args:\n  root: {shapes_dir}\n  batch_size: 2\n  num_workers: 0\n  generate: false\n"
    )
    params = {n: sum(p.numel() for p in m.model.parameters()) for n, m in models.items()}
    return {"root": root, "paths": paths, "data": str(data), "params": params, "shapes": shapes_dir}


def test_compare_command_writes_the_report(tiny_setup, capsys, one_thread):
    import train

    s, out = tiny_setup, tiny_setup["root"] / "report"
    out.mkdir()
    (out / "notes.md").write_text("mine")  # an existing folder is fine: only the report's files are written
    train.main(["compare", "--checkpoints", s["paths"]["frcnn"], s["paths"]["retina"], "--data", s["data"],
                "--out", str(out), "--device", "cpu", "--resamples", "8", "--seed", "3", "--warmup", "1",
                "--repeats", "2", "--batch_size", "2", "--confusion_score", "0.05",
                "--confusion_iou", "0.4"])  # fmt: skip
    stdout = capsys.readouterr().out

    metrics = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100", "voc07_ap50",
               "voc10_ap50"]  # fmt: skip
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["frcnn", "retina"]
    for col in ("detector", "backbone", "params", "min_size", "max_size", "latency_ms", "throughput_ips",
                "device", "precision", *metrics, *(f"ap/{c}" for c in CLASSES), "errors/wrong_class",
                "errors/background_fp", "errors/missed"):  # fmt: skip
        assert col in rows[0], col
    assert [r["detector"] for r in rows] == ["two-stage", "one-stage"]
    assert [int(r["params"]) for r in rows] == [s["params"]["frcnn"], s["params"]["retina"]]
    assert all(r["min_size"] == r["max_size"] == "64" and r["device"].startswith("cpu") for r in rows)
    assert all(float(r["latency_ms"]) > 0 and float(r["throughput_ips"]) > 0 for r in rows)
    assert all(-1 <= float(r[k]) <= 1 for r in rows for k in metrics)

    report = json.loads((out / "comparison.json").read_text())
    settings = report["settings"]
    assert settings["bootstrap_resamples"] == 8 and settings["bootstrap_seed"] == 3
    assert settings["images"] == 4 and settings["precision"] == "32" and settings["batch_size"] == 2
    (pair,) = report["pairs"]
    assert (pair["a"], pair["b"]) == ("frcnn", "retina")
    assert pair["difference"] == pytest.approx(pair["map_a"] - pair["map_b"])
    assert pair["ci_low"] <= pair["ci_high"]
    for model in report["models"]:
        curve = list(model["ap_per_iou"].values())
        assert list(model["ap_per_iou"]) == [f"{t:.2f}" for t in np.linspace(0.5, 0.95, 10)]
        assert np.mean(curve) == pytest.approx(model["map"], abs=1e-6)  # mAP is the mean of the AP-IoU curve

    md = (out / "comparison.md").read_text()
    for text in ("| model |", "| mAP |", "VOC07 AP50", "VOC2010 AP50", "95% CI", "8 resamples",
                 "default_rng(3)", "frcnn 64/64"):  # fmt: skip
        assert text in md, text
    assert "95% CI" in stdout and "frcnn" in stdout
    assert (out / "notes.md").read_text() == "mine"
    check_confusion_files(out, report, md, stdout, s["shapes"])
    for name in ("pr_curves.png", "ap_vs_iou.png", "per_class_ap.png", "speed_accuracy.png",
                 "confusion_frcnn.png", "confusion_retina.png"):  # fmt: skip
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300


def check_confusion_files(out, report, md, stdout, shapes):
    """Each model's confusion CSV holds the counts of comparison.json, whose objects are the val objects of
    each class (read from the COCO file); the report's reading is computed from those counts."""
    coco = json.loads((shapes / "annotations" / "instances_val.json").read_text())
    ids = [c["id"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    objects = [sum(a["category_id"] == i for a in coco["annotations"]) for i in ids]
    assert sum(objects) > 0
    for model in report["models"]:
        name, confusion = model["model"], model["confusion"]
        with open(out / f"confusion_{name}.csv", newline="") as f:
            header, *rows = list(csv.reader(f))
        assert header == ["predicted \\ true", *CLASSES, "background"]
        counts = np.array([[int(v) for v in r[1:]] for r in rows])
        assert counts.tolist() == confusion["matrix"]
        assert (confusion["iou_threshold"], confusion["score_threshold"]) == (0.4, 0.05)
        assert confusion["objects"] == objects and counts[3, 3] == 0
        assert (np.diag(counts)[:3] + counts[3, :3] <= objects).all()  # found right or missed: at most once
        correct, fp, missed = np.trace(counts[:3, :3]), counts[:3, 3].sum(), counts[3].sum()
        wrong = counts[:3, :3].sum() - correct
        errors = wrong + fp + missed
        for text in (f"{name}: of its {errors} errors, {wrong / errors:.0%} wrong class",
                     f"{fp / errors:.0%} background false positives", f"{missed / errors:.0%} missed objects",
                     f"{correct} of {sum(objects)} objects found with the right class",
                     f"[counts](confusion_{name}.csv)"):  # fmt: skip
            assert text in md, text
        assert f"{name}: of its {errors} errors" in stdout
    assert "## Confusion at IoU >= 0.4, score >= 0.05" in md and "- confusion: IoU >= 0.4, score >= 0.05;" in md


def test_compare_refuses_bad_confusion_thresholds(tiny_setup, train_py):
    s = tiny_setup
    code, _, err = train_py("compare", "--checkpoints", s["paths"]["frcnn"], "--data", s["data"], "--out",
                            s["root"] / "bad", "--device", "cpu", "--confusion_score", "1.5")  # fmt: skip
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and "--confusion_score" in line and "1.5" in line and "Traceback" not in err
    assert not (s["root"] / "bad").exists()


def test_compare_refuses_an_output_path_before_any_work(tiny_setup, tmp_path, train_py):
    taken = tmp_path / "report.md"
    taken.write_text("mine")
    missing = tmp_path / "no_such.ckpt"  # loading it would fail: the output path must be refused first
    for out, words in ((taken, "is a file"), (taken / "report", f"cannot be created, {taken} is not a folder")):
        code, _, err = train_py("compare", "--checkpoints", missing, "--data", tiny_setup["data"], "--out", out,
                                "--device", "cpu")  # fmt: skip
        (line,) = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and f"{out}" in line and words in line and "no_such" not in line
    assert taken.read_text() == "mine"


def test_compare_refuses_models_with_different_classes(tiny_setup, train_py):
    s = tiny_setup
    code, _, err = train_py("compare", "--checkpoints", s["paths"]["frcnn"], s["paths"]["other"], "--data", s["data"],
                            "--out", s["root"] / "refused", "--device", "cpu")  # fmt: skip
    (message,) = [line for line in err.splitlines() if "error:" in line]  # one line, no traceback
    assert code == 2 and "Traceback" not in err
    assert s["paths"]["other"] in message and s["paths"]["frcnn"] in message
    assert str(CLASSES) in message and "['cat', 'dog']" in message
    assert not (s["root"] / "refused").exists()


def test_models_must_match_the_data_classes(tiny_setup):
    with pytest.raises(BadValueError, match=r"\['cat', 'dog'\].*\['a', 'b', 'c'\]"):
        load_detectors([tiny_setup["paths"]["other"]], ["a", "b", "c"], "my data")


def test_model_names_tell_checkpoints_apart():
    runs = ["runs/faster_rcnn/checkpoints/best.ckpt", "runs/retinanet/checkpoints/best.ckpt"]
    assert _model_names(runs) == ["faster_rcnn", "retinanet"]
    assert _model_names(["a/best.ckpt", "b/last.ckpt"]) == ["best", "last"]
    assert _model_names(["x/best.ckpt", "x/best.ckpt"]) == ["best#1", "best#2"]


def test_half_precision_needs_cuda():
    with pytest.raises(BadValueError, match="needs a CUDA device"):
        autocast(torch.device("cpu"), "16")
