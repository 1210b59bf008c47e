"""FrozenBackboneClassifier: Keras-style freezing, GAP + Dense head, staged unfreezing, detector backbones."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from torch import nn

from classifiers.backbones import describe_layers, leaf_layers
from classifiers.data import ImageFolderDataModule
from classifiers.finetuning import UnfreezeBackbone
from classifiers.module import FrozenBackboneClassifier


def tiny(**kw):
    torch.manual_seed(0)
    return FrozenBackboneClassifier(**{"backbone": "resnet18", "num_classes": 3, "weights": None, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 2)):
        for name, colour in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                noise = torch.randint(-20, 20, (3,), generator=gen).tolist()
                Image.new("RGB", (24, 20), tuple(max(0, min(255, c + d)) for c, d in zip(colour, noise, strict=True))).save(
                    root / split / name / f"{i}.png"
                )
    return root


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)  # fmt: skip


def _dm(folder, **kw):
    return ImageFolderDataModule(str(folder / "train"), str(folder / "val"), image_size=(32, 32), batch_size=6,
                                 num_workers=0, **kw)  # fmt: skip


def test_freeze_n_freezes_exactly_the_first_n_layers():
    model = tiny(freeze=7)
    # Independent enumeration: leaf modules of the backbone in named_modules() order.
    leaves = [n for n, m in model.backbone.named_modules() if n and len(list(m.children())) == 0]
    assert [n for n, _ in leaf_layers(model.backbone)] == leaves  # ResNet has no parameter-owning containers
    assert leaves[:7] == ["conv1", "bn1", "relu", "maxpool", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu"]
    modules = dict(model.backbone.named_modules())
    for i, name in enumerate(leaves):
        for p in modules[name].parameters():
            assert p.requires_grad == (i >= 7), name
    assert all(p.requires_grad for p in model.head.parameters())
    assert model.frozen == set(leaves[:7])


def test_freeze_by_prefix_and_all():
    model = tiny(freeze=["conv1", "layer1"])
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.backbone.named_parameters() if n.startswith(("conv1.", "layer1."))}
    assert all(p.requires_grad for n, p in model.backbone.named_parameters() if n.startswith("layer10"[:6] + "2"))
    assert not any(p.requires_grad for p in tiny(freeze="all").backbone.parameters())
    with pytest.raises(ValueError, match="match no layer"):
        tiny(freeze=["layer9"])
    with pytest.raises(ValueError, match="has 50 layers"):
        tiny(freeze=51)


def test_convnext_layer_scale_is_a_layer_too():
    model = FrozenBackboneClassifier("convnext_tiny", num_classes=2, weights=None, freeze="all")
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_gap_dense_head_shape_and_keras_init():
    model = tiny(num_classes=5, freeze="all")
    out = model(torch.rand(4, 3, 40, 56))
    assert out.shape == (4, 5)
    fc = model.head.fc
    assert isinstance(model.head.pool, nn.AdaptiveAvgPool2d) and fc.in_features == 512
    bound = math.sqrt(6 / (512 + 5))  # Glorot uniform limit
    assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.9 * bound
    assert fc.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert torch.count_nonzero(fc.bias) == 0


def test_bn_momentum_reaches_every_backbone_batchnorm():
    default = FrozenBackboneClassifier("mobilenet_v3_large", num_classes=3, weights=None, freeze="none")
    norms = [m for m in default.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and {m.momentum for m in norms} == {0.01}  # torchvision's MobileNetV3 (Keras' 0.99)
    model = FrozenBackboneClassifier("mobilenet_v3_large", num_classes=3, weights=None, freeze="none",
                                     bn_momentum=0.1)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {m.momentum for m in norms} == {0.1}
    model.train()
    x = torch.rand(2, 3, 32, 32) * 4 + 1
    first = norms[0]
    before = first.running_mean.clone()
    model(x)
    batch_mean = model.backbone[0][0]((x - model.mean) / model.std).mean(dim=(0, 2, 3))
    assert torch.allclose(first.running_mean, 0.9 * before + 0.1 * batch_mean, atol=1e-5)  # PyTorch's update rule
    with pytest.raises(ValueError, match="bn_momentum"):
        tiny(num_classes=3, bn_momentum=0.0)


def test_frozen_batchnorm_statistics_do_not_move(folder):
    frozen = tiny(freeze="all", lr=0.01)
    before = {k: v.clone() for k, v in frozen.backbone.state_dict().items()}
    _trainer(max_epochs=1, limit_val_batches=0).fit(frozen, _dm(folder))
    after = frozen.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    frozen.train()
    assert all(not m.training for m in frozen.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    # The same run with a trainable backbone does move them, so the check above can fail.
    free = tiny(freeze="none", lr=0.01)
    _trainer(max_epochs=1, limit_val_batches=0).fit(free, _dm(folder))
    assert not torch.equal(before["bn1.running_mean"], free.backbone.state_dict()["bn1.running_mean"])


def test_optimizer_holds_only_trainable_parameters():
    model = tiny(freeze=20)
    opt = model.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(in_opt) < len(list(model.parameters()))


class HalveLR(Callback):
    """Stands in for ReduceLROnPlateau: halves the head LR at the end of epoch 1."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            for g in trainer.optimizers[0].param_groups:
                g["lr"] *= 0.5


