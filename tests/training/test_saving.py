"""save_model / load_model round trips, the model class a file names, clear errors on non-litvision files.

The file-level guarantees (safe reads, atomic writes, truncated files) are tested in test_checkpoint_io.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule

from tests.training.tiny_lightning import ScriptedModule, TinyRegressor, assert_same, quiet_trainer
from training.callbacks import ModelCheckpoint
from training.checkpoint_io import CheckpointFileError, load_checkpoint_file
from training.saving import OFFLINE_HPARAM_KEYS, load_model, offline_model_config, save_model

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------------------- model factories
# Every model class of the project goes through the same round trip. A factory returns (module, example
# input of its forward). Modules whose package is not importable are skipped, not silently dropped.


def _scripted(tmp_path: Path):
    return ScriptedModule(script=[1.0], lr=0.2), torch.randn(3, 2)


def _regressor(tmp_path: Path):
    return TinyRegressor(hidden=8, dropout=0.2), torch.randn(5, 4)


def _pretrained_frozen_regressor(tmp_path: Path):
    # "Pretrained" weights read from a local file by the constructor, then the file disappears:
    # load_model must rebuild without it (the saved state dict replaces those weights).
    pretrained = tmp_path / "pretrained.pt"
    torch.save(TinyRegressor(hidden=8).net.state_dict(), pretrained)
    module = TinyRegressor(hidden=8, weights_path=str(pretrained), freeze_first=True)
    pretrained.unlink()
    return module, torch.randn(5, 4)


def _cli_built_regressor(tmp_path: Path):
    # As train.py builds modules: LightningCLI stores its config (+ an "_instantiator") as hparams.
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(
        TinyRegressor,
        run=False,
        args=["--model.hidden=8", "--model.dropout=0.1", f"--trainer.default_root_dir={tmp_path}"],
        save_config_callback=None,
        seed_everything_default=False,
    )
    assert cli.model.hparams["_instantiator"] == "lightning.pytorch.cli.instantiate_module"
    return cli.model, torch.randn(5, 4)


def _project_model(module_name: str, class_name: str, kwargs: dict, example, pretrained: bool = False):
    """A project model class; ``pretrained``: built from a local full-model weights file (``weights_path``,
    deleted before loading), which is how a fine-tuned model starts -- its frozen layers and frozen
    BatchNorm must come back although load_model rebuilds without that file."""

    def factory(tmp_path: Path):
        cls = getattr(importlib.import_module(module_name), class_name)
        if not pretrained:
            return cls(**kwargs), example()
        weights = tmp_path / "pretrained.pt"
        torch.save(cls(**kwargs).model.state_dict(), weights)
        module = cls(weights_path=str(weights), **kwargs)
        weights.unlink()
        return module, example()

    try:
        present = importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        present = False
    marks = [] if present else [pytest.mark.skip(reason=f"{module_name} is not part of the project yet")]
    return pytest.param(factory, id=class_name + ("-pretrained" if pretrained else ""), marks=marks)


def _images():
    return [torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))]


_DETECTOR = {"num_classes": 3, "backbone": "resnet18_fpn", "min_size": 64, "max_size": 96}
FACTORIES = [
    pytest.param(_scripted, id="ScriptedModule"),
    pytest.param(_regressor, id="TinyRegressor"),
    pytest.param(_pretrained_frozen_regressor, id="TinyRegressor-pretrained-frozen"),
    pytest.param(_cli_built_regressor, id="TinyRegressor-LightningCLI"),
    _project_model("detectors.module", "FasterRCNNModule", _DETECTOR, _images),
    # The non-default structure must come back from the saved hyperparameters (no P6/P7 modules).
    _project_model("detectors.module", "RetinaNetModule", {**_DETECTOR, "p6p7": False, "group_norm_head": True},
                   _images),
    _project_model("detectors.module", "FasterRCNNModule", _DETECTOR, _images, pretrained=True),
    _project_model(
        "classifiers.module",
        "FrozenBackboneClassifier",
        {"backbone": "resnet18", "num_classes": 3, "weights": None, "freeze": "all"},
        lambda: torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
    ),
]


def perturb(module: LightningModule) -> None:
    """Move every float weight/buffer away from its initial value, so a rebuild cannot pass by chance."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn(tensor.shape, generator=g))


def outputs(module: LightningModule, example):
    module.eval()
    with torch.no_grad():
        return module(example)


