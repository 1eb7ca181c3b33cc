"""Run tracking: `metrics.jsonl` in the run folder always, MLflow on rank 0 when it can be reached.

MLflow never stops training. The URI is `tracking.uri`, else $MLFLOW_TRACKING_URI, else
`sqlite:///mlflow.db` (relative to the working directory, MLflow's own default store). An HTTP
server is probed with a plain socket first (MLflow's client would retry for minutes); when it is
down, or any MLflow call fails later, one warning is printed, MLflow is dropped for the rest of the
run and the folder is marked `mlflow_unsynced`. `declip push-metrics RUN_DIR` (`push_run_dir`)
replays the folder into MLflow afterwards.

The MLflow run id lives in `RUN_DIR/mlflow_run_id`, so a resumed training continues the same run.
With $DECLIP_MLFLOW_PARENT_RUN_ID set (the workflow's parent run), the run is created as its child
in the parent's experiment. Params are the flattened config, device, world size and versions; never
environment variables. `mlflow` is imported lazily: it takes seconds.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from declip.config import TrackingConfig, flatten, load_config

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_ENV = "DECLIP_MLFLOW_PARENT_RUN_ID"
RUN_ID_FILE, UNSYNCED_FILE, METRICS_FILE = "mlflow_run_id", "mlflow_unsynced", "metrics.jsonl"
ARTIFACTS = ("config.yaml", "train_summary.json", "train.log")


def resolve_uri(uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def reachable(uri: str, timeout_s: float = 2.0) -> bool:
    """A TCP connect to an http(s) tracking server; other stores (sqlite, files) count as reachable."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _client(uri: str):
    # Bounded retries: the client's default retries an HTTP call for minutes. setdefault keeps the user's values.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import torchvision

    try:
        declip_version = version("declip-pipeline")
    except PackageNotFoundError:
        declip_version = "unknown"
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "declip": declip_version,
    }


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def _open_run(client, run_dir: Path, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """The run recorded in `run_dir` when the store has it, else a new one (a child of the parent run when
    $DECLIP_MLFLOW_PARENT_RUN_ID is set); the id is written to `run_dir/mlflow_run_id`."""
    id_file = run_dir / RUN_ID_FILE
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            client.get_run(run_id)
            return run_id
        except Exception:  # another store, or a deleted run: start a new one
            pass
    tags = dict(tags or {})
    exp_id = None
    if parent := os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = parent
        exp_id = client.get_run(parent).info.experiment_id
    run = client.create_run(exp_id or _experiment_id(client, experiment), tags=tags, run_name=run_name)
    id_file.write_text(run.info.run_id + "\n")
    return run.info.run_id


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def _metrics(values: dict[str, float], step: int, timestamp_ms: int) -> list:
    from mlflow.entities import Metric

    return [Metric(k, float(v), timestamp_ms, step) for k, v in values.items() if math.isfinite(float(v))]


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Log the params the run does not have yet (a resumed run keeps its first values; MLflow refuses changes)."""
    have = client.get_run(run_id).data.params
    todo = _params({k: v for k, v in params.items() if k not in have})
    for i in range(0, len(todo), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=todo[i : i + 100])


class Tracker:
    """Metrics of one training run. Construct on every rank; only `enabled` (rank 0) writes anything."""

    def __init__(self, run_dir: Path, cfg: TrackingConfig, run_name: str, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.uri = resolve_uri(cfg.uri)
        self.client, self.run_id, self.warned = None, None, False
        if not (enabled and cfg.enabled):
            return
        if not reachable(self.uri):
            self._drop(f"tracking server {self.uri} is unreachable")
            return
        try:
            self.client = _client(self.uri)
            self.run_id = _open_run(self.client, self.run_dir, cfg.experiment, run_name)
        except Exception as e:
            self._drop(f"{type(e).__name__}: {e}")

    @property
    def synced(self) -> bool:
        return self.client is not None

    def _drop(self, reason: str) -> None:
        """Stop using MLflow for this run: warn once, mark the folder for `declip push-metrics`."""
        self.client = None
        (self.run_dir / UNSYNCED_FILE).write_text(reason + "\n")
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"MLflow disabled for this run ({reason}); metrics stay in {self.run_dir / METRICS_FILE}. "
                f"Push them later with: declip push-metrics {self.run_dir}",
                stacklevel=3,
            )

    def _call(self, method: str, *args, **kwargs) -> None:
        """`self.client.method(*args)` when MLflow is on for this run; a failure drops MLflow, never raises."""
        if not self.enabled or self.client is None:
            return
        try:
            getattr(self.client, method)(*args, **kwargs)
        except Exception as e:
            self._drop(f"{type(e).__name__}: {e}")

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled and self.client is not None:
            try:
                _log_params(self.client, self.run_id, params)
            except Exception as e:
                self._drop(f"{type(e).__name__}: {e}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self._call("log_batch", self.run_id, metrics=_metrics(metrics, step, int(time.time() * 1000)))

    def log_artifact(self, path: Path) -> None:
        if Path(path).is_file():
            self._call("log_artifact", self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        """End the MLflow run with `status` (FINISHED, FAILED, KILLED)."""
        self._call("set_terminated", self.run_id, status)


# ---------------------------------------------------------------- after an outage, and workflow parent runs


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl`; a torn last line (killed mid-write) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def push_run_dir(run_dir: Path, uri: str | None = None) -> str:
    """Replay a run folder into MLflow: params, every metric of `metrics.jsonl` not yet in the run,
    artifacts and the final status. Returns the run id (also written to `run_dir/mlflow_run_id`)."""
    from declip.errors import InputError

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise InputError(f"{run_dir / 'config.yaml'}: not found; is {run_dir} a training run folder?")
    cfg = load_config(run_dir / "config.yaml")
    client = _client(resolve_uri(uri or cfg.tracking.uri))
    run_id = _open_run(client, run_dir, cfg.tracking.experiment, cfg.name)
    summary_path = run_dir / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    params = flatten(cfg.to_dict())
    params.update({k: summary[k] for k in ("device_type", "devices") if k in summary})
    params.update({f"version.{k}": v for k, v in summary.get("versions", {}).items()})
    _log_params(client, run_id, params)
    rows = read_metrics(run_dir)
    have = {
        (key, m.step)
        for key in {k for row in rows for k in row if k != "step"}
        for m in client.get_metric_history(run_id, key)
    }
    now = int(time.time() * 1000)
    todo = [
        m for row in rows for m in _metrics({k: v for k, v in row.items() if k != "step"}, row["step"], now)
        if (m.key, m.step) not in have
    ]  # fmt: skip
    for i in range(0, len(todo), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=todo[i : i + 1000])
    for name in ARTIFACTS:
        if (run_dir / name).is_file():
            client.log_artifact(run_id, str(run_dir / name))
    if summary:
        client.set_terminated(run_id, "FINISHED")
    (run_dir / UNSYNCED_FILE).unlink(missing_ok=True)
    return run_id


def start_parent_run(cfg: TrackingConfig, name: str, tags: dict[str, str] | None = None) -> str | None:
    """Open a workflow-level parent run; export its id as $DECLIP_MLFLOW_PARENT_RUN_ID for the child
    trainings. None (with a warning) when MLflow is unreachable: the workflow goes on without it."""
    uri = resolve_uri(cfg.uri)
    if not reachable(uri):
        warnings.warn(f"MLflow tracking server {uri} is unreachable; no parent run", stacklevel=2)
        return None
    try:
        client = _client(uri)
        return client.create_run(_experiment_id(client, cfg.experiment), tags=tags or {}, run_name=name).info.run_id
    except Exception as e:
        warnings.warn(f"MLflow parent run not created ({type(e).__name__}: {e})", stacklevel=2)
        return None


def end_run(run_id: str, status: str = "FINISHED", cfg: TrackingConfig | None = None) -> None:
    """Set a run's final status (FINISHED, FAILED, KILLED); best-effort, like everything here."""
    uri = resolve_uri(cfg.uri if cfg else None)
    if not reachable(uri):
        warnings.warn(f"MLflow tracking server {uri} is unreachable; run {run_id} left open", stacklevel=2)
        return
    try:
        _client(uri).set_terminated(run_id, status)
    except Exception as e:
        warnings.warn(f"MLflow run {run_id} not ended ({type(e).__name__}: {e})", stacklevel=2)
