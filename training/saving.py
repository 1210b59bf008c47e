"""Keras' ``model.save`` / ``load_model`` for LightningModules.

One file format for everything: a Lightning checkpoint dict (``torch.save``) holding

* ``state_dict``        -- the weights,
* ``hyper_parameters``  -- the constructor arguments (plain data: numbers, strings, lists, dicts),
* ``litvision``         -- ``{"class_path": "pkg.mod.Class", "format": 1, "logger_version": ...}``,

plus, for a full (resumable) checkpoint, Lightning's optimizer, scheduler, loop and callback state.
``load_model`` reads any such file -- ``model.save()`` output, ``last.ckpt``, best/epoch checkpoints --
and rebuilds the right class without the caller naming it, like ``keras.models.load_model``.

Files are written atomically and read with ``torch.load(weights_only=True)`` (``training.checkpoint_io``).
A file names its class by dotted path but cannot choose what is imported (importing runs a module's code):
``load_model`` imports only litvision's packages and those the user trusts, and must find a LightningModule.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import lightning
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters

from training.checkpoint_io import (
    FORMAT_VERSION,
    LITVISION_KEY,
    CheckpointFileError,
    atomic_torch_save,
    check_resumable,
    load_checkpoint_file,
    use_atomic_checkpoint_io,
)
from training.errors import BadValueError, MissingFileError

# Constructor arguments that point at pretrained weights (a download or a local file). load_model sets
# them to None: the saved state dict replaces those weights anyway, and rebuilding must not touch the net.
OFFLINE_HPARAM_KEYS = ("weights", "weights_backbone", "weights_path", "backbone_checkpoint")

# The packages whose modules load_model imports for a file's class path without being told: litvision's own.
LITVISION_PACKAGES = ("detectors", "classifiers", "training")

# More, comma-separated (as load_model's trusted_modules), for the CLI and commands that load models themselves.
TRUSTED_MODULES_ENV = "LITVISION_TRUSTED_MODULES"

# The one instantiator Lightning writes into hparams when LightningCLI builds the module.
_CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


# ----------------------------------------------------------------------------------------- plain data


def find_non_plain(value: Any, where: str = "hyper_parameters") -> str | None:
    """Return a description of the first value that is not plain data, or None if all of it is."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = find_non_plain(item, f"{where}[{i}]")
            if found:
                return found
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                return f"{where}: key {key!r} of type {type(key).__name__}"
            found = find_non_plain(item, f"{where}[{key!r}]")
            if found:
                return found
        return None
    return f"{where} = {value!r} ({type(value).__module__}.{type(value).__qualname__})"


def _require_plain_hparams(hparams: Mapping[str, Any], who: str) -> None:
    """Refuse hyperparameters that ``torch.load(weights_only=True)`` could not read back."""
    found = find_non_plain(dict(hparams))
    if found:
        raise TypeError(
            f"{who}: hyperparameters must be plain data (numbers, strings, lists, dicts) so checkpoints load "
            f"with torch.load(weights_only=True); found {found}. Pass plain values (e.g. a path string, a "
            "class name) or exclude it with save_hyperparameters(ignore=[...])."
        )


# ----------------------------------------------------------------------------------------- the mixin


