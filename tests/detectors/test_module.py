"""The detection LightningModules: tiny models, real torchvision detectors, no weights."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from detectors.data.datamodule import DetectionDataModule
from detectors.module import FasterRCNNModule, RetinaNetModule
from detectors.val_loss import VAL_LOSS_SEED, losses_and_detections, training_losses

CLASSES = ["rectangle", "ellipse", "triangle"]
TINY = dict(class_names=CLASSES, min_size=64, max_size=64, warmup_iters=2)


# Tiny convolutions: on a few shared cores, intra-op threads cost far more than they bring.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cls, **kw):
    torch.manual_seed(0)
    return cls(**{**TINY, "backbone": "resnet18_fpn", **kw})


MODULES = {
    "fasterrcnn": lambda: tiny(FasterRCNNModule, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                               box_batch_size_per_image=32),  # fmt: skip
    "retinanet": lambda: tiny(RetinaNetModule, group_norm_head=True),
}


def _trainer(**kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_fast_dev_run(name, shapes_dir):
    module = MODULES[name]()
    dm = DetectionDataModule(str(shapes_dir), batch_size=2, num_workers=0)
    trainer = _trainer(fast_dev_run=2)
    trainer.fit(module, dm)
    logged = trainer.callback_metrics
    for key in ("train_loss", "val_loss", "val_map", "val_map_50", "val_map_75", "val_mar_100",
                "val_map_small", "val_map_medium", "val_map_large", "val_ap/triangle"):  # fmt: skip
        assert key in logged, key
        assert logged[key].numel() == 1
    assert torch.isfinite(logged["val_loss"])


@pytest.mark.parametrize("name", MODULES)
def test_true_half_precision_is_refused_and_float64_runs(name):
    # `bf16-true` casts every weight, the heads' too: refused before any step, naming the mixed alternative.
    with pytest.raises(ValueError, match="use 'bf16-mixed'"):
        _trainer(fast_dev_run=1, precision="bf16-true").validate(MODULES[name](), [])
    # 64-true casts every weight (and the inputs) to float64: the heads, float32 under autocast, follow the
    # weights' dtype in validation and training.
    module = MODULES[name]().double().eval()
    images = [torch.rand(3, 64, 64, dtype=torch.float64)]
    targets = [{"boxes": torch.tensor([[4.0, 4, 30, 30]], dtype=torch.float64), "labels": torch.tensor([1])}]
    losses, (det,) = losses_and_detections(module.model, images, targets)
    assert det["boxes"].dtype == torch.float64 and all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(v) for v in training_losses(module.model.train(), images, targets).values())


def _shapes_batch(shapes_dir, n=2):
    dm = DetectionDataModule(str(shapes_dir), batch_size=n, num_workers=0, photometric=False, hflip_prob=0)
    dm.setup("validate")
    return next(iter(dm.val_dataloader()))


@pytest.mark.parametrize("name", MODULES)
def test_empty_targets_train(name):
    module = MODULES[name]()
    module.train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 64)]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "iscrowd": torch.zeros(0, dtype=torch.int64)}  # fmt: skip
    loss = module.training_step(((images[0], images[1]), (empty, dict(empty))), 0)
    assert torch.isfinite(loss)
    loss.backward()  # background-only images still give a classification signal
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", MODULES)
def test_loss_names_are_the_torchvision_loss_keys(name):
    # A DDP process with nothing to validate logs these names with weight 0: they must be what the model returns.
    module = MODULES[name]().train()
    target = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([2])}
    # in order, too: the epoch-end syncs pair the processes' logged values up by position
    assert tuple(module.model([torch.rand(3, 64, 64)], [target])) == module.loss_names


@pytest.mark.parametrize("name", MODULES)
def test_val_loss_pass_changes_no_state(name, shapes_dir):
    module = MODULES[name]()
    module.model.train()  # run some training steps first so BN stats are not at their initial values
    images, targets = _shapes_batch(shapes_dir)
    plain = [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in targets]
    module.model(list(images), plain)
    module.eval()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    flags = {n: m.training for n, m in module.named_modules()}
    rng = torch.get_rng_state()

    losses, detections = losses_and_detections(module.model, list(images), plain)

    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a parameter or buffer changed"
    assert flags == {n: m.training for n, m in module.named_modules()}
    assert torch.equal(rng, torch.get_rng_state())
    assert losses and all(torch.isfinite(v) for v in losses.values())
    # The detections are exactly what the eval-mode model returns.
    with torch.no_grad():
        reference = module.model(list(images))
    for ours, ref in zip(detections, reference, strict=False):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0)


def test_detections_beside_the_loss_are_the_eval_models_when_the_nms_is_shared(shapes_dir):
    """With equal pre-NMS proposal counts in both modes (the demo configs), the detections take their proposals
    from the loss' training-mode ones: still exactly what the eval-mode model returns."""
    from detectors.val_loss import _eval_proposals_from_training

    module = tiny(FasterRCNNModule, rpn_pre_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                  rpn_post_nms_top_n_train=50, rpn_post_nms_top_n_test=30, box_batch_size_per_image=32)  # fmt: skip
    assert _eval_proposals_from_training(module.model.rpn) == 30  # the shared path is the one tested
    images, targets = _shapes_batch(shapes_dir)
    plain = [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in targets]
    module.eval()
    losses, detections = losses_and_detections(module.model, list(images), plain)
    assert losses
    with torch.no_grad():
        reference = module.model(list(images))
    assert sum(len(d["boxes"]) for d in reference) > 0
    for ours, ref in zip(detections, reference, strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", MODULES)
def test_val_loss_equals_train_mode_loss_with_inference_layers(name, shapes_dir):
    """The loss is the mean over the images of torchvision's own train-mode loss of each image alone, computed
    with BN/Dropout in inference mode, each image's sampling (Faster R-CNN) seeded with VAL_LOSS_SEED."""
    module = MODULES[name]()
    images, targets = _shapes_batch(shapes_dir)
    plain = [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in targets]
    model = module.model
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    model.transform.eval()
    per_image = []
    for image, target in zip(images, plain, strict=True):
        torch.manual_seed(VAL_LOSS_SEED)  # the seed the val-loss pass samples each image from
        with torch.no_grad():
            per_image.append(model([image], [target]))
    expected = {k: sum(losses[k] for losses in per_image) / len(per_image) for k in per_image[0]}
    model.eval()
    for seed in (123, 7):  # whatever the global RNG state: val_loss depends on the weights and data only
        torch.manual_seed(seed)
        losses, _ = losses_and_detections(model, list(images), plain)
        assert expected.keys() == losses.keys()
        for k in expected:
            torch.testing.assert_close(losses[k], expected[k])


def test_crowd_boxes_are_left_out_of_the_loss():
    from detectors.module import _loss_targets

    t = {"boxes": torch.tensor([[0.0, 0, 5, 5], [1, 1, 9, 9]]), "labels": torch.tensor([1, 2]),
         "iscrowd": torch.tensor([0, 1])}  # fmt: skip
    (out,) = _loss_targets([t])
    assert out["labels"].tolist() == [1] and out["boxes"].tolist() == [[0, 0, 5, 5]]


def test_optimizer_holds_only_trainable_params_and_warmup_composes():
    module = tiny(FasterRCNNModule, optimizer="adamw", lr=0.1, warmup_iters=10, warmup_factor=0.1)
    for p in module.model.backbone.body.parameters():
        p.requires_grad_(False)
    [opt], [sched] = module.configure_optimizers()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.parameters() if p.requires_grad}
    assert isinstance(opt, torch.optim.AdamW) and sched["interval"] == "step"
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    opt.param_groups[0]["lr"] *= 0.5  # what ReduceLROnPlateau does
    for _ in range(10):
        opt.step()
        sched["scheduler"].step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # the reduction survives the warm-up


