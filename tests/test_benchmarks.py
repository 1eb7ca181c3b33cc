"""benchmarks/run_all.py --quick runs end to end and writes every section's table (no timing assertions)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("Training step", "Step optimisations", "Peak memory", "Data pipeline", "Scaling", "Communication at scale")


def test_run_all_quick_writes_every_section(tmp_path):
    out = tmp_path / "perf.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("\n## run_all: ") and "--quick" in text and "Machine: " in text
    headings = re.findall(r"^### (.+)$", text, flags=re.M)
    assert headings == list(SECTIONS)
    for body in re.split(r"^### .+$", text, flags=re.M)[1:]:
        assert re.search(r"^\| --- \|", body, flags=re.M), body  # each section holds a Markdown table
    # the counted bytes of the 2-process run equal the formula (a count, not a timing)
    row = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    for measured, formula in re.findall(r"([\d.]+) [KM]iB \(formula ([\d.]+)\)", row):
        assert measured == formula, row
    assert all(f"| {w} | {w * 128:,} |" in text for w in (8, 32, 128))