@pytest.mark.parametrize("factory", FACTORIES)
def test_round_trip_every_model_class(factory, tmp_path):
    module, example = factory(tmp_path)
    perturb(module)
    path = tmp_path / "model.ckpt"
    save_model(module, path)

    loaded = load_model(path)
    assert type(loaded) is type(module)
    # rebuilt from the saved hyperparameters as offline_hparams adjusts them (weight sources nulled)
    expected = {k: v for k, v in type(module).offline_hparams(dict(module.hparams)).items()}
    for key in ("_instantiator", "_class_path"):  # LightningCLI bookkeeping, not constructor arguments
        expected.pop(key, None)
    assert all(expected.get(k) is None for k in OFFLINE_HPARAM_KEYS)
    assert_same({k: loaded.hparams[k] for k in expected}, expected)
    assert_same(loaded.state_dict(), module.state_dict())
    # freezing is re-applied by the constructor
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {
        n: p.requires_grad for n, p in module.named_parameters()
    }
    assert_same(outputs(loaded, example), outputs(module, example))


def test_module_save_method_and_weights_only(tmp_path):
    module = TinyRegressor(hidden=8)
    perturb(module)
    module.save(tmp_path / "m.ckpt")
    checkpoint = load_checkpoint_file(tmp_path / "m.ckpt")
    assert checkpoint["litvision"] == {
        "class_path": "tests.training.tiny_lightning.TinyRegressor",
        "format": 1,
    }
    assert checkpoint["hyper_parameters"]["hidden"] == 8
    assert_same(load_model(tmp_path / "m.ckpt").state_dict(), module.state_dict())


def test_load_model_reads_the_callbacks_checkpoints(tmp_path):
    module = ScriptedModule(script=[0.5, 0.4])
    cb = ModelCheckpoint(str(tmp_path / "w{epoch}.ckpt"), save_weights_only=True)
    trainer = quiet_trainer(tmp_path, 2, [cb])
    trainer.fit(module)
    for name in ("w2.ckpt", "last.ckpt"):
        loaded = load_model(tmp_path / name)
        assert type(loaded) is ScriptedModule and loaded.hparams.script == [0.5, 0.4]
        assert_same(loaded.state_dict(), module.state_dict())
    assert "optimizer_states" not in load_checkpoint_file(tmp_path / "w2.ckpt")

    # attached to a trainer, save_model writes a full (resumable) checkpoint unless weights_only
    save_model(module, tmp_path / "full.ckpt")
    save_model(module, tmp_path / "weights.ckpt", weights_only=True)
    assert "optimizer_states" in load_checkpoint_file(tmp_path / "full.ckpt")
    assert "optimizer_states" not in load_checkpoint_file(tmp_path / "weights.ckpt")
    assert_same(load_model(tmp_path / "full.ckpt").state_dict(), module.state_dict())


def test_non_plain_hyperparameters_are_refused_at_save(tmp_path):
    module = ScriptedModule(script=[1.0], monitor=Path("val_loss"))  # a Path is not plain data
    with pytest.raises(TypeError, match=r"hyper_parameters\['monitor'\] = PosixPath"):
        save_model(module, tmp_path / "m.ckpt")
    assert not (tmp_path / "m.ckpt").exists()


