"""training.export's family-free parts: sample batches, the interleaved latency rounds, metadata reading, and
`train.py export` refusing a model without an export adapter (the detectors' and classifier's exports:
tests/detectors/test_export.py, tests/classifiers/test_export.py)."""

from __future__ import annotations

import zipfile

import pytest
import torch

from tests.training.tiny_lightning import ScriptedModule
from training.errors import BadFileError
from training.export import batches, median_latency_ms, read_metadata
from training.saving import save_model


def test_batches_fill_the_last_batch_and_resize_to_the_first_image():
    a, b, c = torch.zeros(3, 4, 6), torch.ones(3, 8, 12), torch.full((3, 4, 6), 2.0)
    out = batches([a, b, c], 2)
    assert [tuple(x.shape) for x in out] == [(2, 3, 4, 6), (2, 3, 4, 6)]
    assert torch.equal(out[0][1], torch.ones(3, 4, 6))  # a constant image resized stays that constant
    assert torch.equal(out[1][0], c) and torch.equal(out[1][1], c)  # filled up with its first image
    assert [tuple(x.shape) for x in batches([a, b, c], 1)] == [(1, 3, 4, 6), (1, 3, 8, 12), (1, 3, 4, 6)]


def test_latency_rounds_interleave_the_runtimes_on_the_same_batch():
    calls = []
    runs = {name: (lambda x, name=name: calls.append((name, int(x[0])))) for name in ("eager", "onnxruntime")}
    result = median_latency_ms(runs, [torch.tensor([0]), torch.tensor([1])], rounds=3, warmup=1)
    assert calls == [("eager", 0), ("onnxruntime", 0), ("eager", 1), ("onnxruntime", 1), ("eager", 0),
                     ("onnxruntime", 0), ("eager", 1), ("onnxruntime", 1)]  # fmt: skip
    assert set(result) == {"eager", "onnxruntime"} and all(v >= 0 for v in result.values())


def test_an_archive_without_litvision_metadata_is_a_bad_file(tmp_path):
    path = tmp_path / "other.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("other/data.pkl", b"")
    with pytest.raises(BadFileError, match="no litvision.json in the archive"):
        read_metadata(path)


def test_a_model_without_an_export_adapter_is_refused_in_one_line(tmp_path, train_py):
    ckpt = tmp_path / "tiny.ckpt"
    save_model(ScriptedModule(), ckpt)
    code, _, err = train_py("export", "--ckpt_path", ckpt, "--out", tmp_path / "tiny.onnx")
    assert code == 2
    assert err.strip().splitlines()[-1] == (f"error: {ckpt}: ScriptedModule has no export_adapter(); train.py export "
                                            "exports litvision's detectors and classifier")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.ckpt"]
