"""train.py itself: its help, the command table and each command's arguments (train.main in this process, as
the ``litvision`` console script calls it)."""

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COCO100 = Path(os.environ.get("LITVISION_COCO100", REPO.parent / "shared" / "data" / "coco-val2014-100"))


def test_help_lists_subcommands_and_extra_commands(train_py):
    code, out, _ = train_py("--help")
    assert code == 0
    usage = out.split("\n\n")[0]  # the usage line, however argparse wraps it
    assert usage.startswith("usage: train.py")
    (listed,) = re.findall(r"\{([a-z,]+)\}", usage)
    assert set(listed.split(",")) == {"fit", "validate", "test", "predict", "evaluate", "compare", "layers", "shapes",
                                      "demo", "export"}  # fmt: skip
    assert "usage: train.py [options] fit" in train_py("fit", "--help")[1]  # the subcommands' own usage unchanged
    # A typo'd key is an error, even a prefix of a real one (argparse would take it for max_steps).
    code, _, err = train_py("fit", "--config", REPO / "configs" / "faster_rcnn.yaml", "--trainer.max_step", "5",
                            "--print_config")  # fmt: skip
    assert code != 0 and "unrecognized arguments: --trainer.max_step" in err


@pytest.mark.parametrize(("command", "words"), [
    ("compare", ["--checkpoints", "required: a data config file", "--resamples", "--seed"]),
    ("evaluate", ["--gt", "--predictions", "--out"]),
    ("layers", ["--model.backbone", "--model.freeze"]),
    ("shapes", ["--out", "--num_train", "--voc"]),
    ("demo", ["--out", "--detectors_together"]),
    ("export", ["--ckpt_path", "--format", "optional: a data config file", "--overwrite"]),
])  # fmt: skip
def test_extra_commands_explain_their_arguments(command, words, train_py):
    code, out, _ = train_py(command, "--help")
    assert code == 0 and out.startswith(f"usage: train.py {command}")
    for word in words:
        assert word in out, word


@pytest.mark.parametrize(("args", "says"), [
    (["evaluate", "--gt", "{tmp}/missing.json", "--predictions", "{tmp}/p.json"], "{tmp}/missing.json: file not found"),
    (["evaluate", "--gt", "{tmp}/text.json", "--predictions", "{tmp}/p.json"], "{tmp}/text.json: malformed JSON"),
    (["evaluate", "--gt", "{tmp}/text.json"], "required: predictions"),
    (["shapes", "--out", "{tmp}/s", "--num_train", "-1"], "num_train must be an integer >= 4, got -1"),
    (["shapes", "--out", "{tmp}/text.json"], "{tmp}/text.json"),
    (["shapes", "--out", "{tmp}/text.json/inside"], "cannot create its folder {tmp}/text.json"),  # a file on the path
    (["layers", "--model.backbone", "resnet5"], "unknown backbone 'resnet5'"),
    (["layers", "--model.backbone", "resnet18", "--model.freeze", "999"], "freeze=999"),
    (["compare", "--checkpoints", "{tmp}/missing.ckpt", "--data", "{shapes}"], "{tmp}/missing.ckpt"),
    (["compare", "--checkpoints", "{tmp}/text.json", "--data", "{shapes}"], "{tmp}/text.json"),
    (["compare", "--checkpoints", "{tmp}/m.ckpt", "--data", "{tmp}/shapez.yaml"],
     "{tmp}/shapez.yaml: data config file not found"),
    (["compare", "--checkpoints", "{tmp}/m.ckpt", "--data", "{shapes}", "--resamples", "-1"], "need resamples >= 0"),
    (["export", "--ckpt_path", "{tmp}/missing.ckpt", "--out", "{tmp}/m.onnx"], "{tmp}/missing.ckpt: no such file"),
    (["export", "--ckpt_path", "{tmp}/text.json", "--out", "{tmp}/text.json"], "--out {tmp}/text.json already exists"),
    (["export", "--ckpt_path", "{tmp}/text.json", "--out", "{tmp}/s/m.onnx"], "folder {tmp}/s does not exist"),
])  # fmt: skip
def test_extra_commands_report_bad_arguments_and_missing_files_as_usage_errors(args, says, shapes_dir, tmp_path,
                                                                                train_py, monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # compare's default --out, comparison/, is relative
    (tmp_path / "text.json").write_text("not JSON")
    shapes = tmp_path / "data.yaml"  # the shapes data config, at the test's data
    shapes.write_text(f"class_path: detectors.data.DetectionDataModule\ninit_args:\n  root: {shapes_dir}\n"
                      "  generate: false\n  num_workers: 0\n")  # fmt: skip
    fill = {"tmp": tmp_path, "shapes": shapes}
    code, out, err = train_py(*(a.format(**fill) for a in args))
    assert code == 2 and "Traceback" not in out + err, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and says.format(**fill) in errors[0], err[-3000:]
    assert err.startswith(f"usage: train.py {args[0]}")
    assert not (tmp_path / "s").exists() and not (tmp_path / "comparison").exists()


def test_layers_and_shapes_commands(tmp_path, train_py):
    code, out, _ = train_py("layers", "--model.backbone", "mobilenet_v3_small", "--model.freeze", "3")
    assert code == 0 and "features.0.0" not in out and "0.0" in out and "freeze=N freezes indices 0..N-1" in out
    code, _, _ = train_py("shapes", "--out", tmp_path / "s", "--num_train", "4", "--num_val", "4", "--height", "160",
                          "--width", "160", "--voc", "false", "--classification", "false")  # fmt: skip
    assert code == 0 and (tmp_path / "s" / "annotations" / "instances_val.json").is_file()
    assert not (tmp_path / "s" / "voc").exists()


@pytest.mark.skipif(not COCO100.is_dir(), reason="shared COCO subset not available")
def test_evaluate_matches_pycocotools(tmp_path, train_py):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dt = COCO100 / "instances_val2014_100.json", COCO100 / "instances_val2014_fakebbox100_results.json"
    out = tmp_path / "metrics.json"
    code, stdout, _ = train_py("evaluate", "--gt", gt, "--predictions", dt, "--out", out)
    assert code == 0 and "map" in stdout
    metrics = json.loads(out.read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(dt)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
            "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]  # fmt: skip
    for key, expected in zip(keys, ev.stats, strict=True):
        assert metrics[key] == pytest.approx(expected, abs=1e-6), key