def test_unfreeze_at_epoch_adds_a_group_with_the_lower_lr(folder):
    model = tiny(freeze="all", lr=0.01, optimizer="sgd")
    seen = {}

    class Spy(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen[trainer.current_epoch] = [g["lr"] for g in trainer.optimizers[0].param_groups]

    unfreeze = UnfreezeBackbone(unfreeze_at_epoch=3, layers=["layer4"], lr_factor=0.1)
    _trainer(max_epochs=3, limit_val_batches=0, callbacks=[HalveLR(), unfreeze, Spy()]).fit(model, _dm(folder))
    assert seen[0] == [0.01] and seen[1] == [0.005]
    assert seen[2] == pytest.approx([0.005, 0.0005])  # new group at 0.1 x the (already reduced) head LR
    groups = model.trainer.optimizers[0].param_groups
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.backbone.layer4.parameters()}
    assert all(p.requires_grad for p in model.backbone.layer4.parameters())
    assert not any(p.requires_grad for p in model.backbone.layer3.parameters())
    assert model.backbone.layer4[0].bn1.training and not model.backbone.layer3[0].bn1.training


def test_backbone_from_a_detector_checkpoint_is_copied_exactly(tmp_path):
    from detectors.module import FasterRCNNModule
    from training.saving import save_model

    torch.manual_seed(3)
    detector = FasterRCNNModule(class_names=["a", "b"], backbone="resnet18_fpn", min_size=64, max_size=64)
    with torch.no_grad():
        for p in detector.model.backbone.body.parameters():
            p.add_(torch.randn_like(p))  # make it unlike any fresh initialisation
    path = tmp_path / "detector.ckpt"
    save_model(detector, path)
    clf = tiny(backbone_checkpoint=str(path))
    body = detector.model.backbone.body.state_dict()
    ours = clf.backbone.state_dict()
    assert body.keys() == ours.keys()
    assert all(torch.equal(body[k], ours[k]) for k in body)
    with pytest.raises(ValueError, match="does not fit resnet34"):
        FrozenBackboneClassifier("resnet34", num_classes=3, weights=None, backbone_checkpoint=str(path))
    with pytest.warns(UserWarning, match="does not exist"):
        tiny(backbone_checkpoint=str(tmp_path / "nope.ckpt"), if_checkpoint_missing="warn")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        tiny(backbone_checkpoint=str(tmp_path / "nope.ckpt"))


def test_fast_dev_run_logs_accuracy(folder):
    model = tiny(freeze="all", class_names=["blue", "green", "red"], num_classes=None)
    trainer = _trainer(fast_dev_run=1)
    trainer.fit(model, _dm(folder))
    for key in ("train_loss", "val_loss", "val_acc", "val_acc/red"):
        assert key in trainer.callback_metrics
    assert model.confusion_matrix.shape == (3, 3)


def test_datamodule_holds_out_a_stratified_split(folder):
    dm = ImageFolderDataModule(str(folder / "train"), val_root=None, val_split=0.5, num_workers=0)
    dm.setup("fit")
    assert dm.class_names == ["blue", "green", "red"]
    val_labels = [dm.val_set.dataset.labels[i] for i in dm.val_set.indices]
    assert sorted(val_labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not set(dm.val_set.indices) & set(dm.train_set.indices)


def test_describe_layers_marks_frozen():
    model = tiny(freeze=3)
    rows = describe_layers(model.backbone, model.frozen)
    assert rows[0][:3] == (0, "conv1", "Conv2d") and rows[0][3] == 64 * 3 * 7 * 7 and rows[0][4]
    assert rows[2][4] and not rows[3][4]  # freeze=3: conv1, bn1, relu
