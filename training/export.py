"""``python train.py export``: a trained model as an ONNX, torch.export (ExportedProgram) or TorchScript file,
checked against the eager model before it is kept.

The model family says what its exported graph is (:class:`ExportAdapter`, from the module's ``export_adapter()``
method: ``detectors.export``, ``classifiers.export``); this module does what every family shares:

* load the checkpoint with ``training.saving.load_model`` (safe, offline rebuild), pick the sample images (the
  data config's validation images, else the family's generated ones);
* export with the format's exporter into a temporary file next to ``--out``, with the model's description (class
  names, category ids, input and output contract) as metadata: ONNX ``metadata_props`` (one key per entry,
  JSON values), and a ``litvision.json`` extra file inside ExportedProgram (``.pt2``) and TorchScript archives;
* run the file on the sample images (ONNX through onnxruntime on the CPU, the others through torch), compare
  with the eager model (the family's :meth:`ExportAdapter.compare`), print the check in one line, and only then
  move the file to ``--out``. A file that fails the check is not kept: the command exits with status 2 and the
  reason (a usage error), as it does when an exporter cannot handle the model, naming the format that works.
"""

from __future__ import annotations

import abc
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from training.errors import BadFileError, BadValueError, FileTakenError, MissingFileError, UsageError

Format = Literal["onnx", "exported_program", "torchscript"]
FORMATS: tuple[str, ...] = ("onnx", "exported_program", "torchscript")
METADATA_FILE = "litvision.json"  # the metadata inside .pt2 (torch.export) and TorchScript archives
# What to use when a format's exporter cannot handle a model (torch.export stops on torchvision's detectors).
WORKS = {"onnx": "torchscript", "exported_program": "onnx (or torchscript)", "torchscript": "onnx"}
ONNX_OPSET = 17  # torch.onnx's TorchScript-based exporter; torchvision's detection ops are tested up to it


class ExportError(BadValueError):
    """The model cannot be exported in the asked format, or the exported file does not reproduce it."""


@dataclass
class CheckResult:
    """The comparison of an exported model with the eager one: ``ok`` and a one-line ``summary``
    (the largest differences found, or the first mismatch)."""

    ok: bool
    summary: str


class ExportAdapter(abc.ABC):
    """A model family's part of ``train.py export``, built by the module's ``export_adapter()``.

    The exported graph takes one input, ``images``: FloatTensor[B, 3, H, W], RGB in 0..1, and returns the
    tensors named by ``output_names``. ``dynamic(format)`` says which of B, H, W may change after export.
    """

    input_name = "images"
    output_names: tuple[str, ...] = ()

    def __init__(self, module: nn.Module):
        self.module = module.eval()

    @abc.abstractmethod
    def graph(self, format: str) -> nn.Module:
        """A plain module (no hooks, eval mode) computing the outputs from ``images`` for ``format``'s exporter."""

    @abc.abstractmethod
    def dynamic(self, format: str) -> dict[int, str]:
        """The input dimensions that stay free in ``format`` (0: batch, 2: height, 3: width) and their names."""

    @abc.abstractmethod
    def eager(self, images: Tensor) -> list[Tensor]:
        """The outputs of the module itself (its own forward, every addition of litvision in place)."""

    @abc.abstractmethod
    def compare(self, exported: list[list[Tensor]], eager: list[list[Tensor]], tolerances: dict) -> CheckResult:
        """Compare the outputs of each sample batch."""

    @abc.abstractmethod
    def metadata(self, data: Any, format: str) -> dict[str, Any]:
        """Class names and the rest of the contract (``data``: the data config's DataModule, or None)."""

    def generated_images(self, count: int) -> list[Tensor]:
        """Images ``[3, H, W]`` in 0..1 to check on when no data is given: smooth random patterns, 224 px."""
        gen = torch.Generator().manual_seed(0)
        coarse = torch.rand(count, 3, 7, 7, generator=gen)
        return list(nn.functional.interpolate(coarse, size=(224, 224), mode="bilinear", align_corners=False))


# -- sample images --------------------------------------------------------------------------------------


def data_images(data: Any, count: int) -> list[Tensor]:
    """The first ``count`` validation images of a LightningDataModule (``[3, H, W]`` float in 0..1, as its
    validation transform gives them); a sample is ``(image, target)`` or an image."""
    data.prepare_data()
    data.setup("validate")
    dataset = data.val_dataloader().dataset
    images = []
    for i in range(min(count, len(dataset))):
        sample = dataset[i]
        if sample is None:  # an unreadable image skipped by the dataset's on_bad_sample policy
            continue
        image = sample[0] if isinstance(sample, (tuple, list)) else sample
        images.append(torch.as_tensor(image).as_subclass(Tensor).float())
    if not images:
        raise BadValueError(f"the data config's validation split ({type(data).__name__}) has no readable image "
                            "to check the export on")
    return images


