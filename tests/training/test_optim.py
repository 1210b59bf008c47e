"""build_optimizer: PyTorch's fused SGD/AdamW where Lightning allows it, the same updates as the loop version."""

import pytest
import torch
from lightning.pytorch.plugins.precision.amp import _optimizer_handles_unscaling

from training.errors import UsageError
from training.optim import build_optimizer


def groups():
    torch.manual_seed(0)
    body, head = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)], [torch.nn.Parameter(torch.randn(4))]
    for p in body + head:
        p.grad = torch.randn_like(p)
    return [{"params": body, "lr": 0.003}, {"params": head}]


OLD_TORCH = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 4)  # no fused CPU kernels


@pytest.mark.skipif(OLD_TORCH, reason="fused CPU optimisers need torch >= 2.4")
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_steps_equal_the_loop_implementation(name):
    ours, reference = groups(), groups()
    opt = build_optimizer(name, ours, lr=0.01, momentum=0.9, weight_decay=0.05)
    assert opt.defaults["fused"] and [g["lr"] for g in opt.param_groups] == [0.003, 0.01]
    cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    ref = cls(reference, lr=0.01, weight_decay=0.05, **({"momentum": 0.9} if name == "sgd" else {}))
    assert not ref.defaults.get("fused")
    for _ in range(3):
        opt.step()
        ref.step()
    flat = [[p for g in gs for p in g["params"]] for gs in (ours, reference, groups())]
    for a, b, before in zip(*flat, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert (a - before).abs().min() > 1e-4  # every element moved: the comparison is not vacuous


@pytest.mark.skipif(OLD_TORCH, reason="fused CPU optimisers need torch >= 2.4")
def test_not_fused_under_mixed_precision_where_lightning_would_refuse_gradient_clipping():
    for precision in ("32-true", "bf16-true", None):
        assert _optimizer_handles_unscaling(build_optimizer("adamw", groups(), 0.01, 0.9, 0.0, precision))
    for precision in ("16-mixed", "bf16-mixed", 16):
        opt = build_optimizer("adamw", groups(), 0.01, 0.9, 0.0, precision)
        assert not opt.defaults.get("fused") and not _optimizer_handles_unscaling(opt)
    with pytest.raises(ValueError, match="optimizer='adam'") as info:
        build_optimizer("adam", groups(), 0.01, 0.9, 0.0)
    assert isinstance(info.value, UsageError)
