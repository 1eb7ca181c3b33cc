"""Tracking down: a real MLflow server (loopback, SQLite store) is killed after the first logged step.
Training completes, its metrics stay in the run folder, `declip push-metrics` replays them into the
same store, and no secret from the environment reaches MLflow.

A dead server from the start is covered by tests/test_train.py (test_skip_policy_with_a_dead_mlflow_server_then_push)
and tests/test_tracking.py (test_dead_server_warns_once_then_push_replays_the_folder).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from faults import BIN, TINY, child_env, cli_sets, declip_cmd, free_port, overrides

pytestmark = pytest.mark.reliability

STEPS = 6
SECRETS = {"AWS_SECRET_ACCESS_KEY": "sekrit-aws-4711", "MLFLOW_TRACKING_TOKEN": "sekrit-token-4711"}


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise AssertionError(f"mlflow server at {url} did not answer in {timeout} s")


@pytest.fixture(scope="module")
def outage(tmp_path_factory, demo):
    base = tmp_path_factory.mktemp("outage")
    store, port = f"sqlite:///{base / 'm.db'}", free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", store, "--default-artifact-root", str(base / "artifacts"),
         "--no-serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=base, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    procs = [server]
    try:
        wait_until_up(url, server)
        run = base / "run"
        sets = cli_sets(overrides(demo, f"train.max_steps={STEPS}", "checkpoint.every_steps=100",
                                  "tracking.enabled=true", f"tracking.uri={url}", "tracking.experiment=outage"))  # fmt: skip
        t0 = time.monotonic()
        proc = subprocess.Popen(declip_cmd("train", "--config", str(TINY), *sets, "--out", str(run)), cwd=base,
                                env=child_env(**SECRETS), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        procs.append(proc)
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its uvicorn workers, mid-run
        server.communicate()
        out, _ = proc.communicate(timeout=300)
        train_s = time.monotonic() - t0
        assert proc.returncode == 0, out[-3000:]
        push = subprocess.run(declip_cmd("push-metrics", str(run), "--tracking-uri", store), cwd=base,
                              env=child_env(**SECRETS), capture_output=True, text=True, timeout=300)  # fmt: skip
        assert push.returncode == 0, push.stdout + push.stderr
        yield run, store, out, train_s
    finally:
        for p in procs:
            if p.poll() is None:
                if p is server:
                    os.killpg(p.pid, signal.SIGKILL)  # with its uvicorn workers
                else:
                    p.kill()
                p.communicate()


def test_training_outlives_the_server_and_push_loses_nothing(outage):
    run, store, out, train_s = outage
    from mlflow.tracking import MlflowClient

    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == STEPS and not summary["mlflow_synced"]
    assert "MLflow disabled for this run" in out and train_s < 120
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # the run folder kept every step
    assert not (run / "mlflow_unsynced").exists()  # cleared by the push

    client = MlflowClient(store)
    run_id = (run / "mlflow_run_id").read_text().strip()
    assert run_id == summary["mlflow_run_id"]  # the push continued the run the server had opened
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED"
    for key in {k for r in rows for k in r if k != "step"}:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(r["step"], pytest.approx(r[key])) for r in rows if key in r], key  # none lost, none twice
    assert {"config.yaml", "train.log", "train_summary.json"} <= {a.path for a in client.list_artifacts(run_id)}


def test_no_secret_reaches_mlflow(outage):
    run, store, _, _ = outage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    mlrun = client.get_run((run / "mlflow_run_id").read_text().strip())
    logged = [*mlrun.data.params.items(), *mlrun.data.tags.items(), *mlrun.data.metrics]
    assert len(mlrun.data.params) > 50  # the flattened config is there
    for name, value in SECRETS.items():
        assert not any(value in str(item) or name in str(item) for pair in logged for item in pair), name
        for artifact in ("config.yaml", "train.log", "train_summary.json"):
            assert value not in (Path(mlrun.info.artifact_uri) / artifact).read_text(), (name, artifact)
