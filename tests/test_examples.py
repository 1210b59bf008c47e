"""examples/keras_flow.py runs shrunk, in-process, and is the code the README shows."""

import importlib.util
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "keras_flow.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("keras_flow", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keras_flow_trains_saves_reloads_and_predicts(tmp_path, monkeypatch, one_thread):
    flow = _load_example()
    shrunk = dict(DATA=str(tmp_path / "shapes"), OUT=str(tmp_path / "run"), NUM_TRAIN=8, NUM_VAL=4,
                  IMAGE_SIZE=64, EPOCHS=2, STEPS_PER_EPOCH=2)  # fmt: skip
    for name, value in shrunk.items():
        monkeypatch.setattr(flow, name, value)
    torch.manual_seed(0)
    result = flow.main()

    out = tmp_path / "run"
    for name in ("best.ckpt", "last.ckpt", "model.ckpt"):  # Keras-named best, Lightning's last, model.save
        assert (out / name).is_file(), name
    assert list((out / "lightning_logs").glob("version_0/events.out.tfevents.*")), "no TensorBoard log"
    assert result["model"].trainer.global_step == 4  # 2 epochs x 2 steps
    trained, reloaded = result["model"].state_dict(), result["reloaded"].state_dict()
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained)
    ours, theirs = result["detections"], result["trained_detections"]
    assert len(ours["boxes"]) > 0, "no detections: the comparison below would prove nothing"
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    assert ours["boxes"].shape[1] == 4 and set(ours["labels"].tolist()) <= {1, 2, 3}


def test_the_readme_shows_the_example_code():
    """Every line of the README's Python example is a line of examples/keras_flow.py, in the same order."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    shown = [line.strip() for line in block.splitlines() if line.strip()]
    source = iter(line.strip() for line in EXAMPLE.read_text().splitlines())
    missing = [line for line in shown if not any(line == s for s in source)]
    assert not missing, f"README lines not in {EXAMPLE.name} (or out of order): {missing}"
