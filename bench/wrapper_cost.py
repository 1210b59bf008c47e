"""What litvision's wrapper (LightningModule, Trainer, callbacks, loggers) costs against a plain torchvision loop on
the same model object, the same batches and the same machine, in one process: alternating rounds, medians, ratios.

    OMP_NUM_THREADS=1 python bench/wrapper_cost.py [fit validate predict rss help] [--configs faster_rcnn retinanet]

The models are the demo configs (configs/faster_rcnn.yaml, configs/retinanet.yaml), built by train.py's own CLI
(``LitvisionCLI(run=False)``: the config's callbacks, progress bar, TensorBoard + CSV loggers, gradient clipping)
with a random backbone (no ``backbone_checkpoint``, nothing downloaded), on a generated shapes set of the demo's
size (192 px, batch 4, 60 validation images). Batches are read once; both sides get the same list (data loading
is not timed on either side). Times are wall and CPU seconds of this process (all its threads: Lightning's
progress bar and loggers included); on cores other jobs share, the CPU time is the steadier of the two.

* fit: the median interval between consecutive training steps inside ``Trainer.fit`` against the median step of
  ``loss = sum(model(images, targets).values()); loss.backward(); clip_grad_norm_(10); opt.step()`` with the
  same fused AdamW. The raw rounds run between litvision's rounds, inside the same ``fit``.
* validate: ``Trainer.validate`` over the 60 images, with and without ``val_loss``, against
  ``model(images)`` in eval mode under ``torch.no_grad()``. "epoch" is the validation loop's run; "call" the
  whole ``Trainer.validate``. The metric's ``compute()`` at the epoch end is timed and reported apart, and
  left out of both.
* predict: ``Trainer.predict`` over the same 60 images against the same raw eval loop (speed ratio, raw / ours).
* rss: peak RSS while training ``--rss_steps`` steps and validating once (the raw side: the same steps and the
  raw eval loop), each side in a fresh process (RSS never shrinks); the peak restarts once the model is built.
* help: wall time of ``python train.py --help`` and of importing Lightning's CLI alone, medians of 5.

Results: docs/benchmarks.md, "Wrapper cost".
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def now() -> tuple[float, float]:
    """(wall, CPU) seconds. This process' CPU time (every thread of it: Lightning's progress-bar and logger threads
    included) barely depends on what else the shared cores run; the wall time does."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = now()
    return wall - start[0], cpu - start[1]


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def build(config: str, shapes: str, runs_dir: str, extra: tuple[str, ...] = ()):
    """(model, trainer, datamodule) as ``train.py fit --config configs/CONFIG.yaml`` builds them, offline."""
    from train import LitvisionCLI

    args = ["--config", str(REPO / "configs" / f"{config}.yaml"), "--data.init_args.root", shapes,
            "--data.init_args.generate", "false", "--data.init_args.num_workers", "0",
            "--model.init_args.backbone_checkpoint", "null", "--runs_dir", runs_dir, "--name", config, *extra]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds this script's arguments
    try:
        cli = LitvisionCLI(args=args, run=False, save_config_kwargs={"overwrite": True})
    finally:
        sys.argv = argv
    return cli.model, cli.trainer, cli.datamodule


def batches(datamodule, stage: str, count: int | None = None) -> list:
    """The first ``count`` batches of the stage's loader (the whole loader for None), read once."""
    datamodule.setup("fit" if stage == "train" else "validate")
    loader = datamodule.train_dataloader() if stage == "train" else datamodule.val_dataloader()
    out = []
    for batch in loader:
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out


def fixed_loader(items: list):
    """A DataLoader yielding ``items`` as they are (the same objects for both sides)."""
    from torch.utils.data import DataLoader

    return DataLoader(items, batch_size=None, shuffle=False, collate_fn=lambda x: x)


def raw_targets(targets) -> list[dict]:
    """Plain tensors, what torchvision trains on (the data's crowd regions: none in shapes)."""
    from torch import Tensor

    return [{"boxes": t["boxes"].as_subclass(Tensor), "labels": t["labels"]} for t in targets]


# -- fit ---------------------------------------------------------------------------------------------------------


