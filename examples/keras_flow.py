"""The Keras workflow with litvision, as in a notebook: data, model, fit with callbacks, save, reload, predict.

    python examples/keras_flow.py        # ~2 minutes per epoch on 2 CPU cores; logs: tensorboard --logdir runs

The README's example is this file's code. The sizes below are module constants so that
tests/test_examples.py can run the same code shrunk.
"""

import lightning as L
import torch
from torchvision.transforms.v2.functional import to_dtype, to_image

from detectors.data import DetectionDataModule
from detectors.data.shapes import generate_shapes
from detectors.module import FasterRCNNModule
from training.callbacks import ModelCheckpoint, ReduceLROnPlateau
from training.images import find_images, load_image
from training.saving import load_model, save_model

DATA = "data/shapes"  # any COCO-layout folder; on Colab e.g. /content/drive/MyDrive/shapes
OUT = "runs/keras_flow"
NUM_TRAIN, NUM_VAL = 1000, 60  # images generated in DATA
IMAGE_SIZE = 192  # the detector's input side, pixels
EPOCHS = 2
STEPS_PER_EPOCH = None  # None: every training batch (250 of 4 images); an int: that many


def main() -> dict:
    """Train, save, reload and predict; returns what a test checks: both models and their detections on
    one image (``boxes: FloatTensor[N, 4]``, x1 y1 x2 y2, absolute pixels; ``scores``; ``labels`` 1..K)."""
    generate_shapes(DATA, num_train=NUM_TRAIN, num_val=NUM_VAL)  # reused when already there
    data = DetectionDataModule(DATA, batch_size=4)

    model = FasterRCNNModule(
        class_names=data.class_names,  # ["rectangle", "ellipse", "triangle"]
        backbone="mobilenet_v3_large_fpn",
        returned_layers=[2, 3, 5],  # stride 8, 16, 32 maps: small objects in small images
        anchor_sizes=[[16], [32], [64], [128]],  # one size per map (+ the FPN's pooled map)
        fpn_channels=64,  # a narrow FPN: ~3x faster steps on a CPU
        rpn_score_thresh=0.0,  # keep the proposals of an RPN trained from scratch
        min_size=IMAGE_SIZE, max_size=IMAGE_SIZE,
        optimizer="adamw", lr=1e-3, weight_decay=0.05,
    )

    trainer = L.Trainer(
        max_epochs=EPOCHS,
        limit_train_batches=STEPS_PER_EPOCH,
        default_root_dir=OUT,  # TensorBoard logs: OUT/lightning_logs/version_N
        callbacks=[
            ModelCheckpoint(f"{OUT}/best.ckpt", monitor="val_loss", save_best_only=True, verbose=1),
            ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=3, min_lr=1e-6, verbose=1),
        ],
    )
    trainer.fit(model, data)

    save_model(model, f"{OUT}/model.ckpt")  # Keras model.save
    reloaded = load_model(f"{OUT}/model.ckpt").eval()  # Keras load_model: no class name needed
    # load_model(f"{OUT}/best.ckpt") reloads the best epoch the same way.

    image_file = find_images(f"{DATA}/images/val")[0]
    image = to_dtype(to_image(load_image(image_file)), torch.float32, scale=True)  # [3, H, W] in 0..1
    with torch.no_grad():
        detections = reloaded([image])[0]  # {"boxes": [N, 4] x1 y1 x2 y2, "scores": [N], "labels": [N]}
        trained_detections = model.eval()([image])[0]
    print(f"{image_file}: {len(detections['boxes'])} detections, best score "
          f"{detections['scores'].max().item() if len(detections['scores']) else 0:.2f}")
    return {"model": model, "reloaded": reloaded, "detections": detections, "trained_detections": trained_detections}


if __name__ == "__main__":
    main()
