"""save_model / load_model round trips, safe loading, atomic writes, clear errors on bad files."""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule

from tests.training.tiny_lightning import ScriptedModule, TinyRegressor, assert_same, quiet_trainer
from training.callbacks import ModelCheckpoint
from training.saving import (
    OFFLINE_HPARAM_KEYS,
    AtomicCheckpointIO,
    CheckpointFileError,
    atomic_torch_save,
    checkpoint_log_position,
    load_checkpoint_file,
    load_model,
    save_model,
)

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


# ----------------------------------------------------------------------------------------- unsafe files


class _Payload:
    """Unpickling this runs os.mkdir(marker): stands for arbitrary code in a malicious file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    module = ScriptedModule(script=[1.0])
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "litvision": {"class_path": "tests.training.tiny_lightning.ScriptedModule", "format": 1},
            "payload": _Payload(str(marker)),
        },
        path,
    )
    with pytest.raises(CheckpointFileError, match="refused to load") as info:
        load_model(path)
    assert str(path) in str(info.value) and "posix.mkdir" in str(info.value)
    assert not marker.exists()

    # the same file given to resume (through the checkpoint IO ModelCheckpoint installs)
    trainer = quiet_trainer(tmp_path, 1, [ModelCheckpoint(str(tmp_path / "m.ckpt"))])
    with pytest.raises(CheckpointFileError, match="refused to load"):
        trainer.fit(ScriptedModule(script=[1.0]), ckpt_path=str(path))
    assert not marker.exists()

    # the payload is live: an unrestricted unpickler would have run it
    torch.load(path, weights_only=False)
    assert marker.is_dir()


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        ("collections.OrderedDict", "is not a LightningModule subclass; refused"),
        ("os.system", "is not a LightningModule subclass; refused"),
        ("no_such_package_xyz.Model", "cannot be imported"),
        ("__main__.Model", "defined in a script"),
        ("os.system('touch x')", "invalid model class path"),
    ],
)
def test_class_path_must_name_an_importable_lightning_module(tmp_path, class_path, message):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "litvision": {"class_path": class_path}}, path)
    with pytest.raises(CheckpointFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_model(path)


def test_file_without_class_path_is_explained(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, path)
    with pytest.raises(CheckpointFileError, match="no model class recorded"):
        load_model(path)


# ----------------------------------------------------------------------------------------- bad files


# load_model reads the file whole; the hyperparameter/step lookups before a resume map it (mmap=True).
READERS = {"load_model": load_model, "mapped": lambda path: load_checkpoint_file(path, mmap=True)}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_truncated_or_corrupt_file_errors_clearly(tmp_path, damage, reader):
    path = tmp_path / "m.ckpt"
    save_model(TinyRegressor(hidden=8), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": random.Random(0).randbytes(4096)}[damage])
    with pytest.raises(CheckpointFileError, match="truncated or corrupt") as info:
        READERS[reader](path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_mapped_read_equals_plain_read(tmp_path, zip_format):
    """torch cannot map its pre-1.6 (non-zip) format: that file is read whole instead, with the same result."""
    path = tmp_path / "m.ckpt"
    saved = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "global_step": 12,
             "litvision": {"logger_version": 3}, "hyper_parameters": {"hidden": 8}}  # fmt: skip
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    mapped = load_checkpoint_file(path, mmap=True)
    assert torch.equal(mapped["state_dict"]["w"], saved["state_dict"]["w"])
    assert mapped["hyper_parameters"] == {"hidden": 8}
    assert checkpoint_log_position(path) == (3, 12)


def test_random_bytes_always_get_the_clear_error(tmp_path):
    """Random bytes reach torch's legacy (non-zip) unpickler, which fails in several ways (IndexError,
    KeyError, UnpicklingError...); every one must become the same named error."""
    path = tmp_path / "noise.ckpt"
    for seed in range(300):
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(CheckpointFileError, match="truncated or corrupt"):
            load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        load_model(tmp_path / "nothing.ckpt")


# ----------------------------------------------------------------------------------------- atomic writes


class _FailsMidSave:
    """Pickling this raises, as a full disk or a crash would in the middle of torch.save."""

    def __reduce__(self):
        raise OSError(28, "No space left on device (simulated)")


def test_failed_save_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "model.ckpt"
    module = TinyRegressor(hidden=8)
    save_model(module, path)
    before = path.read_bytes()
    with pytest.raises(OSError, match="simulated"):
        atomic_torch_save({"state_dict": module.state_dict(), "x": _FailsMidSave()}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.ckpt"]  # no temporary file left behind
    load_model(path)


def test_atomic_save_file_mode_and_checkpoint_io(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_torch_save({"a": torch.ones(2)}, tmp_path / "new.ckpt")
    assert os.stat(tmp_path / "new.ckpt").st_mode & 0o777 == 0o666 & ~mask

    io = AtomicCheckpointIO()
    io.save_checkpoint({"a": torch.arange(3)}, str(tmp_path / "sub" / "c.ckpt"))
    assert torch.equal(io.load_checkpoint(str(tmp_path / "sub" / "c.ckpt"))["a"], torch.arange(3))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        io.load_checkpoint(str(tmp_path / "missing.ckpt"))


def _as_if_saved_on_cuda(src: Path, dst: Path) -> None:
    """Rewrite a torch.save zip so its storages say "cuda:0", as a GPU run's checkpoint does."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):  # protocol-2 pickle: BINUNICODE opcode, 4-byte length, text
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(name, data)


def test_checkpoint_io_opens_a_gpu_checkpoint_on_the_cpu(tmp_path):
    # Lightning calls load_checkpoint without map_location (resume, validate/test/predict --ckpt_path).
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, tmp_path / "cpu.ckpt")
    _as_if_saved_on_cuda(tmp_path / "cpu.ckpt", tmp_path / "gpu.ckpt")
    if not torch.cuda.is_available():  # the rewritten file really is a CUDA checkpoint
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.ckpt", weights_only=True)
    w = AtomicCheckpointIO().load_checkpoint(str(tmp_path / "gpu.ckpt"))["state_dict"]["w"]
    assert w.device.type == "cpu" and torch.equal(w, torch.arange(3.0))


def test_checkpoint_callback_removes_temp_files_of_killed_saves(tmp_path):
    stale = tmp_path / ".last.ckpt.k3j_9x2a.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"partial")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("not ours")
    trainer = quiet_trainer(tmp_path, 1, [ModelCheckpoint(str(tmp_path / "m.ckpt"))])
    trainer.fit(ScriptedModule(script=[1.0]))
    assert not stale.exists()
    assert unrelated.exists()
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


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
