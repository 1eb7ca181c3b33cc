import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from ports import free_port

from declip.config import load_config
from declip.errors import InputError
from declip.tracking import push_run_dir
from declip.train.checkpoint import load_checkpoint
from declip.train.loop import INJECT_ENV, NonFiniteLossError, train
from declip.train.optim import lr_at

TINY = Path(__file__).resolve().parents[1] / "config" / "declip_tiny.yaml"
SUMMARY_KEYS = {"steps", "devices", "device_type", "global_batch", "fps", "data_time_fraction", "final_losses",
                "wall_time_s", "replaced_samples", "mode", "precision", "versions", "rank"}  # fmt: skip
STEP_METRICS = {"loss", "mvs", "nns", "simsiam", "mlm", "i2t_top1", "nn_bank_fill", "lr", "logit_scale", "fps",
                "data_time", "replaced_samples"}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from declip.data.demo import make_demo_data

    root = tmp_path_factory.mktemp("train_data")
    make_demo_data(root / "demo", seed=0, n_train=48, n_val_per_class=1, progress=False)
    return root / "demo"


def overrides(data: Path, *extra: str, eda: bool = False) -> list[str]:
    return [
        "model.vision_layers=1", "model.text_layers=1", "model.vision_width=32", "model.text_width=32",
        "model.embed_dim=32", "model.vision_heads=2", "model.text_heads=2", "model.simsiam_dim=32",
        "model.simsiam_pred_dim=16", "model.image_size=32", "loss.nn_bank_size=64", f"data.dataset_dir={data}",
        "data.workers=0", f"data.eda={str(eda).lower()}", "train.batch_size=4", "train.log_every=1",
        "train.eval_every=0", "train.perf_warmup_steps=1", "checkpoint.keep_every_steps=0",
        "tracking.enabled=false", *extra,
    ]  # fmt: skip


def cfg_for(data, *extra):
    return load_config(TINY, overrides(data, *extra))


def test_missing_dataset_is_an_input_error(tmp_path):
    cfg = load_config(TINY, [f"data.dataset_dir={tmp_path}"])
    with pytest.raises(InputError, match="data.train_meta: .*yfcc15m_clean_open_data.json does not exist"):
        train(cfg, tmp_path / "run")


def test_skip_policy_with_a_dead_mlflow_server_then_push(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(INJECT_ENV, "3")
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = cfg_for(data, "train.max_steps=4", "checkpoint.every_steps=100", "train.nonfinite_policy=skip",
                  "tracking.enabled=true", f"tracking.uri={dead}")  # fmt: skip
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = train(cfg, run, device="cpu")
    assert len([w for w in caught if "MLflow disabled" in str(w.message)]) == 1
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1 and not summary["mlflow_synced"]
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}  # step 3 made no update
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4]  # the skipped step logs nothing
    assert "non-finite loss at step 3" in (run / "train.log").read_text()

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = push_run_dir(run, uri=store)
    from mlflow.tracking import MlflowClient

    history = MlflowClient(store).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in rows]


def test_rollback_policy_reloads_latest_with_a_lower_lr_and_rerun_is_a_noop(data, tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_ENV, "4")
    cfg = cfg_for(data, "train.max_steps=5", "checkpoint.every_steps=2", "train.nonfinite_policy=rollback",
                  "train.rollback_lr_factor=0.25")  # fmt: skip
    run = tmp_path / "run"
    summary = train(cfg, run, device="cpu")
    assert summary["steps"] == 5 and summary["lr_scale"] == 0.25
    assert "rolled back to step 2, lr_scale now 0.25" in (run / "train.log").read_text()
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {5}  # steps 1-2, then 3-5 again
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5]
    assert rows[-1]["lr"] == pytest.approx(lr_at(5, cfg) * 0.25) and rows[2]["lr"] == pytest.approx(lr_at(3, cfg))

    stamp = (run / "train_summary.json").stat().st_mtime_ns
    assert train(cfg, run, device="cpu") == {**summary, "rank": 0}  # finished: a no-op
    assert (run / "train_summary.json").stat().st_mtime_ns == stamp