class _StubTrainer:
    def __init__(self, steps):
        self.estimated_stepping_batches = steps
        self.lr_scheduler_configs = []


def _configure_for(module, steps):
    """configure_optimizers, then train start (where the cosine gets the run's length), as Lightning calls them."""
    module.trainer = _StubTrainer(steps)
    [opt], scheds = module.configure_optimizers()
    module.trainer.lr_scheduler_configs = [SimpleNamespace(**config) for config in scheds]
    module.on_train_start()
    return opt, scheds


def test_cosine_decay_times_warmup_follows_the_hand_computed_schedule():
    """lr(t) = lr * (f + (1 - f) * min(t, W) / W) * (1 + cos(pi * t / T)) / 2, and a plateau halving in the
    middle halves everything after it."""
    lr, f, warm, total = 0.1, 0.1, 4, 20
    module = tiny(FasterRCNNModule, lr=lr, warmup_iters=warm, warmup_factor=f, cosine_decay=True)
    opt, scheds = _configure_for(module, total)
    assert [s["interval"] for s in scheds] == ["step", "step"]

    def expected(t):
        return lr * (f + (1 - f) * min(t, warm) / warm) * (1 + math.cos(math.pi * t / total)) / 2

    seen = [opt.param_groups[0]["lr"]]
    for t in range(1, total + 1):
        opt.step()
        for s in scheds:
            s["scheduler"].step()
        if t == 10:
            opt.param_groups[0]["lr"] *= 0.5  # ReduceLROnPlateau acting at step 10
        seen.append(opt.param_groups[0]["lr"])
    want = [expected(t) * (0.5 if t >= 10 else 1.0) for t in range(total + 1)]
    assert seen == pytest.approx(want, abs=1e-12)
    assert seen[-1] == pytest.approx(0.0, abs=1e-12)