def batches(images: Sequence[Tensor], batch_size: int) -> list[Tensor]:
    """``images`` as ``[B, 3, H, W]`` batches of ``batch_size`` (the last one filled up by repeating its first
    image when the batch size is fixed); images of a batch are resized to its first image's size."""
    out = []
    for start in range(0, len(images), batch_size):
        group = list(images[start : start + batch_size])
        group += [group[0]] * (batch_size - len(group))
        size = tuple(group[0].shape[-2:])
        group = [g if tuple(g.shape[-2:]) == size else _resize(g, size) for g in group]
        out.append(torch.stack(group))
    return out


def _resize(image: Tensor, size: tuple[int, ...]) -> Tensor:
    return nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


# -- exporters ------------------------------------------------------------------------------------------


def _quiet():
    """The exporters' warnings about tracing and deprecations are about torchvision's code, not the user's."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _cannot(model: str, format: str, error: BaseException, works: str) -> ExportError:
    """One line: which exporter failed on what, and the format that works."""
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    where = next((line.strip() for line in str(error).splitlines() if line.startswith("Caused by:")), "")
    detail = f"{type(error).__name__}: {reason[:160]}" + (f" {where[:120]}" if where else "")
    return ExportError(f"--format {format} cannot export {model} ({detail}); use --format {works}")


def export_onnx(graph: nn.Module, example: Tensor, path: str, adapter: ExportAdapter, metadata: dict) -> None:
    """torch.onnx's TorchScript-based exporter (``dynamo=False``): the dynamo exporter stops inside torch.export
    on torchvision's detectors (docs/export.md); the metadata goes into ``metadata_props``."""
    import onnx

    axes = {adapter.input_name: adapter.dynamic("onnx")}
    with _quiet(), torch.no_grad():
        torch.onnx.export(graph, (example,), path, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[adapter.input_name], output_names=list(adapter.output_names),
                          dynamic_axes=axes)  # fmt: skip
    model = onnx.load(path)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(model, path)


@contextlib.contextmanager
def _no_stderr():
    """Nothing written to stderr gets through, by Python or by C++: torch.export writes the whole traced graph
    (hundreds of kB) there when it fails, and the exception already says why."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def export_program(graph: nn.Module, example: Tensor, path: str, adapter: ExportAdapter, metadata: dict) -> None:
    """torch.export with the adapter's free dimensions, saved as a ``.pt2`` archive with ``litvision.json``."""
    dims = {axis: torch.export.Dim.AUTO for axis in adapter.dynamic("exported_program")}
    if 0 in dims and example.shape[0] == 1:  # torch.export fixes a dimension it sees at size 1
        example = torch.cat([example, example])
    with _quiet(), _no_stderr():
        program = torch.export.export(graph, (example,), dynamic_shapes={adapter.input_name: dims or None},
                                      strict=False)  # fmt: skip
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(metadata)})


def export_torchscript(graph: nn.Module, example: Tensor, path: str, adapter: ExportAdapter, metadata: dict) -> None:
    """``torch.jit.script`` (every dimension stays free), saved with ``litvision.json`` as an extra file."""
    with _quiet():
        scripted = torch.jit.script(graph)
        torch.jit.save(scripted, path, _extra_files={METADATA_FILE: json.dumps(metadata)})


EXPORTERS: dict[str, Callable[..., None]] = {
    "onnx": export_onnx, "exported_program": export_program, "torchscript": export_torchscript,
}  # fmt: skip


def load_runner(format: str, path: str) -> Callable[[Tensor], list[Tensor]]:
    """A function running the exported file: ``images -> outputs`` (ONNX: onnxruntime, CPU)."""
    if format == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads torch has: a like-for-like runtime
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda images: [torch.from_numpy(o) for o in session.run(None, {name: images.numpy()})]
    with _quiet():
        module = torch.export.load(path).module() if format == "exported_program" else torch.jit.load(path)

    def run(images: Tensor) -> list[Tensor]:
        with _quiet():  # a scripted torchvision detector warns on every call that it returns (losses, detections)
            return [o.detach() for o in module(images)]

    return run