# ----------------------------------------------------------------------------------------- model classes in files


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        ("collections.OrderedDict", "is not in litvision's packages"),
        ("os.system", "is not in litvision's packages"),
        ("no_such_package_xyz.Model", "is not in litvision's packages"),
        ("training.no_such_module_xyz.Model", "cannot be imported"),
        ("training.saving.save_model", "is not a LightningModule subclass; refused"),
        # litvision's module re-exports Lightning's class: the class itself must be in a trusted package
        ("training.saving.LightningModule", "is lightning.pytorch.core.module.LightningModule, not trusted"),
        ("__main__.Model", "defined in a script"),
        ("os.system('touch x')", "invalid model class path"),
    ],
)
def test_class_path_must_name_an_importable_lightning_module(tmp_path, class_path, message):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "litvision": {"class_path": class_path}}, path)
    with pytest.raises(CheckpointFileError, match=re.escape(message)) as info:
        load_model(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------- what a file may import


def _names(class_path: str, path: Path) -> Path:
    """A weights_only-safe checkpoint naming ``class_path``: the shape load_model and --ckpt_path read."""
    torch.save({"state_dict": {"layer.weight": torch.full((1, 2), 0.5), "layer.bias": torch.zeros(1)},
                "hyper_parameters": {"width": 2, "_class_path": class_path},
                "litvision": {"class_path": class_path, "format": 1}}, path)  # fmt: skip
    return path


def test_a_file_cannot_choose_a_module_to_import(tmp_path, capsys, monkeypatch):
    """``this`` prints the Zen of Python when imported: a file naming ``this.Foo`` is refused before that."""
    monkeypatch.delitem(sys.modules, "this", raising=False)
    path = _names("this.Foo", tmp_path / "zen.ckpt")
    for load in (load_model, offline_model_config):
        with pytest.raises(CheckpointFileError) as info:
            load(path)
        assert str(info.value) == (
            f"{path}: model class 'this.Foo' is not in litvision's packages (detectors, classifiers, training) "
            "or a trusted one, so it was not imported; if you trust it, import it first, pass "
            "load_model(..., trusted_modules=['this']) or set LITVISION_TRUSTED_MODULES=this")
        assert "this" not in sys.modules
    assert "Beautiful is better than ugly" not in capsys.readouterr().out
    # trusting another package changes nothing for it
    monkeypatch.setenv("LITVISION_TRUSTED_MODULES", "thisisnot,other")
    with pytest.raises(CheckpointFileError, match="not in litvision's packages"):
        load_model(path, trusted_modules=["thi"])
    assert "this" not in sys.modules


USER_MODULE = """
import torch
from lightning.pytorch import LightningModule
from training.saving import SavableModule


class UserNet(SavableModule, LightningModule):
    def __init__(self, width: int = 2):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(width, 1)
"""
USER_MODULES = ("userpkg_lv", "userpkg_lv.models")


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A user's package ``userpkg_lv`` on sys.path, not imported, with the SavableModule ``models.UserNet``."""
    root = tmp_path / "src"
    (root / "userpkg_lv").mkdir(parents=True)
    (root / "userpkg_lv" / "__init__.py").write_text("")
    (root / "userpkg_lv" / "models.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(root))
    yield
    for name in USER_MODULES:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("how", ["argument", "class-argument", "environment", "imported-first"])
def test_a_module_the_user_allows_loads(tmp_path, user_package, monkeypatch, how):
    path = _names("userpkg_lv.models.UserNet", tmp_path / "user.ckpt")
    with pytest.raises(CheckpointFileError, match=re.escape("trusted_modules=['userpkg_lv']")):
        load_model(path)
    assert not any(name in sys.modules for name in USER_MODULES)  # refused, and none of its code ran
    if how == "argument":
        loaded = load_model(path, trusted_modules=["userpkg_lv"])
    elif how == "class-argument":
        loaded = load_model(path, trusted_modules="userpkg_lv.models.UserNet")
    elif how == "environment":  # the setting for the command line and compare
        monkeypatch.setenv("LITVISION_TRUSTED_MODULES", "otherpkg, userpkg_lv")
        assert offline_model_config(path) == ("userpkg_lv.models.UserNet", {"width": 2})
        loaded = load_model(path)
    else:  # a SavableModule the user's code imported (a Keras custom object): nothing to import
        importlib.import_module("userpkg_lv.models")
        loaded = load_model(path)
    assert type(loaded).__module__ == "userpkg_lv.models" and type(loaded).__name__ == "UserNet"
    assert torch.equal(loaded.layer.weight, torch.full((1, 2), 0.5))


def test_a_refused_checkpoint_is_a_usage_error_on_the_command_line(tmp_path, train_py, monkeypatch):
    monkeypatch.delitem(sys.modules, "this", raising=False)
    path = _names("this.Foo", tmp_path / "zen.ckpt")
    code, out, err = train_py("validate", "--config", REPO / "configs" / "faster_rcnn.yaml", "--ckpt_path", path)
    assert code == 2 and "this" not in sys.modules and "Beautiful is better" not in out
    assert f"{path}: model class 'this.Foo' is not in litvision's packages" in err and "Traceback" not in err


def test_file_without_class_path_is_explained(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, path)
    with pytest.raises(CheckpointFileError, match="no model class recorded"):
        load_model(path)


def test_load_model_inside_a_cli_instantiation_keeps_its_own_hparams(tmp_path):
    """A module built by LightningCLI that loads another checkpoint in its constructor (the classifier's
    backbone_checkpoint) must not hand its own config to the loaded module."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    from detectors.module import FasterRCNNModule

    detector = FasterRCNNModule(class_names=["a", "b"], backbone="resnet18_fpn", min_size=64, max_size=64)
    path = tmp_path / "det.ckpt"
    save_model(detector, path)
    outer = {"backbone": "resnet50", "num_classes": 7}
    with _given_hyperparameters_context(hparams=outer, instantiator="lightning.pytorch.cli.instantiate_module"):
        loaded = load_model(path)
    assert loaded.hparams["backbone"] == "resnet18_fpn" and "_instantiator" not in loaded.hparams
