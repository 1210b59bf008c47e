"""litvision entry point: ``python train.py fit|validate|test|predict --config configs/X.yaml`` (LightningCLI),
plus the commands of ``COMMANDS``. Installed as the ``litvision`` console script.

training.cli holds what any model family's command line does (run folders, resuming, usage errors); this file
adds what knows the families: the detectors' prediction files and the model's classes taken from the data.
The Keras-style callbacks are part of every run and configured under their own keys::

    checkpoint:    # training.callbacks.ModelCheckpoint (Keras ModelCheckpoint)
      filepath: runs/faster_rcnn/checkpoints/best.ckpt
      save_best_only: true
    lr_plateau:    # training.callbacks.ReduceLROnPlateau (Keras ReduceLROnPlateau)
      patience: 3
      factor: 0.5
"""

from __future__ import annotations

import os

from training import cli
from training.cli import Command

# `python train.py NAME --help` shows each function's arguments; modules are imported only when one runs.
COMMANDS = {
    "evaluate": Command("detectors.evaluation:evaluate_command",
                        "score a COCO results file against COCO ground truth (pycocotools-exact)"),
    "shapes": Command("detectors.data.shapes:shapes_command",
                      "generate the embedded shapes dataset (COCO, VOC and classification layouts)"),
    "demo": Command("training.demo:run_demo",
                    "the main job on the embedded data: shapes, both detectors, their comparison, the classifier"),
    "layers": Command("classifiers.backbones:layers_command",
                      "list a classifier backbone's layers in the order freeze=N counts them",
                      nested="model"),  # the classifier config's own keys: --model.backbone resnet50
    "export": Command("training.export:export_command",
                      "export a detector or classifier to ONNX, ExportedProgram or TorchScript, checked against it",
                      classes={"data": "lightning:LightningDataModule"}),
    "compare": Command("detectors.compare:compare_command",
                       "compare detector checkpoints on one split: metrics, bootstrap CIs, speed, plots",
                       several=("checkpoints",), classes={"data": "lightning:LightningDataModule"}),
}  # fmt: skip


class LitvisionCLI(cli.TrainingCLI):
    """training.cli.TrainingCLI for litvision's detectors and classifier: the model's classes come from the
    data, and ``predict`` on a detector writes COCO results (detectors.predict.CocoPredictionWriter)."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        # predict (detectors): CocoPredictionWriter's settings; other subcommands ignore them.
        parser.add_argument("--predict_out", type=str | None, default=None,
                            help="predict: folder for predictions.json; default RUNS_DIR/NAME/predictions")
        parser.add_argument("--draw", type=bool, default=False,
                            help="predict: also write PREDICT_OUT/images/*.jpg with the detections drawn")
        parser.add_argument("--draw_score_threshold", type=float, default=0.5,
                            help="predict: only detections scoring at least this are drawn")  # fmt: skip
        # The model learns its classes from the data (detectors and classifier alike).
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def extra_callbacks(self) -> list:
        """``predict`` on a detector writes ``predictions.json`` (COCO results) and optionally drawn images."""
        if self.subcommand != "predict":
            return []
        from detectors.module import DetectionModule
        from detectors.predict import CocoPredictionWriter

        if not isinstance(self.model, DetectionModule):
            return []
        sub = self._sub()
        out = sub["predict_out"] or os.path.join(self.run_dir(), "predictions")
        return [CocoPredictionWriter(out, sub["draw"], sub["draw_score_threshold"])]


def main(argv: list[str] | None = None) -> None:
    cli.main(LitvisionCLI, COMMANDS, argv)


if __name__ == "__main__":
    main()