def test_perf_mode_reports_fps_without_warmup_steps(data, tmp_path):
    cfg = cfg_for(data, "train.mode=perf", "train.perf_steps=4", "train.perf_warmup_steps=2", "train.eval_every=5")
    summary = train(cfg, tmp_path / "run", device="cpu")
    assert summary["mode"] == "perf" and summary["steps"] == 4 and summary["measured_steps"] == 2
    assert summary["fps"] == pytest.approx(summary["global_batch"] / summary["step_time_s"])
    assert 0 <= summary["data_time_fraction"] < 1 and summary["zeroshot"] == {}  # perf mode never evaluates
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest.pt"]  # the final one
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("policy", ["stop", "rollback"])
def test_stop_policy_and_rollback_without_checkpoint_raise(data, tmp_path, monkeypatch, policy):
    monkeypatch.setenv(INJECT_ENV, "2")
    cfg = cfg_for(data, "train.max_steps=3", "checkpoint.every_steps=100", f"train.nonfinite_policy={policy}")
    match = "stopping;" if policy == "stop" else "no checkpoint yet to roll back to"
    with pytest.raises(NonFiniteLossError, match=f"non-finite loss at step 2.*{match}"):
        train(cfg, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "train_summary.json").exists()


# ---------------------------------------------------------------- two processes (torchrun, gloo)


def torchrun(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master-port", str(port),
           "-m", "declip", "train", "--config", str(TINY), "--device", "cpu", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": ""}
    env.pop(INJECT_ENV, None)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)  # fmt: skip


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant: torchrun starts its workers in sessions of their own."""

    def children(p: int) -> list[int]:
        try:
            found = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            return []
        return [int(c) for c in found] + [g for c in found for g in children(int(c))]

    for p in [pid, *children(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def cli_sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.mark.slow
def test_two_processes_train_track_and_resume_exactly(data, tmp_path):
    common = overrides(data, "train.max_steps=8", "checkpoint.every_steps=2", "train.log_every=2")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = [*common, "train.eval_every=8", "tracking.enabled=true", f"tracking.uri={store}"]
    reference = torchrun(["--out", str(tmp_path / "a"), *cli_sets(tracked)], tmp_path)
    out = finish(reference)
    assert '"steps": 8, "devices": 2' in out

    summary = json.loads((tmp_path / "a" / "train_summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS and summary["rank"] == 0
    assert summary["devices"] == 2 and summary["global_batch"] == 8 and summary["device_type"] == "cpu"
    assert summary["mode"] == "full" and summary["precision"] == "fp32" and summary["fps"] > 0
    assert set(summary["final_losses"]) == {"loss", "mvs", "nns", "simsiam", "mlm"}
    assert all(torch.isfinite(torch.tensor(v)) for v in summary["final_losses"].values())
    assert set(summary["versions"]) == {"torch", "torchvision", "python", "declip"}
    assert summary["replaced_samples"] >= 1  # the demo plants broken records
    from mlflow.tracking import MlflowClient

    run = MlflowClient(store).get_run(summary["mlflow_run_id"])
    assert STEP_METRICS | {"zeroshot_top1", "zeroshot_top5"} <= set(run.data.metrics)
    assert run.info.status == "FINISHED" and run.data.params["devices"] == "2"

    # The same run killed (SIGKILL, whole process group) after its first checkpoint, then resumed.
    args = ["--out", str(tmp_path / "b"), *cli_sets([*common, "train.eval_every=8"])]
    latest = tmp_path / "b" / "checkpoints" / "latest.pt"
    killed = torchrun(args, tmp_path)
    while not latest.exists() and killed.poll() is None:
        time.sleep(0.02)
    kill_tree(killed.pid)
    killed.communicate()
    assert load_checkpoint(latest)["step"] in (2, 4, 6)
    assert "resumed from" in finish(torchrun(args, tmp_path))

    a, b = (load_checkpoint(tmp_path / name / "checkpoints" / "latest.pt") for name in ("a", "b"))
    assert a["step"] == b["step"] == 8 and a["samples_seen"] == b["samples_seen"] == 64
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), (i, name)
    for rank in (0, 1):
        for name, value in a["objective"][rank].items():
            assert torch.equal(value, b["objective"][rank][name]), (rank, name)
    assert not torch.equal(a["objective"][0]["nn_bank"], a["objective"][1]["nn_bank"])  # per-rank banks