def default_offline_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` with the top-level ``OFFLINE_HPARAM_KEYS`` that are present set to None."""
    return {k: (None if k in OFFLINE_HPARAM_KEYS else v) for k, v in hparams.items()}


def class_path_of(cls: type) -> str:
    """``"pkg.mod.Class"``: what a checkpoint records, and what ``load_model`` imports."""
    return f"{cls.__module__}.{cls.__qualname__}"


class SavableModule:
    """Mixin for LightningModules: ``module.save(path)`` and a class path in every checkpoint.

    Use as ``class MyModule(SavableModule, LightningModule)`` and call ``self.save_hyperparameters()``
    in ``__init__`` with plain-data arguments; apply freezing in ``__init__`` so that ``load_model``
    (which calls the constructor) re-applies it.
    """

    @classmethod
    def offline_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments for rebuilding without fetching pretrained weights (``load_model``).

        The default (:func:`default_offline_hparams`) sets the standard weight-source arguments to None.
        Override when a model's architecture depends on them (e.g. torchvision picks FrozenBatchNorm2d
        only when weights are given): the rebuilt module must have exactly the saved state dict's keys.
        """
        return default_offline_hparams(hparams)

    def save(self, path: str | os.PathLike, weights_only: bool = False) -> None:
        """Keras ``model.save``: see :func:`save_model`."""
        save_model(self, path, weights_only=weights_only)  # type: ignore[arg-type]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        _require_plain_hparams(checkpoint.get("hyper_parameters") or {}, type(self).__name__)
        checkpoint[LITVISION_KEY] = _litvision_info(self)  # type: ignore[arg-type]
        if isinstance(checkpoint.get("hyper_parameters"), dict):
            # LightningCLI's `--ckpt_path` re-reads the model config from the checkpoint and needs the class
            # (modules it built already carry it); load_from_checkpoint ignores the key.
            checkpoint["hyper_parameters"].setdefault("_class_path", class_path_of(type(self)))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            check_resumable(checkpoint, trainer.ckpt_path)


def _litvision_info(module: LightningModule) -> dict[str, Any]:
    """The checkpoint's ``litvision`` entry; the logger version lets a resumed run log on in the same one."""
    info: dict[str, Any] = {"class_path": class_path_of(type(module)), "format": FORMAT_VERSION}
    trainer = getattr(module, "_trainer", None)
    logger = trainer.logger if trainer is not None else None
    version = getattr(logger, "version", None) if logger is not None else None
    if isinstance(version, (int, str)):
        info["logger_version"] = version
    return info


# ----------------------------------------------------------------------------------------- save / load


def save_model(module: LightningModule, path: str | os.PathLike, weights_only: bool = False) -> None:
    """Keras ``model.save``: one file with the class path, hyperparameters and weights (atomic write).

    With ``weights_only=False`` and a module attached to a Trainer, the file is a full Lightning
    checkpoint (optimizer, schedulers, loops, callbacks: training can resume from it). Otherwise it holds
    the architecture description and the weights only. Either way ``load_model(path)`` rebuilds it.
    """
    _require_plain_hparams(module.hparams, type(module).__name__)
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and not weights_only:
        use_atomic_checkpoint_io(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        return
    if trainer is not None and not trainer.is_global_zero:
        return
    checkpoint: dict[str, Any] = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    if getattr(module, "_hparams_name", None):
        checkpoint[module.CHECKPOINT_HYPER_PARAMS_NAME] = module._hparams_name
    module.on_save_checkpoint(checkpoint)
    checkpoint[LITVISION_KEY] = _litvision_info(module)
    atomic_torch_save(checkpoint, path)


def load_model(path: str | os.PathLike, map_location: Any = "cpu",
               trusted_modules: Iterable[str] = ()) -> LightningModule:
    """Keras ``load_model``: rebuild the saved module (its own class) and load its weights.

    Accepts ``save_model``/``module.save`` files and the checkpoints ``ModelCheckpoint`` writes
    (``last.ckpt``, best/epoch files, weights-only files). Pretrained-weight arguments are nulled
    (``offline_hparams``) so nothing is downloaded or read besides ``path``; the constructor re-applies
    freezing; weights load with ``strict=True``. The module is returned as the constructor left it
    (train mode): call ``.eval()`` for inference.

    The file's class is imported only from ``LITVISION_PACKAGES``, ``trusted_modules`` (package, module or class
    paths: ``"mypkg"`` trusts ``mypkg.models.Net``) and ``LITVISION_TRUSTED_MODULES`` (comma-separated), or is a
    ``SavableModule`` subclass your code already imported (a Keras custom object); else nothing is imported.
    """
    path = os.fspath(path)
    checkpoint = load_checkpoint_file(path, map_location=map_location)
    info = checkpoint.get(LITVISION_KEY)
    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = info.get("class_path") if isinstance(info, dict) else None
    if class_path is None and isinstance(hparams, Mapping):
        class_path = hparams.get("_class_path")  # written by LightningCLI in subclass mode
    if not isinstance(class_path, str):
        raise CheckpointFileError(
            f"{path}: no model class recorded (not written by litvision's save_model/ModelCheckpoint); "
            "load it with YourModuleClass.load_from_checkpoint() instead"
        )
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointFileError(f"{path}: has no 'state_dict' (no weights to load)")
    if not isinstance(hparams, Mapping):
        raise CheckpointFileError(f"{path}: 'hyper_parameters' is a {type(hparams).__name__}, not a dict")

    cls = _import_module_class(class_path, path, trusted_modules)
    hparams_name = checkpoint.get(LightningModule.CHECKPOINT_HYPER_PARAMS_NAME)
    try:
        module = _instantiate(cls, dict(hparams), hparams_name, path)
    except TypeError as e:  # e.g. a required constructor argument that was not saved
        raise CheckpointFileError(
            f"{path}: cannot rebuild {class_path} from its saved hyperparameters: {e}"
        ) from e
    module.on_load_checkpoint(checkpoint)
    try:
        module.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointFileError(
            f"{path}: the weights do not fit the rebuilt {class_path} (does the constructor build the same "
            f"architecture without pretrained weights? see offline_hparams): {e}"
        ) from None
    if isinstance(map_location, (str, torch.device)):
        module = module.to(map_location)
    return module


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def offline_model_config(path: str | os.PathLike,
                         trusted_modules: Iterable[str] = ()) -> tuple[str, dict[str, Any]] | None:
    """``(class_path, constructor arguments)`` that rebuild the checkpoint's model without fetching any
    pretrained weights (its state dict replaces them), or None when the file records no model class. The
    class is imported as ``load_model`` imports it (``trusted_modules``: the same setting)."""
    path = os.fspath(path)
    hparams = dict(load_checkpoint_file(path, mmap=True).get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None)
    if not isinstance(class_path, str):
        return None
    cls = _import_module_class(class_path, path, trusted_modules)
    return class_path, getattr(cls, "offline_hparams", default_offline_hparams)(hparams)


def _trusted_prefixes(trusted_modules: Iterable[str] = ()) -> tuple[str, ...]:
    """What ``load_model`` may import: ``LITVISION_PACKAGES``, ``trusted_modules``, ``TRUSTED_MODULES_ENV``'s."""
    if isinstance(trusted_modules, str):  # one name, not its letters
        trusted_modules = [trusted_modules]
    from_env = os.environ.get(TRUSTED_MODULES_ENV, "").split(",")
    return (*LITVISION_PACKAGES, *(t.strip() for t in [*trusted_modules, *from_env] if t.strip()))


def _within(dotted: str, prefixes: Iterable[str]) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)


def _import_module_class(class_path: str, path: str, trusted_modules: Iterable[str]) -> type[LightningModule]:
    """The LightningModule subclass ``pkg.mod.Class``: imported from a trusted package (see ``load_model``),
    or a ``SavableModule`` subclass already imported; anything else is refused without importing it."""
    if not _DOTTED.fullmatch(class_path):
        raise CheckpointFileError(f"{path}: invalid model class path {class_path!r}")
    if class_path.startswith("__main__."):
        raise CheckpointFileError(
            f"{path}: its model class {class_path!r} was defined in a script (__main__) and cannot be found "
            "again; define model classes in an importable module"
        )
    trusted = _trusted_prefixes(trusted_modules)
    if not _within(class_path, trusted):
        cls = _already_imported(class_path)
        if cls is None:
            top = class_path.split(".")[0]
            raise CheckpointFileError(
                f"{path}: model class {class_path!r} is not in litvision's packages ({', '.join(LITVISION_PACKAGES)}) "
                f"or a trusted one, so it was not imported; if you trust it, import it first, pass "
                f"load_model(..., trusted_modules=[{top!r}]) or set {TRUSTED_MODULES_ENV}={top}"
            )
        return cls
    obj = _import_attribute(class_path)
    if not (isinstance(obj, type) and issubclass(obj, LightningModule)):
        raise CheckpointFileError(
            f"{path}: model class {class_path!r} "
            + ("cannot be imported" if obj is None else "is not a LightningModule subclass; refused")
        )
    if not _within(class_path_of(obj), trusted):  # e.g. detectors.module.LightningModule, a re-export
        raise CheckpointFileError(f"{path}: model class {class_path!r} is {class_path_of(obj)}, not trusted")
    return obj


def _already_imported(class_path: str) -> type[LightningModule] | None:
    """The ``SavableModule`` subclass at ``class_path`` if its module is already imported, else None."""
    parts = class_path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        obj: Any = sys.modules.get(".".join(parts[:i]))
        if obj is not None:
            for attr in parts[i:]:
                obj = getattr(obj, attr, None)
            break
    ok = isinstance(obj, type) and issubclass(obj, SavableModule) and issubclass(obj, LightningModule)
    return obj if ok else None


def _import_attribute(dotted: str) -> Any:
    """``pkg.mod.Class`` by importing its longest importable module prefix; None if there is none."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only "this prefix is not a module" moves on; a missing dependency inside it is a real error.
            if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
                continue
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def _instantiate(
    cls: type[LightningModule], hparams: dict[str, Any], hparams_name: str | None, path: str
) -> LightningModule:
    # Inside a LightningCLI instantiation (e.g. a classifier whose constructor loads a detector
    # checkpoint) Lightning's context would hand the *outer* module's config to this module's
    # save_hyperparameters(); build it outside that context.
    token = _given_hyperparameters.set(None)
    try:
        return _construct(cls, hparams, hparams_name, path)
    finally:
        _given_hyperparameters.reset(token)


def _construct(
    cls: type[LightningModule], hparams: dict[str, Any], hparams_name: str | None, path: str
) -> LightningModule:
    """``cls`` called with the saved hyperparameters as its ``offline_hparams`` adjusts them: through
    LightningCLI's instantiator for modules it built, else as keyword arguments (or the one named
    argument ``save_hyperparameters`` recorded)."""
    instantiator = hparams.pop("_instantiator", None)
    hparams.pop("_class_path", None)
    offline: Callable[[dict[str, Any]], dict[str, Any]] = getattr(
        cls, "offline_hparams", default_offline_hparams
    )
    hparams = offline(hparams)
    if instantiator is not None:
        if instantiator != _CLI_INSTANTIATOR:
            raise CheckpointFileError(f"{path}: unknown instantiator {instantiator!r} refused")
        # LightningCLI-built modules: their hparams are the CLI config (nested class_path dicts included).
        from lightning.pytorch.cli import instantiate_module

        return instantiate_module(cls, hparams)
    params = inspect.signature(cls.__init__).parameters
    if hparams_name and hparams_name in params and hparams_name != "kwargs":
        return cls(**{hparams_name: hparams})
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        hparams = {k: v for k, v in hparams.items() if k in params}
    return cls(**hparams)


def copy_backbone(path: str | os.PathLike, body: torch.nn.Module, target: str,
                  if_missing: Literal["raise", "warn"] = "raise") -> torch.nn.Module | None:
    """Copy the backbone of the model saved at ``path`` into ``body``: a detector's ``model.backbone.body``
    or a classifier's ``backbone`` (both carry torchvision's key names). ``target`` names ``body``'s
    architecture in errors. A pretrained detector's FrozenBatchNorm2d has no ``num_batches_tracked``;
    nothing else may differ. A missing file raises, or with ``if_missing="warn"`` (a config that expects
    an earlier demo step) warns and leaves ``body`` as it is. Returns the donor body (for what the state
    dict does not hold, such as BatchNorm's eps), or None when nothing was copied."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        if if_missing == "warn":
            warnings.warn(f"backbone_checkpoint {path} does not exist: training {target} from its initial "
                          "weights instead (run the step that writes it first, e.g. `make demo`)", stacklevel=3)
            return None
        raise MissingFileError(f"backbone_checkpoint {path}: no such file")
    source = load_model(path)
    if isinstance(getattr(source, "model", None), torch.nn.Module):  # a detector
        donor = getattr(getattr(source.model, "backbone", None), "body", None)
    else:  # a classifier
        donor = getattr(source, "backbone", None)
    if not isinstance(donor, torch.nn.Module):
        raise BadValueError(f"backbone_checkpoint {path}: {type(source).__name__} has no backbone to copy")
    result = body.load_state_dict(donor.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise BadValueError(f"backbone_checkpoint {path}: its backbone ({source.hparams.get('backbone')}) does not "
                         f"fit {target}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return donor
