"""The README's two setup commands are the ones CI and the workflow really use."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    demo, tests = commands
    assert demo.startswith("bash scripts/install.sh &&") and "snakemake" in demo
    assert tests.startswith("bash scripts/install.sh --dev &&") and "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci_lines == [quick_start_commands()[1]]


def test_demo_command_runs_the_default_target():
    demo = quick_start_commands()[0]
    snakefile = (ROOT / "Snakefile").read_text()
    # No explicit target: Snakemake runs the first rule, which must be `demo`.
    assert not re.search(r"snakemake\b.*\b(perf|full)_\dp\b", demo)
    first_rule = re.search(r"^rule (\w+):", snakefile, re.M).group(1)
    assert first_rule == "demo"
