"""Run the GPU check's plan: each check in its own process (``bench.gpu_check.checks``) with its own timeout, one
after another, within a wall-clock budget; then the summary (``bench.gpu_check.summary``).

A check that fails, times out or crashes is recorded with its reason and the end of its log, and the next one
runs. A check whose prerequisite (``Check.needs``) failed or was skipped is skipped, and so is every check that
would start with less than ``MIN_START`` seconds of the budget left. No torch here: a broken CUDA set-up can only
break the check processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .plan import SCALES, Check, Plan, make_plan
from .summary import print_summary, tail, write_summary

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUDGET = 470  # seconds: 8 minutes less the start of the machine's Python
MIN_START = 20  # seconds: a check is not started with less of the budget left
SUMMARY_RESERVE = 5  # seconds kept for the summary


def check_command(plan: Plan, name: str, result: Path) -> list[str]:
    """The command of one check process."""
    command = [sys.executable, "-m", "bench.gpu_check.checks", name, "--mode", plan.scale.mode,
               "--work", str(plan.data.parent), "--runs", str(plan.runs), "--result", str(result)]  # fmt: skip
    return [*command, "--ddp"] if plan.ddp_on_cpu else command


def run_process(command: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run ``command`` in its own session, output to ``log``; on ``timeout`` kill its whole process group (the
    train.py runs it started and their workers). Returns (exit status, None on a timeout; seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        try:  # also what outlived a finished check: a killed run's loader workers hold GPU memory
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return code, time.monotonic() - start


def run_check(check: Check, command: list[str], results: Path, timeout: float) -> dict:
    """One check: its process, then its result file, or the reason it has none; failures get the log's end."""
    log, result_file = results / "logs" / f"{check.name}.log", results / "checks" / f"{check.name}.json"
    log.parent.mkdir(parents=True, exist_ok=True)
    code, seconds = run_process(command, log, timeout)
    if code is None:
        result = {"status": "FAIL", "reason": f"timed out after {timeout:.0f} s"}
    elif result_file.is_file():
        result = json.loads(result_file.read_text())
    else:
        result = {"status": "FAIL", "reason": f"the check process exited with status {code} and no result"}
    result.update(seconds=round(seconds, 1), log=str(log.relative_to(results)))
    if result["status"] == "FAIL":
        result["log_tail"] = tail(log)
    return result


def run_plan(checks: list[Check], command, results: Path, budget: float | None) -> list[dict]:
    """Every check in order (``command(check)``: its process' command line); prints a line as each ends."""
    deadline = time.monotonic() + budget if budget else None
    done: dict[str, dict] = {}
    for i, check in enumerate(checks, 1):
        base = {"name": check.name, "title": check.title, "commands": [list(c) for c in check.commands],
                "text": "", "reason": "", "numbers": {}, "seconds": 0.0}  # fmt: skip
        unmet = [n for n in check.needs if n in done and done[n]["status"] != "PASS"]
        left = deadline - time.monotonic() - SUMMARY_RESERVE if deadline else float(check.timeout)
        if unmet:
            result = {"status": "SKIP", "reason": f"needs {', '.join(unmet)}, which did not pass"}
        elif deadline and left < MIN_START:
            result = {"status": "SKIP", "reason": f"the {budget:.0f} s budget is spent"}
        else:
            result = run_check(check, command(check), results, min(check.timeout, left))
        done[check.name] = {**base, **result}
        print(f"[{i:2d}/{len(checks)}] {check.name:22s} {result['status']:4s} {done[check.name]['seconds']:6.1f} s  "
              f"{result.get('reason') or result.get('text', '')}", flush=True)
    return list(done.values())


def _results_folder(out: Path | None, stamp: str) -> Path:
    """--out, else $OUT (the device machine's folder that comes back), else runs/gpu_check/STAMP."""
    folder = out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "runs" / "gpu_check" / stamp)
    if (folder / "summary.json").exists():
        raise SystemExit(f"gpu_check: {folder / 'summary.json'} exists: an earlier check's results; give another "
                         "--out")
    return folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description="litvision's GPU check: fit (bf16, "
                                     "fp16, against a raw loop), validate, compare, kill and resume, DDP; one summary "
                                     "table (docs/benchmarks.md, 'GPU check').")  # fmt: skip
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="the same commands on the CPU at a tiny scale")
    mode.add_argument("--quick", action="store_true", help="half the steps and images")
    parser.add_argument("--out", type=Path, help="results folder (default: $OUT, else runs/gpu_check/TIMESTAMP)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "gpu_check" / "work",
                        help="generated data (kept for later runs) and each run's checkpoints (work/runs/TIMESTAMP)")
    parser.add_argument("--only", nargs="+", metavar="CHECK", help="run these checks, with env, data and the fits "
                        "whose checkpoints they read")  # fmt: skip
    parser.add_argument("--budget", type=float, help=f"wall-clock seconds for all checks (default {DEFAULT_BUDGET}; "
                        "none for --dry-run)")  # fmt: skip
    parser.add_argument("--ddp", action="store_true", help="--dry-run: run the 2-process check on the CPU too")
    parser.add_argument("--plan", action="store_true", help="print the checks and their commands, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    plan = make_plan(mode, args.work.resolve(), (args.work / "runs" / stamp).resolve(), ddp_on_cpu=args.ddp)
    checks = plan.checks()
    if args.only:
        unknown = set(args.only) - {c.name for c in checks}
        if unknown:
            raise SystemExit(f"gpu_check: no check named {', '.join(sorted(unknown))}; the checks: "
                             f"{', '.join(c.name for c in checks)}")
        chosen = {"env", "data", *args.only} | {r for c in checks if c.name in args.only for r in c.reads}
        checks = [c for c in checks if c.name in chosen]
    if args.plan:
        for c in checks:
            print(f"{c.name} ({c.timeout} s): {c.title}")
            for command in c.commands:
                print("    python train.py " + " ".join(command))
        print(f"estimated wall time of the whole {mode} plan at ~20 training images/s: {plan.estimate_seconds():.0f} s")
        return 0
    results = _results_folder(args.out, stamp).resolve()
    results.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else (None if mode == "dry-run" else DEFAULT_BUDGET)
    limit = f"a {budget:.0f} s budget" if budget else "no time budget"
    print(f"gpu_check {mode}: {len(checks)} checks, {limit}; results {results}, runs {plan.runs}", flush=True)
    started, start = datetime.now(timezone.utc), time.monotonic()
    done = run_plan(checks, lambda c: check_command(plan, c.name, results / "checks" / f"{c.name}.json"),
                    results, budget)  # fmt: skip
    summary = {"mode": mode, "scale": vars(SCALES[mode]), "started": started.isoformat(timespec="seconds"),
               "wall_s": round(time.monotonic() - start, 1), "budget_s": budget, "results": str(results),
               "runs": str(plan.runs), "data": str(plan.data), "checks": done}  # fmt: skip
    write_summary(results, summary)
    print_summary(summary)
    return 1 if any(c["status"] == "FAIL" for c in done) else 0