def test_every_scheduler_logs_under_the_optimisers_name():
    """LearningRateMonitor names each scheduler of one optimiser apart (lr-SGD, lr-SGD-1, ...) unless named."""
    module = tiny(FasterRCNNModule, warmup_iters=4, warmup_factor=0.1, cosine_decay=True, lr_milestones=[1])
    _, scheds = _configure_for(module, 20)
    assert [s["interval"] for s in scheds] == ["step", "epoch", "step"]
    assert {s["name"] for s in scheds} == {"lr-SGD"}


def test_cosine_decay_needs_a_finite_run():
    module = tiny(FasterRCNNModule, cosine_decay=True)
    with pytest.raises(ValueError, match="max_epochs or max_steps"):
        _configure_for(module, float("inf"))


def test_missing_backbone_checkpoint_raises_or_warns(tmp_path):
    missing = str(tmp_path / "runs" / "pretrain" / "best.ckpt")
    with pytest.raises(FileNotFoundError, match="best.ckpt"):
        tiny(FasterRCNNModule, backbone_checkpoint=missing)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="does not exist"):
        warned = tiny(FasterRCNNModule, backbone_checkpoint=missing, if_checkpoint_missing="warn")
    plain = tiny(FasterRCNNModule)  # same seed: the body is left at its initial weights
    a, b = warned.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_num_classes_and_class_names_must_agree():
    with pytest.raises(ValueError, match="len\\(class_names\\) \\+ 1 = 4"):
        FasterRCNNModule(num_classes=3, class_names=CLASSES, backbone="resnet18_fpn")
    with pytest.raises(ValueError, match="num_classes"):
        RetinaNetModule(backbone="resnet18_fpn")


def test_hyperparameters_rebuild_the_architecture():
    module = tiny(RetinaNetModule, anchor_sizes=[16, 32, 64, 128, 256], detections_per_img=50)
    hp = dict(module.hparams)
    assert hp["class_names"] == CLASSES and hp["anchor_sizes"] == [16, 32, 64, 128, 256]
    assert hp["detections_per_img"] == 50 and module.model.detections_per_img == 50
    torch.manual_seed(1)
    rebuilt = RetinaNetModule(**hp)
    assert rebuilt.state_dict().keys() == module.state_dict().keys()
    assert all(a.shape == b.shape for a, b in zip(rebuilt.state_dict().values(), module.state_dict().values(), strict=False))


