"""Docs that are generated from code stay in sync with it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_config_doc_lists_every_key_with_its_default():
    table = subprocess.run(
        [sys.executable, "-m", "declip", "config-doc"], capture_output=True, text=True, check=True
    ).stdout
    assert table.strip() in (ROOT / "docs/config.md").read_text(), "regenerate docs/config.md with `declip config-doc`"
