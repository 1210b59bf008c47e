"""bench/gpu_check.sh: its plan parses through train.py, its pieces do what the summary says, and its dry run (the
same commands on the CPU at a tiny scale) passes every check.

Fast: every command line of the GPU plan parses (``--print_config``; compare and shapes through their own
parsers) with the values the plan means; the raw loop trains and leaves the model and RNG as they were; the
summary's speed figures from hand-made timings; the orchestrator records failures, timeouts and skips and runs
on past them; the shell script runs the orchestrator. Slow: the plan's models are torchvision's R50-FPN
detectors; a fit timed against the raw loop trains the same model as one without it; the raw loop under
16-mixed (GradScaler); the dry run itself, and its 2-process check on 2 gloo CPU processes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from bench.gpu_check.orchestrate import run_plan
from bench.gpu_check.plan import R50_FPN, Check, make_plan
from bench.gpu_check.speed import RawLoop, speed_summary
from tests.test_resume_shipped import assert_same, fit_args

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def printed_config(argv) -> dict:
    """``train.py ARGV --print_config``, in this process: the parsed config (a parse error fails the test)."""
    from train import main

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main([*argv, "--print_config"])
    assert stop.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


def test_every_command_of_the_gpu_plan_parses_with_the_values_it_means(tmp_path, monkeypatch):
    from train import COMMANDS
    from training.cli import command_parser

    monkeypatch.chdir(REPO)  # the plan names configs/*.yaml from the repository root, as the script runs
    monkeypatch.setattr(sys, "argv", ["train.py"])
    plan = make_plan("full", tmp_path, tmp_path / "runs")
    parsed = 0
    for check in plan.checks():
        for command in check.commands:
            if command[0] in ("shapes", "compare"):
                parser, _ = command_parser(command[0], COMMANDS[command[0]])
                args = parser.parse_args(list(command[1:]))
                if command[0] == "compare":
                    assert (args.device, args.precision) == ("cuda", "bf16")
                    assert args.data.init_args.root == str(plan.data) and len(args.checkpoints) == 2
                else:
                    assert (args.height, args.width, args.num_train) == (800, 800, 256)
                parsed += 1
                continue
            config = printed_config(command)
            model, trainer = config["model"]["init_args"], config["trainer"]
            assert model["backbone"] == "resnet50_fpn" and model["min_size"] == model["max_size"] == 800
            assert trainer["accelerator"] == "gpu"
            assert config["data"]["init_args"]["root"] == str(plan.data)
            if check.name.startswith("fit_"):
                assert trainer["precision"] == ("16-mixed" if check.name.endswith("_16") else "bf16-mixed")
                speed = [c for c in trainer["callbacks"] if c["class_path"].endswith("RawLoopAlternation")]
                assert speed[0]["init_args"]["block"] == plan.scale.block
            if check.name == "ddp":
                devices = 1 if "ddp_validate_1" in command else 2
                assert (str(trainer["devices"]), trainer["strategy"]) == (str(devices), "ddp" if devices == 2 else "auto")
            if command[0] == "validate":
                assert config["ckpt_path"].endswith("last.ckpt")
            parsed += 1
    assert parsed == 13  # env has none; data 1, fits 4, validate 2, compare 1, killed and resumed 2, ddp 3


@pytest.mark.slow  # four R50-FPN models built
@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet"])
def test_the_plan_models_are_torchvisions_r50_fpn_detectors(detector):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn

    from detectors.module import FasterRCNNModule, RetinaNetModule

    cls, builder = {"faster_rcnn": (FasterRCNNModule, fasterrcnn_resnet50_fpn),
                    "retinanet": (RetinaNetModule, retinanet_resnet50_fpn)}[detector]  # fmt: skip
    config = yaml.safe_load((REPO / "configs" / f"{detector}.yaml").read_text())["model"]["init_args"]
    ours = cls(class_names=["a", "b", "c"], **{**config, **R50_FPN[detector]}).model
    theirs = builder(weights=None, weights_backbone=None, num_classes=4)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    if detector == "faster_rcnn":  # torchvision's proposal counts, not the CPU demo's halved ones
        assert ours.rpn._pre_nms_top_n == theirs.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
        assert ours.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    else:
        assert ours.anchor_generator.sizes == theirs.anchor_generator.sizes
        assert ours.anchor_generator.aspect_ratios == theirs.anchor_generator.aspect_ratios


def _tiny_detector_and_loader():
    from detectors.data.samples import collate_detection
    from detectors.module import FasterRCNNModule

    def sample(i: int):
        image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i))
        return image, {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1 + i % 3]),
                       "iscrowd": torch.zeros(1, dtype=torch.int64), "image_id": i}  # fmt: skip

    torch.manual_seed(0)
    module = FasterRCNNModule(class_names=["a", "b", "c"], backbone="mobilenet_v3_large_fpn", min_size=64,
                              max_size=64, fpn_channels=32, box_representation_size=64, rpn_post_nms_top_n_train=100,
                              box_batch_size_per_image=32).train()  # fmt: skip
    loader = torch.utils.data.DataLoader([sample(i) for i in range(6)], batch_size=2, collate_fn=collate_detection)
    return module, loader


# CPU float16 convolutions are slow (4 s for these 2 steps): the GradScaler path is the slow case.
@pytest.mark.parametrize("precision", ["bf16-mixed", pytest.param("16-mixed", marks=pytest.mark.slow)])
def test_the_raw_loop_trains_and_leaves_the_model_and_rng_as_they_were(precision, one_thread):
    module, loader = _tiny_detector_and_loader()
    trainer = SimpleNamespace(precision=precision, gradient_clip_val=10.0, estimated_stepping_batches=10,
                              datamodule=SimpleNamespace(train_dataloader=lambda: loader))  # fmt: skip
    loop = RawLoop(trainer, module)
    before, rng = {k: v.clone() for k, v in module.state_dict().items()}, torch.get_rng_state()
    block = loop.run(2)
    assert block["images"] == 4 and block["finite"] and block["seconds"] > 0
    assert_same(before, dict(module.state_dict()))
    assert torch.equal(rng, torch.get_rng_state())
    loop.step(next(iter(loader)))  # outside run(): the step's update stays
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("model.roi_heads.box_predictor") for k in changed)
    assert (loop.scaler is not None) == (precision == "16-mixed")


@pytest.mark.slow  # two fits
def test_a_fit_timed_against_the_raw_loop_trains_the_same_model(shapes_dir, tmp_path, train_py, monkeypatch,
                                                                one_thread):  # fmt: skip
    # Faster R-CNN samples anchors and ROIs from the RNG: a raw block that left it advanced would change the fit.
    monkeypatch.chdir(tmp_path)
    speed = {"class_path": "bench.gpu_check.speed.RawLoopAlternation",
             "init_args": {"out": str(tmp_path / "speed.json"), "block": 1, "rounds": 1}}  # fmt: skip
    runs = {}
    for name, extra in (("plain", []), ("timed", ["--trainer.callbacks+", json.dumps(speed)])):
        runs[name] = tmp_path / name
        code, out, err = train_py(*fit_args("faster_rcnn", shapes_dir, runs[name], 1), *extra)
        assert code == 0, err[-3000:]
    plain, timed = (torch.load(r / "faster_rcnn" / "checkpoints" / "last.ckpt", weights_only=True) for r in
                    runs.values())  # fmt: skip
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "global_step"):
        assert_same(plain[key], timed[key], key)
    timings = json.loads((tmp_path / "speed.json").read_text())
    assert [b["images"] for b in timings["litvision"]] == [2, 2] and [b["images"] for b in timings["raw"]] == [2]
    assert timings["precision"] == "32-true" and timings["raw"][0]["finite"]


def test_speed_summary_takes_medians_of_the_alternated_rounds_after_the_warm_up():
    def block(seconds: float, images: int = 8) -> dict:
        return {"seconds": seconds, "images": images, "finite": True}

    timings = {"litvision": [block(9.0), block(1.0), block(2.0), block(1.0), block(0.5)],
               "raw": [block(5.0), block(1.0), block(1.6), block(0.8)]}  # fmt: skip
    summary = speed_summary(timings)
    # Rounds 2-4 (round 1 is the warm-up); the last litvision block was not alternated.
    assert summary["litvision_ips"] == 8.0  # median of 8, 4, 8
    assert summary["raw_ips"] == 8.0  # median of 8, 5, 10
    assert summary["time_ratio"] == pytest.approx(1.25)  # median of 1.0, 1.25, 1.25
    assert summary["litvision_all_ips"] == 8.0  # median of 8, 4, 8, 16
    assert summary["rounds"] == 3
    with pytest.raises(ValueError, match="no timed round"):
        speed_summary({"litvision": [block(1.0)], "raw": [block(1.0)]})


def test_the_orchestrator_records_failures_timeouts_and_skips_and_runs_on(tmp_path):
    passed = "open(sys.argv[1], 'w').write(json.dumps({'status': 'PASS', 'reason': '', 'text': 'fine', 'numbers': {}}))"
    codes = {"crash": "print('loading the model'); print('boom: out of memory'); sys.exit(3)",
             "hang": "print('waiting', flush=True); time.sleep(600)", "needy": passed, "after": passed}  # fmt: skip
    checks = [Check("crash", "exits 3", 60), Check("hang", "never ends", 1), Check("needy", "needs crash", 60,
              ("crash",)), Check("after", "runs anyway", 60)]  # fmt: skip

    def command(check: Check) -> list[str]:  # a check process: writes its result file, or fails to
        code = f"import json, sys, time\n{codes[check.name]}"
        return [sys.executable, "-c", code, str(tmp_path / "checks" / f"{check.name}.json")]

    (tmp_path / "checks").mkdir()
    results = {r["name"]: r for r in run_plan(checks, command, tmp_path, budget=None)}
    assert results["crash"]["status"] == "FAIL"
    assert results["crash"]["reason"] == "the check process exited with status 3 and no result"
    assert results["crash"]["log_tail"] == ["loading the model", "boom: out of memory"]
    assert (results["hang"]["status"], results["hang"]["reason"]) == ("FAIL", "timed out after 1 s")
    assert results["hang"]["log_tail"] == ["waiting"]
    assert (results["needy"]["status"], results["needy"]["reason"]) == ("SKIP", "needs crash, which did not pass")
    assert (results["after"]["status"], results["after"]["text"]) == ("PASS", "fine")
    # With less budget left than a check needs to start, it is skipped, not started.
    late = run_plan([Check("after", "runs anyway", 60)], command, tmp_path, budget=1)
    assert late[0]["status"] == "SKIP" and "budget" in late[0]["reason"]


def test_the_script_runs_the_orchestrator_with_the_given_python(tmp_path):
    def plan(*args) -> tuple[list[str], str]:
        env = {**os.environ, "LITVISION_PYTHON": sys.executable}
        out = subprocess.run(["bash", str(SCRIPT), "--plan", "--work", str(tmp_path), *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        return [line.split(" (")[0] for line in lines if not line.startswith((" ", "estimated"))], out.stdout

    names, printed = plan()
    assert names == [c.name for c in make_plan("full", tmp_path, tmp_path).checks()]
    assert printed.count("python train.py fit --config configs/") == 4 + 2 + 1  # fits, kill + resume, DDP
    # --only adds env, data and the fits whose checkpoints the chosen checks read, in the plan's order.
    assert plan("--only", "compare")[0] == ["env", "data", "fit_faster_rcnn_bf16", "fit_retinanet_bf16", "compare"]


def _metric(run: Path, key: str) -> float:
    with (run / "version_0" / "metrics.csv").open(newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)][-1]


@pytest.mark.slow
def test_the_dry_run_passes_every_check(tmp_path):
    env = {**os.environ, "LITVISION_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "results"), "--work",
                          str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stdout[-5000:]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    status = {c["name"]: c["status"] for c in summary["checks"]}
    assert status.pop("ddp") == "SKIP" and set(status.values()) == {"PASS"}, summary
    assert "fit_faster_rcnn_bf16" in out.stdout and "PASS" in out.stdout  # the table
    runs = Path(summary["runs"])
    # What the checks claim, read back independently: the killed and resumed run ended at 2 epochs x 2 steps,
    for run, steps in (("kill_resume", 4), ("fit_faster_rcnn_bf16", 4), ("fit_retinanet_16", 4)):
        assert torch.load(runs / run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == steps
    # validate scored the fit's checkpoint as the fit's own last validation did,
    for detector in ("faster_rcnn", "retinanet"):
        assert _metric(runs / f"validate_{detector}", "val_map") == _metric(runs / f"fit_{detector}_bf16", "val_map")
    # the fits were timed against the raw loop, and compare reported both models.
    timings = json.loads((runs / "fit_retinanet_bf16" / "gpu_check_speed.json").read_text())
    assert len(timings["raw"]) == 2 and len(timings["litvision"]) == 4
    assert timings["precision"] == "32-true"  # the dry run's runs are float32: CPU bf16 varies from run to run
    report = json.loads((runs / "compare" / "comparison.json").read_text())
    assert len(report["models"]) == 2 and all(m["throughput_ips"] > 0 for m in report["models"])
    assert (tmp_path / "results" / "summary.md").read_text().count("| PASS |") == len(status)


@pytest.mark.slow
def test_the_dry_run_ddp_check_on_two_cpu_processes(tmp_path):
    env = {**os.environ, "LITVISION_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--ddp", "--only", "ddp", "--out", str(tmp_path / "r"),
                          "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True,
                         timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stdout[-5000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert [c["status"] for c in summary["checks"]] == ["PASS", "PASS", "PASS"]  # env, data, ddp
    runs = Path(summary["runs"])
    one, two = (_metric(runs / f"ddp_validate_{n}", "val_map") for n in (1, 2))
    assert one == two == _metric(runs / "ddp_fit", "val_map")