def test_backbone_checkpoint_initialises_the_body_from_a_classifier(tmp_path):
    from classifiers.module import FrozenBackboneClassifier
    from training.saving import save_model

    torch.manual_seed(5)
    clf = FrozenBackboneClassifier("resnet18", class_names=CLASSES, weights=None, freeze="none")
    with torch.no_grad():
        for p in clf.backbone.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "clf.ckpt"
    save_model(clf, path)
    det = tiny(FasterRCNNModule, backbone_checkpoint=str(path))
    body = det.model.backbone.body.state_dict()
    donor = clf.backbone.state_dict()
    assert body.keys() == donor.keys() and all(torch.equal(body[k], donor[k]) for k in body)
    with pytest.raises(ValueError, match="does not fit"):
        tiny(RetinaNetModule, backbone="mobilenet_v3_large_fpn", backbone_checkpoint=str(path))


def test_background_detections_are_dropped():
    from detectors.module import without_background

    det = {"boxes": torch.tensor([[0.0, 0, 4, 4], [1, 1, 5, 5]]), "scores": torch.tensor([0.9, 0.5]),
           "labels": torch.tensor([0, 2])}  # fmt: skip
    (out,) = without_background([det])
    assert out["labels"].tolist() == [2] and out["scores"].tolist() == [0.5] and out["boxes"].shape == (1, 4)