def median_latency_ms(runs: dict[str, Callable[[Tensor], Any]], images: Sequence[Tensor], rounds: int = 20,
                      warmup: int = 2) -> dict[str, float]:  # fmt: skip
    """Median milliseconds of each function of ``runs`` on batches of ``images``: ``warmup`` untimed rounds,
    then ``rounds`` in which every function runs once on the same batch, in turn (interleaved: a slow moment of
    a shared machine costs each of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for r in range(warmup + rounds):
            batch = images[r % len(images)]
            for name, run in runs.items():
                start = time.perf_counter()
                run(batch)
                if r >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata ``export`` wrote into ``path`` (any of the three formats), values decoded from JSON."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):  # .pt2 and TorchScript archives: ARCHIVE/extra/litvision.json
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}")), None)
            if name is None:
                raise BadFileError(f"{path}: no {METADATA_FILE} in the archive (not written by train.py export)")
            return json.loads(archive.read(name))
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return {key: _json_or_text(value) for key, value in props.items()}


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# -- the command ----------------------------------------------------------------------------------------


def check_export(adapter: ExportAdapter, format: str, path: str, samples: list[Tensor],
                 tolerances: dict) -> CheckResult:  # fmt: skip
    """Run the exported file and the eager module on every sample batch and compare them; a file its runtime
    cannot load or run is an :class:`ExportError`."""
    with torch.no_grad():
        try:
            run = load_runner(format, path)
            exported = [run(batch) for batch in samples]
        except Exception as e:  # noqa: BLE001 -- the runtime's own error, in one line: the export is not usable
            raise ExportError(f"the exported {format} file does not run: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200]}") from e
        eager = [adapter.eager(batch) for batch in samples]
    return adapter.compare(exported, eager, tolerances)


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.isdir(out):
        raise FileTakenError(f"--out {out} is a folder: give the file to write")
    if os.path.exists(out) and not overwrite:
        raise FileTakenError(f"--out {out} already exists: choose another file, or pass --overwrite true to "
                             "replace it")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise MissingFileError(f"--out {out}: folder {folder} does not exist")


def export_command(
    ckpt_path: str,
    out: str,
    format: Format = "onnx",
    data: Any = None,
    batch_size: int = 1,
    check_images: int = 4,
    box_tolerance: float = 1e-3,
    score_tolerance: float = 1e-4,
    overwrite: bool = False,
) -> str:
    """Export a trained detector or classifier (ONNX, torch.export's ExportedProgram, TorchScript) with its
    preprocessing inside, and check the file against the eager model on sample images (docs/export.md).

    Args:
        ckpt_path: the checkpoint (any litvision checkpoint: best.ckpt, last.ckpt, model.save() files).
        out: the file to write (.onnx, .pt2, .pt); an existing file is refused unless --overwrite true.
        format: onnx (run with onnxruntime), exported_program (torch.export), torchscript (torch.jit.script).
        data: a data config (e.g. configs/data/shapes.yaml): its validation images are the check's samples and
            a COCO dataset's category ids go into the metadata; without it the check uses generated images.
        batch_size: the batch size of a detector's ONNX graph, which is fixed (the other dimensions are free).
        check_images: how many sample images the check runs.
        box_tolerance: the largest box coordinate difference allowed, in pixels.
        score_tolerance: the largest score (detector) or probability (classifier) difference allowed.
        overwrite: replace an existing --out file.
    """
    from training.saving import load_model

    if format not in FORMATS:
        raise BadValueError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if batch_size < 1 or check_images < 1:
        raise BadValueError(f"--batch_size and --check_images must be >= 1, got {batch_size} and {check_images}")
    _check_out(out, overwrite)
    if not os.path.isfile(ckpt_path):
        raise MissingFileError(f"--ckpt_path {ckpt_path}: no such file")
    module = load_model(ckpt_path, map_location="cpu").eval()
    make_adapter = getattr(module, "export_adapter", None)
    if make_adapter is None:
        raise BadValueError(f"{ckpt_path}: {type(module).__name__} has no export_adapter(); train.py export "
                            "exports litvision's detectors and classifier")
    adapter: ExportAdapter = make_adapter(batch_size=batch_size)
    images = data_images(data, check_images) if data is not None else adapter.generated_images(check_images)
    samples = batches(images, batch_size)
    metadata = {"litvision_source": os.path.basename(ckpt_path), "litvision_format": format,
                **adapter.metadata(data, format), "dynamic_dims": sorted(adapter.dynamic(format).values())}
    tolerances = {"boxes": box_tolerance, "scores": score_tolerance}
    result = _export_and_check(adapter, format, out, samples, metadata, tolerances)
    source = f"{len(images)} {'validation' if data is not None else 'generated'} image(s)"
    runner = "onnxruntime (CPU)" if format == "onnx" else "torch"
    print(f"export check, {runner} vs eager on {source}: {result.summary}: OK")
    print(f"wrote {out} ({format}, {os.path.getsize(out) / 1e6:.1f} MB)")
    return out


def _export_and_check(adapter: ExportAdapter, format: str, out: str, samples: list[Tensor], metadata: dict,
                      tolerances: dict) -> CheckResult:  # fmt: skip
    """Export into a temporary folder beside ``out``, check the file, then move it to ``out``; a file failing
    the check or its exporter is removed with the folder (both are this command's, not the user's)."""
    # In a new folder beside ``out``, under its name: archives are named after their file.
    workdir = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=os.path.dirname(os.path.abspath(out)))
    tmp = os.path.join(workdir, os.path.basename(out))
    try:
        try:
            EXPORTERS[format](adapter.graph(format), samples[0], tmp, adapter, metadata)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 -- an exporter's limit: said in one line with the format that works
            raise _cannot(metadata.get("model_class", "the model"), format, e, WORKS[format]) from e
        result = check_export(adapter, format, tmp, samples, tolerances)
        if not result.ok:
            raise ExportError(f"the exported {format} model does not reproduce the eager one, so {out} was not "
                              f"written: {result.summary}")
        os.replace(tmp, out)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
