import json
import socket
import time
import warnings

import pytest

from declip.config import TrackingConfig, load_config, save_config
from declip.tracking import Tracker, end_run, push_run_dir, read_metrics, start_parent_run


def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens once the socket is closed


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the cwd
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DECLIP_MLFLOW_PARENT_RUN_ID", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_metrics_params_artifacts_and_resume_into_the_same_run(tmp_path, store):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = TrackingConfig(uri=store, experiment="exp")
    tracker = Tracker(run_dir, cfg, "r1")
    tracker.log_params({"train.batch_size": 4, "devices": 2})
    tracker.log_metrics({"loss": 2.5, "lr": 1e-4}, step=10)
    (run_dir / "train.log").write_text("hello\n")
    tracker.log_artifact(run_dir / "train.log")
    tracker.finish("FINISHED")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert tracker.run_id == run_id and tracker.synced

    resumed = Tracker(run_dir, cfg, "r1")  # a resumed training continues the same MLflow run
    resumed.log_params({"train.batch_size": 4, "devices": 2})
    resumed.log_metrics({"loss": 2.0}, step=20)
    assert resumed.run_id == run_id
    run = client(store).get_run(run_id)
    assert run.data.params == {"train.batch_size": "4", "devices": "2"}
    assert [(m.step, m.value) for m in client(store).get_metric_history(run_id, "loss")] == [(10, 2.5), (20, 2.0)]
    assert [a.path for a in client(store).list_artifacts(run_id)] == ["train.log"]
    assert read_metrics(run_dir) == [{"step": 10, "loss": 2.5, "lr": 1e-4}, {"step": 20, "loss": 2.0}]


def test_other_ranks_write_nothing(tmp_path, store):
    tracker = Tracker(tmp_path, TrackingConfig(uri=store), "r", enabled=False)
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert list(tmp_path.iterdir()) == [] and tracker.run_id is None


def test_child_of_a_workflow_parent_run(tmp_path, store, monkeypatch):
    cfg = TrackingConfig(uri=store, experiment="wf")
    parent = start_parent_run(cfg, "workflow", {"target": "demo"})
    monkeypatch.setenv("DECLIP_MLFLOW_PARENT_RUN_ID", parent)
    tracker = Tracker(tmp_path, TrackingConfig(uri=store, experiment="other"), "child")
    end_run(parent, "FINISHED", cfg)
    child, parent_run = client(store).get_run(tracker.run_id), client(store).get_run(parent)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.info.experiment_id == parent_run.info.experiment_id  # the parent's experiment
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["target"] == "demo"


def test_dead_server_warns_once_then_push_replays_the_folder(tmp_path, store):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config(None, ["name=offline", f"tracking.uri={closed_port_uri()}", "tracking.experiment=late"])
    save_config(cfg, run_dir / "config.yaml")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker(run_dir, cfg.tracking, cfg.name)
        tracker.log_params({"a": 1})
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.finish("FINISHED")
    assert time.perf_counter() - t0 < 10
    assert [str(w.message) for w in caught if "MLflow disabled" in str(w.message)] != []
    assert len([w for w in caught if "MLflow" in str(w.message)]) == 1  # warned once
    assert not tracker.synced and (run_dir / "mlflow_unsynced").is_file()
    (run_dir / "train_summary.json").write_text(json.dumps({"device_type": "cpu", "devices": 1}))

    run_id = push_run_dir(run_dir, uri=store)
    assert push_run_dir(run_dir, uri=store) == run_id  # idempotent: no duplicate metrics
    c = client(store)
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    run = c.get_run(run_id)
    assert run.data.params["name"] == "offline" and run.data.params["device_type"] == "cpu"
    assert run.info.status == "FINISHED" and c.get_experiment(run.info.experiment_id).name == "late"
    assert sorted(a.path for a in c.list_artifacts(run_id)) == ["config.yaml", "train_summary.json"]
    assert not (run_dir / "mlflow_unsynced").exists()
