"""Every YAML in configs/ parses against the real constructor signatures and instantiates."""

import json
from pathlib import Path

import pytest
import yaml

from train import LitvisionCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(p for p in CONFIGS.glob("*.yaml"))
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
       "--trainer.precision", "32-true"]  # fmt: skip


def test_there_are_configs():
    assert {p.name for p in ALL} >= {"faster_rcnn.yaml", "retinanet.yaml", "classifier.yaml", "coco.yaml", "voc.yaml"}


def _data_overrides(config: Path, shapes_dir: Path, tmp_path: Path) -> list[str]:
    text = config.read_text()
    if "ImageFolderDataModule" in text:
        root = shapes_dir / "classification"
        return ["--data.init_args.root", str(root / "train"), "--data.init_args.val_root", str(root / "val")]
    if "format: voc" in text:
        return ["--data.init_args.root", str(tmp_path)]  # VOC classes need no file until setup
    if "train2017" in text:  # a COCO tree with just the annotation file the model's classes come from
        (tmp_path / "annotations").mkdir()
        cats = [{"id": i, "name": f"c{i}"} for i in (1, 2, 5)]
        data = {"images": [], "annotations": [], "categories": cats}
        (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
        return ["--data.init_args.root", str(tmp_path)]
    return ["--data.init_args.root", str(shapes_dir), "--data.init_args.generate", "false"]


@pytest.mark.parametrize("config", ALL, ids=lambda p: p.name)
def test_config_instantiates(config, shapes_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ and data/ of the config land here
    args = ["--config", str(config), *CPU, *_data_overrides(config, shapes_dir, tmp_path)]
    if "weights: DEFAULT" in config.read_text():
        args += ["--model.init_args.weights", "null"]  # no COCO download here; the weights path is tested elsewhere
    cli = LitvisionCLI(args=args, run=False)
    assert cli.model.class_names == cli.datamodule.class_names
    assert cli.trainer.checkpoint_callback is not None
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"ModelCheckpoint", "LearningRateMonitor", "RichProgressBar"} <= names
    assert ("ReduceLROnPlateau" in names) == ("lr_plateau: null" not in config.read_text())


def test_unknown_keys_are_rejected_with_a_suggestion(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        LitvisionCLI(args=["--config", str(CONFIGS / "faster_rcnn.yaml"), "--model.init_args.lrr", "0.1"], run=False)
    assert "lrr" in capsys.readouterr().err


def test_disabled_plateau_stays_disabled_in_the_saved_config(shapes_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIGS / "coco.yaml"), *CPU, *_data_overrides(CONFIGS / "coco.yaml", shapes_dir, tmp_path),
            "--model.init_args.weights", "null", "--trainer.logger", "false"]  # fmt: skip
    cli = LitvisionCLI(args=args, run=False)
    assert cli.config["lr_plateau"] is None
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert "ReduceLROnPlateau" not in names and "LearningRateMonitor" not in names  # no logger: no LR monitor


def test_demo_detector_configs_differ_only_in_the_detector():
    # compare's verdict is only about two-stage vs one-stage if body, initialisation, image size, optimiser and
    # schedule are the same: a change of epochs or LR in one config must reach the other.
    frcnn, retina = (yaml.safe_load((CONFIGS / f"{n}.yaml").read_text()) for n in ("faster_rcnn", "retinanet"))
    a, b = frcnn["model"]["init_args"], retina["model"]["init_args"]
    shared = (a.keys() & b.keys()) - {"anchor_sizes", "aspect_ratios"}  # the rest of each is detector-only
    assert {"backbone", "backbone_checkpoint", "returned_layers", "fpn_channels", "min_size", "max_size", "lr",
            "optimizer", "trainable_backbone_layers", "backbone_lr_scale", "cosine_decay"} <= shared
    assert {k: a[k] for k in shared} == {k: b[k] for k in shared}
    for section in ("seed_everything", "data", "trainer", "checkpoint", "lr_plateau"):
        assert frcnn[section] == retina[section], section
