"""Workflow interruption: `snakemake` is interrupted during the train rule (Ctrl-C: SIGINT to its whole
process group), then the same command with `--rerun-incomplete` resumes training from the last
checkpoint, not from step 0.

Why the checkpoints survive: the train rule declares only `train_summary.json` as its output
(workflow/rules/train.smk); Snakemake deletes the declared outputs of an interrupted or failed job,
never `checkpoints/` beside them.

Runs the real Snakefile from the repository (like tests/test_demo_e2e.py) up to the demo's
`train_summary.json`, with results, resources and the MLflow store in a temporary folder, a pre-made
48-record demo world and a tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults import child_env, children, overrides

from declip.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]
STEPS = 40


@pytest.mark.slow
def test_interrupted_train_rule_resumes_from_its_checkpoint(demo, tmp_path, reaper):
    results, resources = tmp_path / "results", tmp_path / "resources"
    shutil.copytree(demo, resources / "demo_dataset")  # the make_demo_data outputs exist: the rule is skipped
    tiny = [o for o in overrides(demo) if not o.startswith(("data.dataset_dir=", "tracking."))]
    extra = [*tiny, f"train.max_steps={STEPS}", "checkpoint.every_steps=1", "train.eval_every=0"]
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--nolock", "--rerun-incomplete",
           str(results / "demo" / "train_summary.json"), "--config", f"results_dir={results}",
           f"resources_dir={resources}", f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
           f"train_overrides=[{', '.join(extra)}]"]  # fmt: skip
    run = results / "demo"
    latest, metrics = run / "checkpoints" / "latest.pt", run / "metrics.jsonl"

    first = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)  # fmt: skip
    reaper.append(first)
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3 and latest.exists()):
        assert first.poll() is None, first.communicate()[0][-5000:]
        assert time.monotonic() < deadline, "training did not reach step 3"
        time.sleep(0.05)
    trainer = [p for p in children(first.pid) if b"declip\x00train\x00" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert trainer, "the train rule is not running"
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the terminal
    out, _ = first.communicate(timeout=120)
    assert first.returncode != 0, out[-3000:]
    assert not (run / "train_summary.json").exists()
    step = int(load_checkpoint(latest)["step"])
    assert 1 <= step < STEPS and list((run / "checkpoints").iterdir()) == [latest], out[-3000:]

    second = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    log = (run / "train.log").read_text()
    assert f"resumed from {latest} at step {step} (" in log  # not from step 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == STEPS
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps.count(1) == 1 and steps[-(STEPS - step) :] == list(range(step + 1, STEPS + 1))
