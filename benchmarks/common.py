"""What every benchmark script shares: the machine line and the Markdown row appended to docs/performance.md."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

HEADER = "| date | benchmark | result | goal | machine | command |\n| --- | --- | --- | --- | --- | --- |"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores"


def command_line() -> str:
    return "python " + " ".join(sys.argv)


def append_row(path: Path, row: str) -> None:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "# Performance\n\nMeasured numbers, one row per benchmark run (appended by `benchmarks/*.py --append`).\n\n"
            + HEADER
            + "\n"
        )
    with open(path, "a") as f:
        f.write(row + "\n")


def report(name: str, result: str, goal: str, verdict: str, append: Path | None) -> None:
    """Print the row (and the goal's verdict) and append it to `append` when given."""
    row = f"| {datetime.date.today().isoformat()} | {name} | {result} | {goal} | {machine()} | `{command_line()}` |"
    print(HEADER)
    print(row)
    print(verdict)
    if append:
        append_row(append, row)