def bench_fit(config: str, shapes: str, runs_dir: str, rounds: int, steps: int) -> dict[str, tuple[float, float]]:
    import torch
    from lightning.pytorch.callbacks import Callback

    model, trainer, datamodule = build(config, shapes, runs_dir, (
        "--trainer.max_steps", str(1 + rounds * steps), "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0"))  # fmt: skip
    train = batches(datamodule, "train", 1 + rounds * steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=model.hparams.lr, weight_decay=model.hparams.weight_decay, fused=True)
    clip = trainer.gradient_clip_val
    ours, raw = [], []

    def raw_round() -> None:
        detector = model.model.train()
        for images, targets in train[1 : 1 + steps]:
            start = now()
            loss = sum(detector(list(images), raw_targets(targets)).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            raw.append(since(start))

    class Alternate(Callback):
        """Times the interval between consecutive batch starts; runs a raw round every ``steps`` steps."""

        last = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.last is not None:
                ours.append(since(self.last))
            if batch_idx % steps == 0:
                with torch.enable_grad():
                    raw_round()
            self.last = now()

    trainer.callbacks.append(Alternate())
    trainer.fit(model, train_dataloaders=fixed_loader(train))
    return {"ours": medians(ours), "raw": medians(raw)}


# -- validate and predict ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def timed(obj, name: str, into: list):
    """Time every call of ``obj.name`` (an instance attribute shadowing the method) into ``into``."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = now()
        try:
            return original(*args, **kwargs)
        finally:
            into.append(since(start))

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        delattr(obj, name)


def raw_eval(detector, val: list) -> tuple[float, float]:
    import torch

    detector.eval()
    start = now()
    with torch.no_grad():
        for images, _ in val:
            detector(list(images))
    return since(start)


def minus(a: tuple[float, float], b: list[tuple[float, float]]) -> tuple[float, float]:
    return a[0] - sum(x[0] for x in b), a[1] - sum(x[1] for x in b)


def bench_eval(config: str, shapes: str, runs_dir: str, rounds: int) -> dict[str, tuple[float, float]]:
    """Medians (wall, CPU s) of the raw loop, of validate with/without val_loss (epoch and whole call, the
    metric's compute() apart) and of predict. Each round runs the four in turn, every other round backwards."""
    model, trainer, datamodule = build(config, shapes, runs_dir, ("--trainer.num_sanity_val_steps", "0"))
    val = batches(datamodule, "val")
    loader = fixed_loader(val)
    images_only = fixed_loader([images for images, _ in val])

    def validate(got: dict, with_loss: bool) -> None:
        model.hparams.compute_val_loss = with_loss
        loops, computes = [], []
        with timed(trainer.validate_loop, "run", loops), timed(model.val_metrics, "compute", computes):
            start = now()
            trainer.validate(model, dataloaders=loader, verbose=False)
            call = since(start)
        suffix = "_loss" if with_loss else ""
        got[f"epoch{suffix}"], got[f"call{suffix}"] = minus(loops[0], computes), minus(call, computes)
        got[f"compute{suffix}"] = minus(computes[0], [])

    def predict(got: dict) -> None:
        loops = []
        with timed(trainer.predict_loop, "run", loops):
            start = now()
            trainer.predict(model, dataloaders=images_only, return_predictions=True)
            got["predict_call"] = since(start)
        got["predict_loop"] = loops[0]

    def raw(got: dict) -> None:
        got["raw"] = raw_eval(model.model, val)

    parts = [raw, lambda got: validate(got, False), lambda got: validate(got, True), predict]
    times: dict[str, list[tuple[float, float]]] = {}
    for r in range(rounds + 1):  # round 0 warms up
        got: dict[str, tuple[float, float]] = {}
        for part in parts if r % 2 else parts[::-1]:
            part(got)
        for k, v in got.items():
            if r:
                times.setdefault(k, []).append(v)
    return {k: medians(v) for k, v in times.items()}


# -- peak RSS -----------------------------------------------------------------------------------------------------


def rss_child(side: str, config: str, shapes: str, runs_dir: str, steps: int) -> None:
    """One side's training in this (fresh) process; prints the peak RSS in MiB while it trains (the model is built
    and the batches are read before, alike on both sides)."""
    import torch

    model, trainer, datamodule = build(config, shapes, runs_dir, (
        "--trainer.max_steps", str(steps), "--trainer.num_sanity_val_steps", "0"))  # fmt: skip
    train = batches(datamodule, "train", steps)
    val = batches(datamodule, "val")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # Linux: the peak (VmHWM) restarts from the current RSS
        f.write("5")
    if side == "ours":
        trainer.fit(model, train_dataloaders=fixed_loader(train), val_dataloaders=fixed_loader(val))
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=model.hparams.lr, weight_decay=model.hparams.weight_decay, fused=True)
        detector = model.model
        for images, targets in train:
            detector.train()
            loss = sum(detector(list(images), raw_targets(targets)).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, trainer.gradient_clip_val)
            opt.step()
        raw_eval(detector, val)
    status = Path("/proc/self/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print(peak / 1024)


def bench_rss(config: str, shapes: str, runs_dir: str, steps: int, repeats: int = 2) -> dict[str, float]:
    peaks: dict[str, list[float]] = {"ours": [], "raw": []}
    for _ in range(repeats):
        for side in ("raw", "ours"):
            out = subprocess.run([sys.executable, __file__, "rss-child", "--side", side, "--configs", config,
                                  "--shapes", shapes, "--runs_dir", os.path.join(runs_dir, side),
                                  "--rss_steps", str(steps)], check=True, capture_output=True, text=True)  # fmt: skip
            peaks[side].append(float(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(v) for k, v in peaks.items()}


# -- start-up -----------------------------------------------------------------------------------------------------


def bench_help(runs: int = 5) -> tuple[float, float]:
    """Medians (s) of ``python train.py --help`` and of importing what its parser needs (Lightning, with torch,
    torchvision and torchmetrics), alternating."""
    commands = ([sys.executable, str(REPO / "train.py"), "--help"],
                [sys.executable, "-c", "import lightning.pytorch.cli"])  # fmt: skip
    times: list[list[float]] = [[], []]
    for _ in range(runs):
        for command, into in zip(commands, times, strict=True):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, cwd=REPO)
            into.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def ms(t: tuple[float, float]) -> str:
    return f"{t[0] * 1000:.0f} / {t[1] * 1000:.0f} (wall / CPU)"


def s2(t: tuple[float, float]) -> str:
    return f"{t[0]:.3f} / {t[1]:.3f}"


def ratio(a: tuple[float, float], b: tuple[float, float]) -> str:
    return f"{a[0] / b[0]:.3f} / {a[1] / b[1]:.3f} (wall / CPU)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", default=["fit", "validate", "rss", "help"],
                        choices=["fit", "validate", "predict", "rss", "help", "rss-child"],
                        help="validate also times predict")  # fmt: skip
    parser.add_argument("--configs", nargs="+", default=["faster_rcnn", "retinanet"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="fit: steps per round")
    parser.add_argument("--rss_steps", type=int, default=20)
    parser.add_argument("--shapes", help="a generated shapes set (default: one made for this run)")
    parser.add_argument("--runs_dir")
    parser.add_argument("--side", choices=["ours", "raw"])
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")  # Lightning's advice on workers and log intervals for these short runs
    if args.parts == ["rss-child"]:
        rss_child(args.side, args.configs[0], args.shapes, args.runs_dir, args.rss_steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        shapes = args.shapes
        if shapes is None and set(args.parts) - {"help"}:
            from detectors.data.shapes import generate_shapes

            shapes = os.path.join(tmp, "shapes")
            generate_shapes(shapes, num_train=1 + args.rounds * args.steps * 4 + args.rss_steps * 4, num_val=60,
                            voc=False, classification=False)  # fmt: skip
        runs = args.runs_dir or os.path.join(tmp, "runs")
        import torch

        print(f"{torch.get_num_threads()} thread(s); medians of {args.rounds} rounds")
        for config in args.configs:
            if "fit" in args.parts:
                t = bench_fit(config, shapes, runs, args.rounds, args.steps)
                print(f"{config} fit step (ms): litvision {ms(t['ours'])}, raw {ms(t['raw'])}, "
                      f"ratio {ratio(t['ours'], t['raw'])}", flush=True)
            if "validate" in args.parts or "predict" in args.parts:
                t = bench_eval(config, shapes, runs, args.rounds)
                raw = t["raw"]
                print(f"{config}, 60 images (s, wall / CPU): raw eval forward {s2(raw)}; the metric's compute(), "
                      f"left out below: {s2(t['compute'])}", flush=True)
                for k in ("epoch", "call", "epoch_loss", "call_loss"):
                    print(f"  validate {k:11s} {s2(t[k])}  ratio {ratio(t[k], raw)}")
                for k in ("predict_loop", "predict_call"):
                    print(f"  {k:20s} {s2(t[k])}  speed (raw / litvision) {ratio(raw, t[k])}", flush=True)
            if "rss" in args.parts:
                m = bench_rss(config, shapes, runs, args.rss_steps)
                print(f"{config} peak RSS ({args.rss_steps} steps + a validation): litvision {m['ours']:.0f} MiB, "
                      f"raw {m['raw']:.0f} MiB, ratio {m['ours'] / m['raw']:.3f}", flush=True)
    if "help" in args.parts:
        whole, imports = bench_help()
        print(f"python train.py --help: {whole:.2f} s; import lightning.pytorch.cli alone: {imports:.2f} s "
              "(medians of 5)")


if __name__ == "__main__":
    main()