@pytest.mark.parametrize("name", MODULES)
def test_detections_stay_float32_under_bf16_autocast(name):
    module = MODULES[name]().eval()
    images = [torch.rand(3, 64, 64)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (det,) = module(images)
        losses, _ = losses_and_detections(module.model, images, [{"boxes": torch.tensor([[4.0, 4, 30, 30]]),
                                                                  "labels": torch.tensor([1])}])  # fmt: skip
    assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("name", MODULES)
def test_training_losses_are_the_models_own_in_float32(name, shapes_dir):
    module = MODULES[name]().train()
    images, targets = _shapes_batch(shapes_dir)
    plain = [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in targets]
    torch.manual_seed(5)  # Faster R-CNN samples anchors and proposals: both calls draw the same
    expected = module.model(list(images), plain)
    torch.manual_seed(5)
    losses = training_losses(module.model, list(images), plain)
    assert losses.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(losses[k], expected[k], rtol=0, atol=0)
    bad = [{"boxes": torch.tensor([[10.0, 10, 10, 30]]), "labels": torch.tensor([1])}]
    with pytest.raises(ValueError, match=r"target 0 .*no positive width"):
        training_losses(module.model, [torch.rand(3, 64, 64)], bad)


@pytest.mark.parametrize("name", MODULES)
def test_training_anchors_and_losses_are_float32_under_bf16_autocast(name, monkeypatch):
    # In bf16 torchvision builds anchors in the features' dtype and decodes boxes in the heads' output dtype:
    # integers above 256 lose bits (4-8 px steps at COCO sizes). Under autocast, what the box coding and the
    # losses see must be float32; RetinaNet's conv head itself may stay in bf16 (cast on output).
    module = MODULES[name]().train()
    model = module.model
    watched = ([model.anchor_generator] if name == "retinanet"
               else [model.rpn.anchor_generator, model.rpn.head, model.roi_heads.box_predictor])  # fmt: skip
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, i, out: dtypes.extend(
        t.dtype for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t))) for m in watched]  # fmt: skip
    head_dtypes = []
    if name == "retinanet":
        compute_loss = model.compute_loss

        def spy(targets, head_outputs, anchors):
            dtypes.extend(v.dtype for v in head_outputs.values())
            return compute_loss(targets, head_outputs, anchors)

        monkeypatch.setattr(model, "compute_loss", spy)
        hooks.append(model.head.register_forward_hook(lambda m, i, out: head_dtypes.extend(v.dtype for v in out.values())))
    target = {"boxes": torch.tensor([[4.0, 4, 30, 30]]), "labels": torch.tensor([1])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = training_losses(model, [torch.rand(3, 64, 64)], [target])
    for h in hooks:
        h.remove()
    assert dtypes and set(dtypes) == {torch.float32}
    if name == "retinanet":
        assert set(head_dtypes) == {torch.bfloat16}  # the convolutions kept autocast's speed
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("name", MODULES)
def test_channels_last_gives_the_same_losses_and_detections(name, shapes_dir, tmp_path):
    import pickle

    from training.saving import load_model, save_model

    images, targets = _shapes_batch(shapes_dir)
    plain = [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in targets]
    results = {}
    for channels_last in (False, True):
        module = tiny(FasterRCNNModule if name == "fasterrcnn" else RetinaNetModule, channels_last=channels_last,
                      score_thresh=0.0)  # fmt: skip
        module.eval()
        torch.manual_seed(7)
        results[channels_last] = losses_and_detections(module.model, list(images), plain)
    # module: the channels_last one
    convs = [m.weight for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs
               if w.shape[2:] != (1, 1))  # fmt: skip
    features = module.model.backbone(torch.rand(1, 3, 64, 64))
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features.values())
    (loss_a, det_a), (loss_b, det_b) = results[False], results[True]
    for k in loss_a:
        torch.testing.assert_close(loss_b[k], loss_a[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(det_a, det_b, strict=True):
        # An untrained head scores many boxes alike: rounding may swap ties, so compare the sorted scores.
        assert len(a["boxes"]) > 0
        torch.testing.assert_close(b["scores"].sort().values, a["scores"].sort().values, rtol=1e-4, atol=1e-5)
    pickle.dumps(module)  # the input hook is no lambda: DDP's spawn launcher pickles the module
    save_model(module, tmp_path / "m.ckpt")
    loaded = load_model(tmp_path / "m.ckpt")
    assert loaded.hparams.channels_last
    x = [torch.rand(3, 64, 64)]
    torch.testing.assert_close(loaded.eval()(x)[0]["scores"], module.eval()(x)[0]["scores"])


def test_backbone_lr_scale_gives_the_body_its_own_scaled_group():
    module = tiny(FasterRCNNModule, optimizer="sgd", lr=0.02, backbone_lr_scale=0.25, warmup_iters=0)
    [opt], _ = module.configure_optimizers()
    groups = {g["name"]: g for g in opt.param_groups}
    body = {id(p) for p in module.model.backbone.body.parameters() if p.requires_grad}
    rest = {id(p) for p in module.parameters() if p.requires_grad} - body
    assert {id(p) for p in groups["backbone"]["params"]} == body and body
    assert {id(p) for p in groups["heads"]["params"]} == rest and rest
    assert groups["backbone"]["lr"] == pytest.approx(0.005) and groups["heads"]["lr"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="backbone_lr_scale"):
        tiny(FasterRCNNModule, backbone_lr_scale=0.0)


def test_every_architecture_argument_reaches_build_detector():
    # DetectionModule passes its hyperparameters to build_detector by name: an architecture argument missing
    # from DETECTOR_ARGUMENTS would be dropped without a word.
    import inspect

    from detectors.models import DETECTOR_ARGUMENTS
    from detectors.module import DetectionModule

    module_only = {"self", "num_classes", "class_names", "backbone_checkpoint", "if_checkpoint_missing", "optimizer",
                   "lr", "momentum", "weight_decay", "backbone_lr_scale", "warmup_iters", "warmup_factor",
                   "lr_milestones", "lr_gamma", "cosine_decay", "compute_val_loss", "channels_last",
                   "detector_options", "kwargs"}  # fmt: skip
    for cls in (DetectionModule, FasterRCNNModule, RetinaNetModule):
        names = set(inspect.signature(cls.__init__).parameters) - module_only
        assert names and names <= DETECTOR_ARGUMENTS, names - DETECTOR_ARGUMENTS
