"""Security: a checkpoint carrying a pickle payload is refused by every CLI verb that loads one (the
payload never runs), and the container does not run as root.

Covered elsewhere: the trainer's loader (tests/test_checkpoint.py::test_weights_only_refuses_pickled_code),
secrets kept out of MLflow (tests/reliability/test_tracking_outage.py::test_no_secret_reaches_mlflow), the
report escaping captions and config strings (tests/test_report.py::test_report_holds_the_table_plots_and_escaped_strings).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from faults import TINY, child_env, cli_sets, declip_cmd, overrides

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cli_refuses_a_pickle_payload(demo, tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "step": 1, "payload": Payload(marker)}, evil)
    commands = {
        "eval": ["eval", "--config", str(TINY), *cli_sets(overrides(demo)), "--checkpoint", str(evil),
                 "--out", str(tmp_path / "eval.json")],
        "convert-checkpoint": ["convert-checkpoint", str(evil), str(tmp_path / "out.safetensors")],
    }  # fmt: skip
    procs = {
        verb: subprocess.Popen(declip_cmd(*args), cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for verb, args in commands.items()
    }  # fmt: skip
    for verb, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (verb, err)
        assert f"declip {verb}: {evil}: refused to load: it holds pickled objects" in err
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "eval.json").exists() and not (tmp_path / "out.safetensors").exists()


def test_container_runs_as_an_unprivileged_user():
    lines = (REPO / "containers" / "ascend" / "Dockerfile").read_text().splitlines()
    users = [m.group(1) for line in lines if (m := re.match(r"^\s*USER\s+(\S+)", line, re.IGNORECASE))]
    assert users, "the Dockerfile sets no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    if user.isdigit():  # a numeric uid must be the one the image creates
        assert re.search(rf"useradd\b[^\n]*--uid {user}\b", "\n".join(lines)), user
