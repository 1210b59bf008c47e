"""The GPU check's summary: one rich table on the terminal, ``summary.json`` (everything, numbers included) and
``summary.md`` (the table, the failed checks' log ends, every command) in the results folder."""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

TAIL_LINES = 15
_STYLE = {"PASS": "green", "FAIL": "bold red", "SKIP": "yellow"}


def tail(log: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` non-empty lines of ``log`` (rich's progress redraws and blank lines left out)."""
    if not log.is_file():
        return []
    text = log.read_text(errors="replace").replace("\r", "\n")
    return [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]


def _environment(summary: dict) -> str:
    env = next((c for c in summary["checks"] if c["name"] == "env" and c["status"] == "PASS"), None)
    return env["text"] if env else "environment unknown (the env check did not pass)"


def _title(summary: dict) -> str:
    counts = {s: sum(c["status"] == s for c in summary["checks"]) for s in ("PASS", "FAIL", "SKIP")}
    return (f"GPU check ({summary['mode']}), {summary['started']}, {summary['wall_s']:.0f} s: "
            f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")


def table(summary: dict) -> Table:
    t = Table(title=_title(summary), caption=_environment(summary), box=box.SIMPLE_HEAVY, show_lines=False)
    t.add_column("check", no_wrap=True)
    t.add_column("result", no_wrap=True)
    t.add_column("s", justify="right", no_wrap=True)
    t.add_column("numbers, or why not")
    for c in summary["checks"]:
        t.add_row(c["name"], f"[{_STYLE[c['status']]}]{c['status']}[/]", f"{c['seconds']:.0f}",
                  c["reason"] or c["text"])
    return t


def print_summary(summary: dict, console: Console | None = None) -> None:
    console = console or Console(width=None if Console().is_terminal else 160)
    for c in summary["checks"]:
        if c["status"] == "FAIL" and c.get("log_tail"):
            console.print(f"\n[bold]{c['name']}[/]: the end of {c['log']}", highlight=False)
            console.print("\n".join(c["log_tail"]), markup=False, highlight=False)
    console.print()
    console.print(table(summary))
    console.print(f"results: {summary['results']} (summary.md, summary.json, logs/)", highlight=False)


def markdown(summary: dict) -> str:
    lines = [f"# {_title(summary)}", "", f"Machine: {_environment(summary)}", "",
             "| check | result | seconds | numbers, or why not |", "|---|---|---|---|"]  # fmt: skip
    for c in summary["checks"]:
        text = (c["reason"] or c["text"]).replace("|", "\\|")
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.0f} | {text} |")
    for c in summary["checks"]:
        if c["status"] == "FAIL" and c.get("log_tail"):
            lines += ["", f"## {c['name']}: the end of `{c['log']}`", "", "```", *c["log_tail"], "```"]
    lines += ["", "## Commands", ""]
    for c in summary["checks"]:
        lines += [f"- {c['name']}: {c['title']}"]
        lines += [f"  - `python train.py {' '.join(command)}`" for command in c["commands"]]
    return "\n".join(lines) + "\n"


def write_summary(results: Path, summary: dict) -> None:
    (results / "summary.json").write_text(json.dumps(summary, indent=1))
    (results / "summary.md").write_text(markdown(summary))
